"""The experiment's report: every run's scores, cost and geometry beside the reference run, from their own files.

Reads what the stages wrote — each training's run.json, lmms-eval's comparison.csv (python -m eval), the
geometry profiles.json and lens.json (python -m analysis) — and writes `report.md`, `report.json`, `scores.csv`,
`cost.csv`, `summary.txt` and the PNGs next to them. Every number and every verdict is computed here from those
files; where a claim does not hold, the verdict says so plainly. The thresholds (`report:` in the experiment file
overrides them) were set before the first run; one rule changed after it, and says why in `id_answers`: expansion
is measured from the lowest ID before the peak, no longer from the embeddings' ID.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from compare.experiment import Experiment
from midtune.files import copy_file, save_figure, write_json, write_text

CLEAR_GAIN = 10.0  # points: "clearly beats" means at least this much better (and this much above chance, if known)
KEEPS_ACCURACY = 2.0  # points: a block "keeps the reference's score" within this many points
EXPANSION = 1.25  # the ID peak is at least this many times the lowest ID before it ...
CONTRACTION = 0.8  # ... and a later minimum at most this fraction of the peak: Valeriani et al.'s shape
OVERLAP_RISE = 0.02  # mean change in overlap (a fraction of k neighbours) that counts as a rise
CHEAPER = 0.95  # a run's median step at most this fraction of the reference's: cheaper beyond timing noise (±5 %)


# ---------------------------------------------------------------------------------------------------------
# Reading the stages' files
# ---------------------------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    # A resumed run's timings cover only its last session: marked, and left out of the cost ratios.
    return {"wall_s": run["wall_time_s"], "step_s": run["median_step_time_s"], "tokens_s": run.get("tokens_per_s"),
            "resumed": bool(run.get("resumed_from")),
            "peak_mb": run["peak_training_memory_mb"], "trainable": run["parameters"]["trainable"],
            "total": run["parameters"]["total"], "steps": run["steps"],
            "layers": run["plan"]["trainable_layers"], "num_layers": run["plan"]["num_layers"],
            "components": [k for k, v in run["config"]["trainable"].items() if k != "layers" and v is True],
            "batch_size": run["config"]["batch_size"], "lr": run["config"]["optim"]["lr"],
            "precision": run.get("precision", {}).get("line", "")}


def read_scores(path: Path, models: list[str]) -> list[dict]:
    """comparison.csv (python -m eval) → rows {task, metric, n, leaf, unit, values: {model: score}}. Metrics that
    lie in [0, 1] (accuracy, exact match, F1, ...) are given in points (× 100)."""
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        values = {m: float(row[m]) if row.get(m) not in (None, "") else None for m in models}
        present = [v for v in values.values() if v is not None]
        points = all(0.0 <= v <= 1.0 for v in present)
        if points:
            values = {m: None if v is None else 100 * v for m, v in values.items()}
        # lmms-eval counts documents per task, not per group: a row without a count is a group's aggregate
        rows.append({"task": row["task"], "metric": row["metric"], "n": int(row["n"]) if row["n"] else None,
                     "leaf": bool(row["n"]), "unit": "points" if points else "value", "values": values})
    return rows


# A task's headline metric when the experiment names none (report.metrics): the first of these it reports, else
# its first metric. MMStar, for one, lists its sub-scores before `average`.
HEADLINE_METRICS = ("average", "overall", "accuracy", "acc", "exact_match", "score")


def primary(rows: list[dict], chosen: dict[str, str] | None = None) -> dict[str, dict]:
    """Each task's headline metric row: `chosen[task]`, else the first of HEADLINE_METRICS it has, else its first."""
    by_task: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {}).setdefault(r["metric"], r)
    out = {}
    for task, metrics in by_task.items():
        want = (chosen or {}).get(task)
        name = want if want in metrics else next((m for m in HEADLINE_METRICS if m in metrics), next(iter(metrics)))
        out[task] = metrics[name]
    return out


