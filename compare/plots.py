"""The report's figures, every estimate drawn with its 95 % interval: scores per task and configuration, the paired
differences from the reference (with 0 and the margin), and the sweep's score against the block's position."""

from __future__ import annotations

from pathlib import Path

from midtune.files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errors(entries: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Values and asymmetric error bars; an entry without an interval gets none (drawn as a plain point)."""
    values, lower, upper = [], [], []
    for e in entries:
        v = e.get("estimate")
        values.append(float("nan") if v is None else v)
        ci = e.get("ci")
        lower.append(0.0 if not ci else v - ci[0])
        upper.append(0.0 if not ci else ci[1] - v)
    return values, [lower, upper]


def all_figures(doc: dict, configs: dict, reference: str, leaves: list[str], chance: dict, out: Path) -> None:
    rows = [e for e in doc["scores"] if f"{e['task']}/{e['metric']}" in leaves] or \
        [e for e in doc["scores"] if e["leaf"] and e["unit"] == "points"]
    plot_scores(rows, [c for c in configs if c in rows[0]["scores"]] if rows else [], chance, out / "scores.png")
    plot_differences(doc, reference, leaves, out / "differences.png")
    if doc.get("sweep"):
        plot_sweep(doc, reference, leaves, out / "sweep.png")


def plot_scores(rows: list[dict], configs: list[str], chance: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4))
    width = 0.8 / max(1, len(configs))
    for i, c in enumerate(configs):
        values, errors = _errors([r["scores"][c] for r in rows])
        x = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(x, values, width, yerr=errors, capsize=3, label=c, color=f"C{i}", alpha=0.85)
    for j, r in enumerate(rows):
        if r["task"] in chance:
            ax.hlines(chance[r["task"]], j - 0.45, j + 0.45, colors="k", linestyles=":", linewidth=1)
    ax.set_xticks(range(len(rows)), [r["task"].removeprefix("midtune_shapes_") for r in rows], rotation=20)
    _finish(plt, fig, ax, path, "score (points), 95 % interval", "Scores per task (dotted: chance)", "y")


def plot_differences(doc: dict, reference: str, leaves: list[str], path: Path) -> None:
    """Each run's paired difference from the reference per task and on the mean, with 0 and −margin marked."""
    plt = _pyplot()
    names = list(doc["comparisons"])
    labels = [k.split("/")[0].removeprefix("midtune_shapes_") for k in leaves] + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        c = doc["comparisons"][name]
        values, errors = _errors([c["tasks"][k] for k in leaves] + [c["mean"]])
        x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
        ax.errorbar(x, values, yerr=errors, fmt="o", capsize=4, color=f"C{i + 1}", label=f"{name} − {reference}")
    margin = doc["settings"]["margin"]
    ax.axhline(0, color="k", linewidth=1)
    ax.axhline(-margin, color="r", linestyle="--", linewidth=1, label=f"−margin ({margin:g} points)")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    _finish(plt, fig, ax, path, "paired difference (points), 95 % interval",
            f"Difference from {reference}: keeps when the interval's low end is above −margin", "y")


def plot_sweep(doc: dict, reference: str, leaves: list[str], path: Path) -> None:
    """The mean over the tasks against the block's centre with its band, each task faintly, the reference's mean
    as a line with its band."""
    plt = _pyplot()
    rows = doc["sweep"]
    x = [(r["block"][0] + r["block"][1]) / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(leaves):
        ax.plot(x, [r["scores"][k]["estimate"] for r in rows], marker=".", color=f"C{i}", alpha=0.35,
                label=k.split("/")[0].removeprefix("midtune_shapes_"))
    mean = [r["mean"]["estimate"] for r in rows]
    ax.plot(x, mean, marker="o", color="k", label="mean over the tasks")
    ax.fill_between(x, [r["mean"]["ci"][0] for r in rows], [r["mean"]["ci"][1] for r in rows], color="k", alpha=0.15)
    ref = doc["sweep_reference"]
    ax.axhline(ref["estimate"], color="C3", linestyle="--", label=f"{reference} (mean, with its band)")
    ax.axhspan(ref["ci"][0], ref["ci"][1], color="C3", alpha=0.1)
    ax.set_xlabel("trained block (centre layer)")
    _finish(plt, fig, ax, path, "score (points), 95 % band",
            "Which layers matter: score vs the position of the trained block", "both")


def _finish(plt, fig, ax, path: Path, ylabel: str, title: str, grid: str) -> None:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis=grid, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
