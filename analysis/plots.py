"""Figures of the analysis app (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import math
from pathlib import Path

from midtune.files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def computed(profiles: dict[str, dict[int, dict[str, float]]], metric: str) -> bool:
    """Whether any model has a finite value of `metric` at any layer."""
    return any(math.isfinite(v) for per_layer in profiles.values() for values in per_layer.values()
               if isinstance(v := values.get(metric), (int, float)))


def plot_profiles(profiles: dict[str, dict[int, dict[str, float]]], path: Path, metrics=None,
                  gride_rank: int | None = None):
    """One figure: a panel per metric, a line per model (with its 95 % band where the profile has one: ID and
    overlap curves), hidden-state index on x. Returns the (closed) Figure.
    A metric no profile computed (IdCorr under --no-idcorr: NaN or absent at every layer) gets no panel: an empty
    panel reads as a measurement. With `gride_rank`, the GRIDE panels name their scale."""
    from analysis.profile import PLOTTED, TITLES, gride_title

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in (metrics or PLOTTED) if computed(profiles, m)] or list(metrics or PLOTTED)[:1]
    last = max((max(per_layer) for per_layer in profiles.values() if per_layer), default=0)
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, per_layer in profiles.items():
            layers = sorted(per_layer)
            (line,) = ax.plot(layers, [per_layer[layer].get(metric, float("nan")) for layer in layers], marker="o",
                              markersize=3, label=name)
            if computed(profiles, f"{metric}_lo"):  # its band from resampling the pairs, where it was computed
                lo, hi = ([per_layer[layer].get(f"{metric}_{end}", float("nan")) for layer in layers]
                          for end in ("lo", "hi"))
                ax.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.3, last + 0.3)
        ax.set_title(gride_title(metric, gride_rank) if gride_rank else TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel("layer (hidden-state index; 0 = embeddings)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return fig


def plot_gride_scaling(scaling: dict[str, dict[int, dict]], rank: int, path: Path):
    """GRIDE ID against the scale n1 (log axis), a line per hidden state coloured by depth: a row per model, the
    visual and the textual representations side by side; the profile's fixed scale marked. Returns the Figure."""
    plt = _pyplot()
    models = [name for name, per_layer in scaling.items() if any(per_layer.values())]
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.2 * len(models)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, name in enumerate(models):
        layers = sorted(layer for layer, curves in scaling[name].items() if curves)
        for col, role in enumerate(("visual", "textual")):
            ax = axes[row, col]
            for layer in layers:
                curve = scaling[name][layer].get(role)
                if curve:
                    ax.plot(curve["n1"], curve["ids"], marker="o", markersize=2, linewidth=1,
                            color=cmap(layer / max(layers[-1], 1)), label=str(layer))
            ax.axvline(rank, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}: {role} GRIDE ID by scale (dashed: n1 = {rank})", fontsize=9)
            ax.set_xlabel("scale n1 (μ = r_2n1 / r_n1)", fontsize=8)
            ax.grid(alpha=0.3)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, layers[-1] if layers else 1))
        fig.colorbar(sm, ax=axes[row].tolist(), label="hidden state", fraction=0.04)
    save_figure(fig, path, dpi=110)
    return fig


def plot_intervention(result: dict, path: Path):
    """Accuracy per window (x: the window's first layer), a line per task + their mean; baselines dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    windows = result["windows"]
    starts = [w["start"] for w in windows]
    tasks = list(result["baseline"]["accuracy"])
    for i, task in enumerate(tasks):
        color = f"C{i}"
        ax.plot(starts, [w["accuracy"][task] for w in windows], marker="o", color=color, label=task,
                linewidth=2.5 if task == "mean" else 1.2)
        ax.axhline(result["baseline"]["accuracy"][task], color=color, linestyle="--", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"first layer of the blocked window (size {result['window']})")
    ax.set_ylabel("accuracy")
    ax.set_title(f"knockout: {result.get('block', 'image → text attention')} (dashed: no intervention)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return fig


def plot_lens(doc: dict, path: Path):
    """Median rank of the concept word (log scale) vs hidden state: a panel per concept, a line per model; solid =
    the mean image-token state decoded, dashed = the best single image token. A dotted line marks the top k."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    labels = list(doc["settings"]["labels"])
    top_k = doc["settings"]["top_k"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 3.6), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for i, (name, model) in enumerate(doc["models"].items()):
            for readout, style in (("mean_image", "-"), ("best_image_token", "--")):
                ranks = model["concepts"][label][readout]["median_rank"]
                ax.plot(range(len(ranks)), ranks, style, color=f"C{i}", marker="o", markersize=2.5,
                        label=f"{name} ({readout.replace('_', ' ')})")
        ax.axhline(top_k, color="grey", linestyle=":", linewidth=0.9)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{label}: median rank of the word (1 = top)", fontsize=10)
        ax.set_xlabel("layer (hidden-state index; 0 = embeddings)", fontsize=8)
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), frameon=False, fontsize=8)
    rows = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * rows))
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return fig


def plot_heads(result: dict, path: Path):
    """Heat map of each head's relevance to the concept (rows: layers, columns: heads); the top five circled."""
    import numpy as np

    plt = _pyplot()
    scores = np.asarray(result["relevance"])
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * heads + 2.5), max(3.0, 0.14 * layers + 1.5)))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(scores.max()), 1e-6),
                      origin="lower")
    for r in result["ranked"][:5]:
        ax.scatter([r["head"]], [r["layer"]], s=120, facecolors="none", edgecolors="red", linewidths=1.2)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"relevance to {result['concept']} (share of the head's output energy)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return fig