def read_chance(setting, tasks: list[str]) -> dict[str, float]:
    """Chance (points) per task: a mapping task → fraction, or the path of a shapes world's world.json, whose
    answer choices give each midtune_shapes task's chance (exists is balanced yes/no)."""
    if not setting:
        return {}
    if isinstance(setting, dict):
        return {t: 100 * float(v) for t, v in setting.items()}
    world = json.loads(Path(setting).read_text())
    out = {}
    for q, info in world["question_types"].items():
        for task in (f"midtune_shapes_{q}", f"midtune_shapes_mc_{q}"):
            out[task] = 100 / len(info["choices"])
    return {t: v for t, v in out.items() if t in tasks}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _layers(layers: list[int], num_layers: int) -> str:
    if not layers:
        return "none"
    if layers == list(range(num_layers)):
        return f"all {num_layers}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]} of {num_layers}"
    return ", ".join(map(str, layers)) + f" of {num_layers}"


def timed_whole(run: dict) -> bool:
    """Whether a run's timings cover its whole training (a resumed run's cover only its last session)."""
    return not run.get("resumed") and bool(run.get("step_s"))


def trained(run: dict) -> str:
    llm = [f"LLM layers {_layers(run['layers'], run['num_layers'])}"] if run["layers"] else []
    return ", ".join(llm + run["components"]) or "—"


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------


def score_table(rows: list[dict], models: list[str], reference: str, chance: dict[str, float]) -> str:
    others = [m for m in models if m != reference]
    head = ["task", "metric", "n", *(["chance"] if chance else []), *models, *(f"Δ {m} − {reference}" for m in others)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    seen: set[str] = set()
    for r in rows:
        first_metric = r["task"] not in seen  # chance is that of the task's main metric
        seen.add(r["task"])
        v = r["values"]
        ref = v.get(reference)
        deltas = [None if v.get(m) is None or ref is None else v[m] - ref for m in others]
        metric = r["metric"] + ("" if r["unit"] == "points" else " (value)")
        first = [r["task"], metric, str(r["n"] or "—")]
        if chance:
            first.append(_pct(chance.get(r["task"]) if first_metric else None))
        lines.append("| " + " | ".join([*first, *(_pct(v.get(m)) for m in models),
                                         *("—" if d is None else f"{d:+.1f}" for d in deltas)]) + " |")
    return "\n".join(lines)


def learned_tasks(scores: dict[str, dict], reference: str, chance: dict[str, float], clear_gain: float) -> list[str]:
    """Tasks on which the reference run clearly beats the base (and chance, where known): what it learned."""
    out = []
    for task, r in scores.items():
        v = r["values"]
        if v.get(reference) is None or v.get("base") is None:
            continue
        floor = max(v["base"], chance.get(task, -math.inf))
        if v[reference] - floor >= clear_gain:
            out.append(task)
    return out


def score_verdicts(scores: dict[str, dict], reference: str, others: list[str], runs: dict[str, dict],
                   chance: dict[str, float], keeps: float = KEEPS_ACCURACY,
                   clear_gain: float = CLEAR_GAIN) -> list[str]:
    """Did the reference run learn (vs the base), and does each other run keep what it learned, at what cost?"""
    tasks = [t for t, r in scores.items() if r["values"].get(reference) is not None]
    learned = learned_tasks(scores, reference, chance, clear_gain)
    gains = ", ".join(f"{t} {scores[t]['values'][reference] - scores[t]['values']['base']:+.1f}" for t in tasks
                      if scores[t]["values"].get("base") is not None)
    over = "both the base and chance" if chance else "the base"
    out = [f"{reference} clearly beats the base (≥ {clear_gain:.0f} points over {over}) on {len(learned)} of "
           f"{len(tasks)} tasks" + (f" ({', '.join(learned)})" if learned else "")
           + f"; points over the base: {gains}."]
    if not learned:
        out.append(f"Whether the other runs keep {reference}'s score cannot be judged: {reference} is ≥ "
                   f"{clear_gain:.0f} points above {over} on no task.")
        return out
    for name in others:
        pairs = [(t, scores[t]["values"].get(name)) for t in learned]
        if any(v is None for _, v in pairs):
            out.append(f"{name}: no score on every task {reference} learned.")
            continue
        deltas = {t: v - scores[t]["values"][reference] for t, v in pairs}
        delta = sum(deltas.values()) / len(deltas)
        worst = min(deltas, key=deltas.get)
        cost = ""
        if name in runs and reference in runs and timed_whole(runs[name]) and timed_whole(runs[reference]):
            cost = (f" at {runs[name]['wall_s'] / runs[reference]['wall_s']:.2f}× the wall time and "
                    f"{runs[name]['step_s'] / runs[reference]['step_s']:.2f}× the step time")
        detail = (f"mean over the {len(learned)} tasks {reference} learned; largest gap: {worst} "
                  f"{deltas[worst]:+.1f}")
        if delta >= -keeps:
            out.append(f"{name}: {delta:+.1f} points vs {reference}{cost} ({detail}) — keeps {reference}'s score "
                       f"on the mean (at most {keeps:g} points below).")
        else:
            out.append(f"{name}: {delta:+.1f} points vs {reference}{cost} ({detail}) — does NOT keep {reference}'s "
                       f"score on the mean (more than {keeps:g} points below).")
    return out


# ---------------------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------------------


def cost_table(runs: dict[str, dict]) -> str:
    head = ["run", "trained", "steps", "wall time (s)", "median step (s)", "tokens/s", "training memory (MiB)",
            "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, r in runs.items():
        tokens = "—" if r.get("tokens_s") is None else f"{r['tokens_s']:.0f}"
        step = "—" if r.get("step_s") is None else f"{r['step_s']:.2f}"
        lines.append("| " + " | ".join([
            name + (" (resumed)" if r.get("resumed") else ""), trained(r), str(r["steps"]), f"{r['wall_s']:.0f}", step,
            tokens,
            f"{r['peak_mb']:.0f}", f"{_params(r['trainable'])} ({100 * r['trainable'] / r['total']:.0f}%)"]) + " |")
    return "\n".join(lines)


def cost_verdicts(runs: dict[str, dict], reference: str, others: list[str], cheaper: float = CHEAPER) -> list[str]:
    ref = runs[reference]
    out = []
    for name in others:
        r = runs[name]
        unusable = [n for n in (reference, name) if not timed_whole(runs[n])]
        if unusable:
            out.append(f"{name} vs {reference}: no cost comparison — the timings of {' and '.join(unusable)} cover "
                       f"only part of the training (resumed, or no step timed).")
            continue
        step, wall = r["step_s"] / ref["step_s"], r["wall_s"] / ref["wall_s"]
        mem, params = r["peak_mb"] / ref["peak_mb"], r["trainable"] / ref["trainable"]
        line = (f"{name} vs {reference}: {step:.2f}× the median step time, {wall:.2f}× the wall time, {mem:.2f}× the "
                f"training memory, {params:.2f}× the trainable parameters — ")
        if step <= cheaper:
            out.append(line + f"cheaper to train: {100 * (1 - step):.0f}% less time per step.")
        else:
            out.append(line + f"NOT cheaper to train beyond timing noise (its step is {step:.2f}× {reference}'s; "
                              f"needs ≤ {cheaper}×).")
    return out


# ---------------------------------------------------------------------------------------------------------
# Sweep: which layers matter
# ---------------------------------------------------------------------------------------------------------


def sweep_rows(scores: dict[str, dict], blocks: dict[str, list[int]], leaves: list[str]) -> list[dict]:
    rows = []
    for name, (lo, hi) in sorted(blocks.items(), key=lambda kv: kv[1]):
        values = {t: scores[t]["values"].get(name) for t in leaves}
        present = [v for v in values.values() if v is not None]
        rows.append({"run": name, "block": [lo, hi], "scores": values,
                     "mean": sum(present) / len(present) if present else None})
    return rows


def sweep_answers(rows: list[dict], scores: dict[str, dict], leaves: list[str], reference: str,
                  keeps: float = KEEPS_ACCURACY) -> list[str]:
    means = {r["run"]: r["mean"] for r in rows if r["mean"] is not None}
    if not means:
        return ["Sweep: no block has scores."]
    ref_values = [scores[t]["values"].get(reference) for t in leaves]
    ref_mean = sum(ref_values) / len(ref_values) if all(v is not None for v in ref_values) else None
    best = max(means, key=means.get)
    block = {r["run"]: r["block"] for r in rows}
    out = [f"Best block on the mean over the {len(leaves)} tasks: layers {block[best][0]}–{block[best][1]} "
           f"({means[best]:.1f}" + (f", {means[best] - ref_mean:+.1f} vs {reference}" if ref_mean is not None else "")
           + ")."]
    for t in leaves:
        per = {r["run"]: r["scores"][t] for r in rows if r["scores"][t] is not None}
        if per:
            top = max(per, key=per.get)
            out.append(f"{t}: best block layers {block[top][0]}–{block[top][1]} ({per[top]:.1f}), worst "
                       f"{min(per.values()):.1f}.")
    if ref_mean is not None:
        keep = [r for r in means if means[r] >= ref_mean - keeps]
        out.append(f"Blocks within {keeps:g} points of {reference}'s mean ({ref_mean:.1f}): "
                   + (", ".join(f"{block[r][0]}–{block[r][1]}" for r in keep) if keep else "none") + ".")
    return out


def plot_sweep(rows: list[dict], scores: dict[str, dict], leaves: list[str], reference: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [(r["block"][0] + r["block"][1]) / 2 for r in rows]
    for i, t in enumerate(leaves):
        ax.plot(x, [r["scores"][t] if r["scores"][t] is not None else math.nan for r in rows], marker="o",
                color=f"C{i}", label=t)
        for name, style in ((reference, "--"), ("base", ":")):
            v = scores[t]["values"].get(name)
            if v is not None:
                ax.axhline(v, color=f"C{i}", linestyle=style, alpha=0.5)
    ax.set_xlabel("trained block (centre layer; dashed: " + reference + ", dotted: base)")
    ax.set_ylabel("score (points)")
    ax.set_title("Which layers matter: score vs the position of the trained block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Geometry: ID profile, overlap, logit lens
# ---------------------------------------------------------------------------------------------------------


def _finite(per_layer: dict[int, dict], metric: str) -> dict[int, float]:
    return {layer: m[metric] for layer, m in per_layer.items() if math.isfinite(m.get(metric, math.nan))}


def _where(layer: int, n_states: int) -> str:
    """Which third of the depth a hidden-state index is in (0 = embeddings, n_states - 1 = last)."""
    frac = layer / (n_states - 1)
    return "early" if frac <= 1 / 3 else "late" if frac > 2 / 3 else "intermediate"


def id_answers(profiles: dict[str, dict[int, dict]], reference: str = "pretrained") -> list[str]:
    """The shape of the starting LLM's ID profile on captions, and how each trained model changes it."""
    ids = _finite(profiles[reference], "textual_id")
    if len(ids) < 3:
        return [f"ID profile: too few finite ID estimates ({len(ids)}) to describe its shape."]
    layers = sorted(ids)
    n_states = len(profiles[reference])
    peak = max(layers, key=ids.get)
    after = [layer for layer in layers if layer > peak]
    low = min(after, key=ids.get) if after else None
    # Expansion is measured from the lowest ID before the peak, not from the embeddings: the mean of a caption's
    # token embeddings is no representation the network built (SmolLM2: 8.8 there, 7.3 two layers up, then 10.8).
    before = min((layer for layer in layers if layer < peak), key=ids.get, default=peak)
    text = (f"ID profile of {reference} on the captions (TwoNN, mean caption-token representation): ")
    text += f"{ids[0]:.1f} at the embeddings, " if 0 in ids else ""
    text += f"lowest {ids[before]:.1f} at hidden state {before} before the peak, " if before != peak else ""
    text += f"peak {ids[peak]:.1f} at hidden state {peak} ({_where(peak, n_states)})"
    if low is not None:
        text += (f", then down to a minimum of {ids[low]:.1f} at hidden state {low} ({_where(low, n_states)}), "
                 f"{ids[layers[-1]]:.1f} at the last")
    expands = ids[peak] >= EXPANSION * ids[before]
    contracts = low is not None and ids[low] <= CONTRACTION * ids[peak]
    rule = f"peak ≥ {EXPANSION}× the lowest ID before it, later minimum ≤ {CONTRACTION}× the peak"
    if expands and contracts:
        shape = f"the expansion–contraction shape of Valeriani et al. 2023: reproduced ({rule})"
    else:
        missing = [w for w, ok in (("no expansion", expands), ("no contraction after the peak", contracts)) if not ok]
        shape = (f"the expansion–contraction shape of Valeriani et al. 2023: NOT reproduced ({', '.join(missing)}; "
                 f"{rule})")
    out = [text + "; " + shape + "."]
    for name, per_layer in profiles.items():
        if name == reference:
            continue
        other = _finite(per_layer, "textual_id")
        common = [layer for layer in layers if layer in other]
        if not common:
            continue
        change = {layer: other[layer] - ids[layer] for layer in common}
        top = max(common, key=lambda layer: abs(change[layer]))
        if abs(change[top]) < 1e-6:
            out.append(f"ID profile of {name}: identical to {reference}'s (the LLM did not change).")
            continue
        out.append(f"ID profile of {name}: largest change {change[top]:+.1f} at hidden state {top} "
                   f"({_where(top, n_states)}); mean change over the layers {sum(change.values()) / len(change):+.1f}.")
    return out


def overlap_change(profiles: dict, after: str, before: str) -> dict | None:
    """Per-third mean change of the visual↔textual overlap from `before` to `after`, and the layer of the largest
    rise. Thirds of the hidden states 1..last (the embeddings, where image and text do not meet, left out)."""
    a, b = _finite(profiles[after], "vt_overlap"), _finite(profiles[before], "vt_overlap")
    n_states = len(profiles[before])
    change = {layer: a[layer] - b[layer] for layer in sorted(set(a) & set(b)) if layer > 0}
    if not change:
        return None
    thirds: dict[str, list[float]] = {"early": [], "intermediate": [], "late": []}
    for layer, v in change.items():
        thirds[_where(layer, n_states)].append(v)
    means = {k: sum(v) / len(v) for k, v in thirds.items() if v}
    top = max(change, key=change.get)

    def peak(values: dict[int, float]) -> int:
        return max((layer for layer in values if layer > 0), key=values.get)

    return {"thirds": means, "top": top, "top_change": change[top], "top_where": _where(top, n_states),
            "peak_before": peak(b), "peak_after": peak(a)}


def overlap_answers(profiles: dict[str, dict[int, dict]], steps: list[tuple[str, str, str]]) -> list[str]:
    """Does the overlap rise in the intermediate layers, for each (what, after, before) step (e.g. after the
    alignment stage: base vs pretrained; after each run: the run vs base)?"""
    out = []
    for what, after, before in steps:
        if after not in profiles or before not in profiles:
            continue
        c = overlap_change(profiles, after, before)
        if c is None:
            out.append(f"Visual↔textual overlap {what}: no finite values to compare.")
            continue
        t = c["thirds"]
        mid = t.get("intermediate", math.nan)
        rises = mid >= OVERLAP_RISE
        most = rises and all(mid >= v for v in t.values())
        verdict = ("rises in the intermediate layers, most there" if most else
                   "rises in the intermediate layers, but more elsewhere" if rises else
                   "does NOT rise in the intermediate layers")
        out.append(f"Visual↔textual overlap {what} ({after} vs {before}): {verdict} (mean change per third of the "
                   f"layers: " + ", ".join(f"{k} {v:+.3f}" for k, v in t.items())
                   + f"; largest rise {c['top_change']:+.3f} at hidden state {c['top']} ({c['top_where']}); peak at "
                   f"hidden state {c['peak_before']} before, {c['peak_after']} after).")
    return out


def lens_answers(doc: dict) -> list[str]:
    """(e): where each model's image tokens decode to the depicted words (in the top k for half the pairs or more),
    and whether they do in the intermediate third of the depth, where the paper places the abstraction."""
    k = doc["settings"]["top_k"]
    out, intermediate = [], []
    for label in doc["settings"]["labels"]:
        parts = []
        for name, model in doc["models"].items():
            n_states = model["num_layers"] + 1
            middle = [i for i in range(n_states) if _where(i, n_states) == "intermediate"]
            texts = []
            for readout, text in (("mean_image", "mean image state"), ("best_image_token", "best image token")):
                values = model["concepts"][label][readout]
                first = values["first_top_k_layer"]
                texts.append(f"{text} from hidden state {first}" if first is not None else f"{text} never")
                ranks, share = values["median_rank"], values["top_k_fraction"]
                at = min(middle, key=lambda i: (-share[i], ranks[i]))
                intermediate.append((-share[at], ranks[at], name, label, readout, at, middle))
            parts.append(f"{name}: {', '.join(texts)}")
        out.append(f"{label}: the word is in the top {k} for half the images or more — " + "; ".join(parts) + ".")
    neg_share, rank, name, label, readout, at, middle = min(intermediate)
    span = f"hidden states {middle[0]}–{middle[-1]}"
    where = f"{name}, {label}, {readout.replace('_', ' ')}, hidden state {at}"
    if -neg_share >= 0.5:
        out.append(f"Visual features readable as the words they depict in the intermediate layers ({span}): yes — "
                   f"in the top {k} for {-neg_share:.0%} of the images ({where}; median rank {rank:.0f}).")
    else:
        out.append(f"Visual features readable as the words they depict in the intermediate layers ({span}): NOT "
                   f"reproduced — at its best intermediate hidden state the word is in the top {k} for "
                   f"{-neg_share:.0%} of the images (median rank {rank:.0f}: {where}); the words surface only in "
                   f"the late layers, if at all.")
    return out


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def _bullets(lines: list[str]) -> list[str]:
    return [f"- {line}" for line in lines]


def write_report(exp: Experiment, total_time_s: float) -> Path:
    out = exp.output_dir
    settings = {"keeps": KEEPS_ACCURACY, "clear_gain": CLEAR_GAIN, "cheaper": CHEAPER, **exp.report}
    runs = {name: load_run(out / name) for name in exp.trainings}
    reference = exp.reference
    run_names = [n for n, t in exp.trainings.items() if t["role"] == "run"]
    others = [n for n in run_names if n != reference]
    blocks = {n: t["block"] for n, t in exp.trainings.items() if t["role"] == "sweep"}
    evaluated = [m for m in exp.models if m != "pretrained"]

    rows = read_scores(out / "eval" / "comparison.csv", evaluated)
    scores = primary(rows, settings.get("metrics"))
    # Verdicts and the sweep use each task's headline metric where it is a 0-1 score shown in points: thresholds in
    # points mean nothing for other scales.
    leaves = [t for t, r in scores.items() if r["leaf"] and r["unit"] == "points"]
    leaf_scores = {t: scores[t] for t in leaves}
    chance = read_chance(settings.get("chance"), leaves)
    answers = {"scores": score_verdicts(leaf_scores, reference, others + list(blocks), runs, chance,
                                        settings["keeps"], settings["clear_gain"]),
               "cost": cost_verdicts(runs, reference, others + list(blocks), settings["cheaper"])}
    copy_file(out / "eval" / "comparison.png", out / "scores.png")

    sweep = None
    if blocks:
        sweep = sweep_rows(scores, blocks, leaves)
        answers["sweep"] = sweep_answers(sweep, scores, leaves, reference, settings["keeps"])
        plot_sweep(sweep, scores, leaves, reference, out / "sweep.png")

    geometry = lens = None
    if exp.analysis is not None:
        geometry = json.loads((out / "analysis" / "profiles.json").read_text())
        profiles = {name: {int(layer): {m: math.nan if v is None else float(v) for m, v in metrics.items()}
                           for layer, metrics in per_layer.items()} for name, per_layer in geometry["profiles"].items()}
        start = "pretrained" if "pretrained" in profiles else "base"
        steps = ([("after the stages", "base", "pretrained")] if start == "pretrained" else []) + \
                [(f"after {name}", name, "base") for name in run_names]
        answers["id"] = id_answers(profiles, reference=start)
        answers["overlap"] = overlap_answers(profiles, steps)
        copy_file(out / "analysis" / "profile.png", out / "geometry.png")
        if (out / "lens" / "lens.json").exists():
            lens = json.loads((out / "lens" / "lens.json").read_text())
            answers["lens"] = lens_answers(lens)
            copy_file(out / "lens" / "lens.png", out / "lens.png")

    ref = runs[reference]
    setup = [f"**Base**: `{exp.models.get('pretrained', exp.models['base'])}`."]
    stage_names = [n for n, t in exp.trainings.items() if t["role"] == "stage"]
    if stage_names:
        setup.append("**Stages** (in order, each from the model the previous one made): "
                     + "; ".join(f"{n} (trains {trained(runs[n])}, {runs[n]['steps']} steps)" for n in stage_names)
                     + ". **base** below is the model they made; **pretrained** the model before them.")
    setup.append("**Runs**, all from base with the same data: " + "; ".join(
        f"**{n}** trains {trained(runs[n])} ({runs[n]['steps']} steps, batch {runs[n]['batch_size']}, lr "
        f"{runs[n]['lr']:g})" for n in run_names) + f". Reference: **{reference}**.")
    if blocks:
        width = {b[1] - b[0] + 1 for b in blocks.values()}
        setup.append(f"**Sweep**: {len(blocks)} blocks of {', '.join(map(str, sorted(width)))} layers: "
                     + ", ".join(f"{b[0]}–{b[1]}" for b in sorted(blocks.values())) + ".")
    setup.append(f"Precision ({reference}): {ref['precision'] or 'as configured'}."
                 + (f" Hardware expected: {exp.hardware}." if exp.hardware else ""))

    scores_md, cost_md = score_table(rows, evaluated, reference, chance), cost_table(runs)
    md = [f"# {exp.name}: layer blocks vs full fine-tuning", ""]
    if exp.description:
        md += [exp.description.strip(), ""]
    md += [" ".join(setup), "",
           "## Scores", "",
           f"lmms-eval ({', '.join(exp.eval['tasks'])}) on base and every run, in points (metrics in [0, 1] × 100); "
           f"Δ against {reference}." + (f" Limit: {exp.eval['limit']} documents per task." if exp.eval.get("limit")
                                        else ""), "",
           scores_md, "",
           *_bullets(answers["scores"]), "",
           "![scores per task](scores.png)", "",
           "## Training cost", "",
           "Measured in each run's own process: wall time (from the start of training: loading the model, the loop "
           "and saving `final/`), median step time (over every step), tokens per second (non-padding tokens over "
           "the steps' time) and training memory: the peak during the training loop above the loaded model "
           "(gradients, optimizer state, activations; resident memory on CPU, allocated memory on GPU).", "",
           cost_md, "",
           *_bullets(answers["cost"]), ""]
    if sweep is not None:
        head = ["block", *leaves, "mean"]
        table = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        table += ["| " + " | ".join([f"{r['block'][0]}–{r['block'][1]}", *(_pct(r["scores"][t]) for t in leaves),
                                     _pct(r["mean"])]) + " |" for r in sweep]
        md += ["## Which layers matter: the sweep", "", "\n".join(table), "", *_bullets(answers["sweep"]), "",
               "![score vs block position](sweep.png)", ""]
    if geometry is not None:
        k, n_pairs = geometry["settings"]["k"], geometry["settings"]["n_pairs"]
        md += ["## Geometry", "",
               f"Per hidden state (0 = embeddings), on {n_pairs} image/caption pairs: the intrinsic dimension (ID) "
               f"of the captions' and the images' representations, and the visual↔textual neighbourhood overlap — "
               f"the fraction of each image's {k} nearest images that are also among its caption's {k} nearest "
               f"captions (chance about {k / n_pairs:.2f}).", "",
               *_bullets(answers["id"] + answers["overlap"]), "", "![geometry](geometry.png)", ""]
    if lens is not None:
        n_lens = next(iter(lens["models"].values()))["n_pairs"]
        md += ["## Logit lens on the image tokens", "",
               f"Each hidden state of the image prompt decoded through the model's own final norm and unembedding, "
               f"over {n_lens} images: the rank of the image's {' and '.join(lens['settings']['labels'])} word, for "
               f"the mean image-token state (solid) and the best single image token (dashed); median over the "
               f"images, 1 = the top token.", "", *_bullets(answers["lens"]), "", "![logit lens](lens.png)", ""]
    md += ["## Files", "",
           "Each training in its own directory (`run.json`, `metrics.jsonl`, `config.yaml`, `final/`) · `eval/` "
           "lmms-eval results and samples per model, `comparison.md/.csv/.png`"
           + (" · `analysis/` geometry profiles (JSON, CSV, PNG)" if geometry is not None else "")
           + (" · `lens/` the logit lens" if lens is not None else "")
           + " · `report.json`, `scores.csv`, `cost.csv`: this report's numbers.", "",
           f"This invocation took {total_time_s:.0f} s (reused stages cost nothing).", ""]
    report = out / "report.md"
    write_text(report, "\n".join(md))

    doc = {"experiment": str(exp.path), "reference": reference, "models": exp.models, "settings": settings,
           "scores": rows, "runs": runs, "sweep": sweep, "verdicts": answers}
    write_json(out / "report.json", doc)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "metric", "n", "unit", *evaluated])
    for r in rows:
        w.writerow([r["task"], r["metric"], r["n"] or "", r["unit"], *("" if r["values"][m] is None else
                                                                       round(r["values"][m], 4) for m in evaluated)])
    write_text(out / "scores.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ["wall_s", "step_s", "tokens_s", "peak_mb", "trainable", "total", "steps"]
    w.writerow(["run", "trained", *keys])
    for name, r in runs.items():
        w.writerow([name, trained(r), *(r[k] for k in keys)])
    write_text(out / "cost.csv", buf.getvalue())
    summary = [scores_md, "", cost_md, ""]
    summary += [line for lines in answers.values() for line in lines]
    write_text(out / "summary.txt", "\n".join(summary) + "\n")
    return report
