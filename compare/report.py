"""The experiment's report: every run's scores, cost and geometry beside the reference run, from their own files.

Reads what the stages wrote — each training's run.json, lmms-eval's comparison.csv and per-question sample logs
(python -m eval), the cost probes' probe.json (python -m train.probe), the geometry profiles.json and lens.json
(python -m analysis) — and writes `report.md`, `report.json`, `scores.csv`, `cost.csv`, `summary.txt` and the PNGs
next to them. Every score, difference and cost ratio carries a 95 % interval (compare/stats.py) and every verdict
comes from an interval and a margin fixed in the experiment file (`report.margin`, `report.cost_margin`), never
from a point estimate. The method: docs/compare.md, "How the verdicts are reached".
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from compare import plots, stats
from compare.experiment import Experiment, primary_model
from compare.geometry import id_answers, lens_answers, overlap_answers
from compare.scores import PerQuestion, check_against_lmms_eval
from compare.stats import Estimate, Resampler
from midtune.files import write_json, write_text

MARGIN = 2.0  # points: a run "keeps" the reference's score when its interval's low end is at most this far below
COST_MARGIN = 0.05  # a step-time ratio is "the same" when its interval lies within 1 ± this
# What a cost comparison needs to hold fixed: the same backend, device count and batch shape.
COMPARABLE = ("distributed_type", "world_size", "device", "mixed_precision", "batch_size", "grad_accum", "max_length")


# ---------------------------------------------------------------------------------------------------------
# Reading the stages' files
# ---------------------------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> dict:
    run = json.loads((run_dir / "run.json").read_text())
    config = run["config"]
    # A resumed run's timings cover only its last session: marked, and left out of the cost ratios.
    return {"wall_s": run["wall_time_s"], "step_s": run["median_step_time_s"], "tokens_s": run.get("tokens_per_s"),
            "resumed": bool(run.get("resumed_from")),
            "peak_mb": run["peak_training_memory_mb"], "trainable": run["parameters"]["trainable"],
            "total": run["parameters"]["total"], "steps": run["steps"],
            "layers": run["plan"]["trainable_layers"], "num_layers": run["plan"]["num_layers"],
            "components": [k for k, v in config["trainable"].items() if k != "layers" and v is True],
            "batch_size": config["batch_size"], "lr": config["optim"]["lr"], "seed": config.get("seed"),
            "precision": run.get("precision", {}).get("line", ""),
            "setup": {"distributed_type": run.get("distributed_type"), "world_size": run.get("world_size"),
                      "device": run.get("device"), "mixed_precision": run.get("mixed_precision"),
                      "batch_size": config["batch_size"], "grad_accum": config.get("grad_accum"),
                      "max_length": config.get("max_length")}}


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
# The evidence: per-question results, resampled once for every comparison
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """Every configuration's models by seed, the score rows, and the resampler over the rows that have
    per-question results (`why[key]` says why a row has none)."""

    configs: dict[str, dict]  # configuration → {seed: model}; "base" is {None: "base"}
    rows: list[dict]
    resampler: Resampler | None
    why: dict[str, str]
    clustering: dict[str, str]
    n_boot: int

    def key(self, row: dict) -> str:
        return f"{row['task']}/{row['metric']}"

    def has(self, key: str) -> bool:
        return self.resampler is not None and key not in self.why and key in self.resampler.tasks

    def score(self, config: str, keys: list[str]) -> Estimate:
        return stats.score(self.resampler, list(self.configs[config].values()), keys)

    def difference(self, config: str, reference: str, keys: list[str]) -> Estimate:
        return stats.difference(self.resampler, self.configs[config], self.configs[reference], keys)

    def point(self, row: dict, config: str) -> float | None:
        """A row's plain score (mean over the configuration's seeds) where there is no interval."""
        values = [row["values"].get(m) for m in self.configs[config].values()]
        return None if any(v is None for v in values) else sum(values) / len(values)


def gather_evidence(exp: Experiment, rows: list[dict], configs: dict[str, dict], settings: dict) -> Evidence:
    per_question = PerQuestion(exp.output_dir / "eval", str(settings.get("cluster_by") or "image"))
    models = [m for seeds in configs.values() for m in seeds.values()]
    found, why, clustering = [], {}, {}
    for row in rows:
        key = f"{row['task']}/{row['metric']}"
        if not row["leaf"]:
            why[key] = "a group's aggregate (its tasks are reported one by one)"
            continue
        got = per_question.task_results(row["task"], row["metric"], models, 100.0 if row["unit"] == "points" else 1.0)
        if isinstance(got, str):
            why[key] = got
        else:
            found.append((row, got))
            clustering[key] = per_question.clustering(row["task"], models)
    n_boot = int(settings.get("n_boot") or stats.N_BOOT)
    resampler = Resampler([t for _, t in found], n_boot=n_boot, seed=0) if found else None
    for row, t in found:  # the per-question results must be what lmms-eval's score was computed from
        mismatch = check_against_lmms_eval(t, row["values"], resampler)
        if mismatch:
            why[t.key] = mismatch
    return Evidence(configs, rows, resampler, why, clustering, n_boot)


def configurations(exp: Experiment) -> dict[str, dict]:
    """base, then every run and sweep block: {seed: model} (a training of one seed whose seed is unknown: None)."""
    out = {"base": {None: "base"}}
    for name, role in exp.trainings.items():
        if role["role"] != "stage":
            out[name] = dict(role["seeds"])
    return out


def _fmt(e: Estimate | None, point: float | None = None, signed: bool = False) -> str:
    if e is None:
        return "—" if point is None else (f"{point:+.1f}" if signed else f"{point:.1f}") + " (no interval)"
    half = (e.ci[1] - e.ci[0]) / 2
    return (f"{e.estimate:+.1f}" if signed else f"{e.estimate:.1f}") + f" ± {half:.1f}"


def _ci(e: Estimate) -> str:
    return f"[{e.ci[0]:+.1f}, {e.ci[1]:+.1f}]"


# ---------------------------------------------------------------------------------------------------------
# Scores: every configuration, every row, with its interval
# ---------------------------------------------------------------------------------------------------------


def score_rows(ev: Evidence, reference: str, margin: float, leaves: list[str]) -> list[dict]:
    """For report.json and the tables: each task's row (a group's aggregate is left out: its tasks are the rows, and
    their mean is the last row, with its interval) with the score per configuration and each run's paired
    difference from the reference, with the interval, n, method and verdict (0–1 scores; or why there is none)."""
    out = []
    for row in ev.rows:
        if not row["leaf"]:
            continue
        key = ev.key(row)
        entry = {"task": row["task"], "metric": row["metric"], "unit": row["unit"], "n": row["n"], "leaf": row["leaf"],
                 "scores": {}, "differences": {}}
        if not ev.has(key):
            entry["no_interval"] = ev.why.get(key, "no per-question results")
        for config in ev.configs:
            if ev.has(key):
                entry["scores"][config] = ev.score(config, [key]).to_dict()
            else:
                entry["scores"][config] = {"estimate": ev.point(row, config), "ci": None}
        for config in ev.configs:
            if config in ("base", reference) or not ev.has(key):
                continue
            d = ev.difference(config, reference, [key])
            verdict = stats.verdict(d.ci, margin) if row["unit"] == "points" else None
            entry["differences"][config] = {**d.to_dict(), "verdict": verdict,
                                            "hint": stats.size_hint(d, margin) if verdict else None}
        out.append(entry)
    if len(leaves) > 1:
        out.append(mean_row(ev, reference, margin, leaves))
    return out


def mean_row(ev: Evidence, reference: str, margin: float, leaves: list[str]) -> dict:
    """The unweighted mean over the verdicts' tasks (each task counts once, as lmms-eval's groups do)."""
    entry = {"task": f"mean over the {len(leaves)} tasks", "metric": "headline", "unit": "points",
             "n": ev.resampler.questions(leaves), "leaf": False, "mean_of": leaves,
             "scores": {c: ev.score(c, leaves).to_dict() for c in ev.configs}, "differences": {}}
    for config in ev.configs:
        if config not in ("base", reference):
            d = ev.difference(config, reference, leaves)
            entry["differences"][config] = {**d.to_dict(), "verdict": stats.verdict(d.ci, margin),
                                            "hint": stats.size_hint(d, margin)}
    return entry


def score_table(entries: list[dict], configs: dict[str, dict], reference: str, chance: dict[str, float]) -> str:
    others = [c for c in configs if c not in ("base", reference)]
    head = ["task", "metric", "n", *(["chance"] if chance else []),
            *(f"{c}" + (f" ({len(configs[c])} seeds)" if len(configs[c]) > 1 else "") for c in configs),
            *(f"Δ {c} − {reference}" for c in others)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for e in entries:
        first = [e["task"], e["metric"] + ("" if e["unit"] == "points" else " (value)"), str(e["n"] or "—")]
        if chance:
            first.append(f"{chance[e['task']]:.1f}" if e["task"] in chance else "—")
        cells = [_cell(e["scores"][c], signed=False) for c in configs]
        deltas = []
        for c in others:
            d = e["differences"].get(c)
            verdict = f" **{d['verdict']}**" if d and d["verdict"] else ""
            deltas.append("—" if d is None else _cell(d, signed=True) + verdict)
        lines.append("| " + " | ".join([*first, *cells, *deltas]) + " |")
    return "\n".join(lines)


def _cell(d: dict, signed: bool) -> str:
    if d.get("estimate") is None:
        return "—"
    value = f"{d['estimate']:+.1f}" if signed else f"{d['estimate']:.1f}"
    if d.get("ci") is None:
        return value + "†"
    return f"{value} ± {(d['ci'][1] - d['ci'][0]) / 2:.1f}"


def learned_answers(ev: Evidence, leaves: list[str], reference: str, chance: dict[str, float]) -> tuple[list, dict]:
    """What the reference learned: its gain over the base has an interval above 0 and (where chance is known) its
    score's interval lies above chance. Information only: the comparisons with the reference do not depend on it."""
    result, learned = {}, []
    for key in leaves:
        task = key.split("/")[0]
        gain, own = ev.difference(reference, "base", [key]), ev.score(reference, [key])
        above_chance = task not in chance or own.ci[0] > chance[task]
        ok = gain.ci[0] > 0 and above_chance
        result[key] = {"gain": gain.to_dict(), "score": own.to_dict(), "chance": chance.get(task), "learned": ok}
        if ok:
            learned.append(task)
    over = "the base and chance" if chance else "the base"
    gains = "; ".join(f"{k.split('/')[0]} {result[k]['gain']['estimate']:+.1f} {_ci_of(result[k]['gain'])}"
                      for k in leaves)
    line = (f"{reference} learned (its gain over {over} has a 95 % interval above 0) on {len(learned)} of "
            f"{len(leaves)} tasks" + (f" ({', '.join(learned)})" if learned else "")
            + f"; gain over the base: {gains}.")
    return [line], result


def _ci_of(d: dict) -> str:
    return f"[{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]"


def comparison_answers(ev: Evidence, leaves: list[str], reference: str, others: list[str],
                       margin: float) -> tuple[list[str], dict]:
    """Each run against the reference: the paired difference on every headline task and on their mean, its verdict
    against the margin, and for `worse`/`inconclusive` how much more data would decide."""
    lines, result = [], {}
    for name in others:
        per_task = {}
        for key in leaves:
            d = ev.difference(name, reference, [key])
            per_task[key] = {**d.to_dict(), "verdict": stats.verdict(d.ci, margin), "hint": stats.size_hint(d, margin)}
        mean = ev.difference(name, reference, leaves)
        verdict = stats.verdict(mean.ci, margin)
        hint = stats.size_hint(mean, margin)
        result[name] = {"mean": {**mean.to_dict(), "verdict": verdict, "hint": hint, "tasks": leaves},
                        "tasks": per_task}
        counts = {v: sum(t["verdict"] == v for t in per_task.values()) for v in stats.VERDICTS}
        worst = min(per_task, key=lambda k: per_task[k]["estimate"])
        seeds = (f"{mean.n_seeds} seeds" if mean.var_seeds is not None else "one seed: seed variation not measured")
        lines.append(
            f"{name} vs {reference}, mean over the {len(leaves)} tasks: {mean.estimate:+.1f} points, 95 % interval "
            f"{_ci(mean)} (paired on {mean.n_questions} questions, {seeds}) — **{verdict}** "
            f"({_verdict_words(verdict, margin, reference)}). Per task: "
            + ", ".join(f"{v} {n}" for v, n in counts.items() if n)
            + f"; largest gap {worst.split('/')[0]} {per_task[worst]['estimate']:+.1f} {_ci_of(per_task[worst])}."
            + (f" {hint['text'][0].upper()}{hint['text'][1:]}." if hint else ""))
    return lines, result


def _verdict_words(verdict: str, margin: float, reference: str) -> str:
    return {"better": f"above {reference}: the whole interval is above 0",
            "keeps": f"no more than {margin:g} points below {reference}: the interval's low end is within the margin",
            "worse": f"below {reference}, perhaps by more than the {margin:g}-point margin",
            "loses": f"more than {margin:g} points below {reference}: the whole interval is below the margin",
            "inconclusive": f"the interval spans both 0 and −{margin:g}: neither keeping nor losing is shown"}[verdict]


def leaf_keys(ev: Evidence, settings: dict) -> tuple[list[str], list[str]]:
    """The headline metric of every task where it is a 0–1 score with per-question results (what the verdicts
    judge), and the tasks left out with why."""
    heads = primary([r for r in ev.rows if r["leaf"]], settings.get("metrics"))
    keys, left_out = [], []
    for task, row in heads.items():
        key = ev.key(row)
        if row["unit"] != "points":
            left_out.append(f"{task} ({row['metric']} is not a 0–1 score)")
        elif not ev.has(key):
            left_out.append(f"{task} ({ev.why.get(key, 'no per-question results')})")
        else:
            keys.append(key)
    return keys, left_out


# ---------------------------------------------------------------------------------------------------------
# Cost: run timings in the table; verdicts from the interleaved probe
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
            tokens, f"{r['peak_mb']:.0f}", f"{_params(r['trainable'])} ({100 * r['trainable'] / r['total']:.0f}%)"])
            + " |")
    return "\n".join(lines)


def incomparable(a: dict, b: dict) -> list[str]:
    """What differs between two trainings' set-ups that a cost ratio would confound (backend, GPUs, batch shape)."""
    return [f"{k} {a['setup'].get(k)!r} vs {b['setup'].get(k)!r}" for k in COMPARABLE
            if a["setup"].get(k) != b["setup"].get(k)]


def cost_answers(exp: Experiment, runs: dict[str, dict], configs: dict[str, dict], others: list[str],
                 margin: float) -> tuple[list[str], dict]:
    """Per run: the probe's step-time ratio with its interval and verdict; the measured run ratios (memory,
    parameters) beside it; refused where the trainings' set-ups differ."""
    reference = exp.reference
    ref_run = runs[primary_model(reference, configs[reference])]
    lines, result = [], {}
    for name in others:
        run = runs[primary_model(name, configs[name])]
        entry: dict = {"memory_ratio": run["peak_mb"] / ref_run["peak_mb"],
                       "parameters_ratio": run["trainable"] / ref_run["trainable"]}
        differs = incomparable(run, ref_run)
        measured = (f"training memory {entry['memory_ratio']:.2f}× (one measurement each), trainable parameters "
                    f"{entry['parameters_ratio']:.2f}×")
        if differs:
            entry.update(verdict="refused", why="the trainings differ in " + "; ".join(differs))
            lines.append(f"{name} vs {reference}: no cost comparison — {entry['why']}: their times measure the set-up, "
                         f"not the layers trained. {measured}.")
        elif name in exp.cost_probes:
            lines.append(_probe_line(Path(exp.cost_probes[name]) / "probe.json", name, reference, margin, entry)
                         + f" {measured}.")
        else:
            entry.update(verdict="not measured", why=f"no cost probe: {exp.cost_probe_skipped}")
            lines.append(f"{name} vs {reference}: step time not judged ({entry['why']}); the runs' own timings are in "
                         f"the table (one run each, no interval). {measured}.")
        result[name] = entry
    return lines, result


def _probe_line(path: Path, name: str, reference: str, margin: float, entry: dict) -> str:
    probe = json.loads(path.read_text())
    times = {k: v["step_times"] for k, v in probe["runs"].items()}
    ratio = stats.step_ratio(times[name], times[reference])
    verdict = stats.cost_verdict(ratio.ci, margin)
    hint = stats.pairs_hint(ratio, margin)
    entry.update(step_ratio=ratio.to_dict(), verdict=verdict, hint=hint, probe=str(path),
                 probe_settings=probe.get("settings"))
    words = {"cheaper": "its whole interval is below 1", "costlier": "its whole interval is above 1",
             "same": f"its interval lies within 1 ± {margin:g}",
             "inconclusive": f"the interval holds 1 but reaches beyond 1 ± {margin:g}"}[verdict]
    return (f"{name} vs {reference}: step time {ratio.estimate:.2f}×, 95 % interval [{ratio.ci[0]:.2f}, "
            f"{ratio.ci[1]:.2f}] ({ratio.n_pairs} steps of each, alternated in one process on the same batches) — "
            f"**{verdict}** ({words})." + (f" {hint[0].upper()}{hint[1:]}." if hint else ""))


# ---------------------------------------------------------------------------------------------------------
# Sweep: which layers matter, by the same rule
# ---------------------------------------------------------------------------------------------------------


def sweep_answers(ev: Evidence, leaves: list[str], blocks: dict[str, list[int]], reference: str, margin: float,
                  comparisons: dict) -> tuple[list[str], list[dict]]:
    """Each block's mean over the tasks with its interval and verdict; the best block with its interval, and the
    blocks that cannot be told apart from it (their paired difference from it holds 0)."""
    order = sorted(blocks, key=lambda n: blocks[n])
    rows = []
    for name in order:
        e = ev.score(name, leaves)
        rows.append({"run": name, "block": blocks[name], "mean": e.to_dict(),
                     "vs_reference": comparisons[name]["mean"],
                     "scores": {k: ev.score(name, [k]).to_dict() for k in leaves}})
    best = max(rows, key=lambda r: r["mean"]["estimate"])
    ties = [r["run"] for r in rows if r is not best
            and ev.difference(r["run"], best["run"], leaves).ci[1] >= 0]
    keep = [r for r in rows if r["vs_reference"]["verdict"] in ("keeps", "better")]

    def span(r: dict) -> str:
        return f"{r['block'][0]}–{r['block'][1]}"

    ref = ev.score(reference, leaves)
    lines = [f"Highest mean over the {len(leaves)} tasks: layers {span(best)}, {best['mean']['estimate']:.1f} "
             f"{_ci_of(best['mean'])} ({reference}: {ref.estimate:.1f} {_ci(ref)}); "
             + ("not told apart from it (paired difference's interval holds 0): "
                + ", ".join(span(r) for r in rows if r["run"] in ties) if ties else
                "every other block is below it (paired difference's interval below 0)") + ".",
             f"Blocks that keep {reference}'s score (verdict keeps or better, margin {margin:g} points): "
             + (", ".join(f"{span(r)} ({r['vs_reference']['verdict']})" for r in keep) if keep else "none") + "."]
    for r in rows:
        r["indistinguishable_from_best"] = r["run"] in ties
    return lines, rows


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def _bullets(lines: list[str]) -> list[str]:
    return [f"- {line}" for line in lines]


def write_report(exp: Experiment) -> Path:
    out = exp.output_dir
    settings = {"margin": MARGIN, "cost_margin": COST_MARGIN, **exp.report}
    runs = {name: load_run(out / name) for name in _trainings(exp)}
    configs = configurations(exp)
    reference = exp.reference
    others = [c for c in configs if c not in ("base", reference)]
    blocks = {n: t["block"] for n, t in exp.trainings.items() if t["role"] == "sweep"}
    evaluated = [m for m in exp.models if m != "pretrained"]
    rows = read_scores(out / "eval" / "comparison.csv", evaluated)
    ev = gather_evidence(exp, rows, configs, settings)
    leaves, left_out = leaf_keys(ev, settings)
    chance = read_chance(settings.get("chance"), [k.split("/")[0] for k in leaves])
    doc = {"experiment": str(exp.path), "reference": reference, "models": exp.models, "settings": settings,
           "configurations": {c: {str(s): m for s, m in seeds.items()} for c, seeds in configs.items()},
           "runs": runs, "verdict_tasks": leaves, "left_out": left_out, "clustering": ev.clustering}
    answers: dict[str, list[str]] = {}
    if leaves:
        answers["learned"], doc["learned"] = learned_answers(ev, leaves, reference, chance)
        answers["scores"], doc["comparisons"] = comparison_answers(ev, leaves, reference, others, settings["margin"])
    else:
        answers["scores"] = ["No verdict: no task has a 0–1 headline score with per-question results ("
                             + "; ".join(left_out) + ")."]
        doc["comparisons"] = {}
    doc["scores"] = score_rows(ev, reference, settings["margin"], leaves)
    answers["cost"], doc["cost"] = cost_answers(exp, runs, configs, others, settings["cost_margin"])
    if blocks and leaves:
        answers["sweep"], doc["sweep"] = sweep_answers(ev, leaves, blocks, reference, settings["margin"],
                                                       doc["comparisons"])
        doc["sweep_reference"] = ev.score(reference, leaves).to_dict()
    geometry_section(exp, answers, doc)
    plots.all_figures(doc, configs, reference, leaves, chance, out)
    md = markdown(exp, doc, answers, configs, chance, runs)
    report = out / "report.md"
    write_text(report, md)
    doc["verdicts"] = answers
    write_json(out / "report.json", doc)
    write_tables(out, doc, configs, runs)
    summary = [_score_table_md(doc, configs, reference, chance), "", cost_table(runs), ""]
    write_text(out / "summary.txt", "\n".join(summary + summary_lines(answers)) + "\n")
    return report


def summary_lines(answers: dict) -> list[str]:
    """Every answer, in order; another protocol's overlap verdicts ({protocol: lines}) under a line naming it."""
    out = []
    for lines in answers.values():
        if isinstance(lines, dict):
            for protocol, more in lines.items():
                out += [f"Under the {protocol} protocol:", *more]
        else:
            out += lines
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m compare.report EXPERIMENT.yaml [--set KEY=VALUE ...]: the report stage's command. Writes the
    report from the finished stages, or names the ones that are not done yet."""
    import argparse
    import sys

    from compare.experiment import ExperimentError, read_experiment
    from compare.stages import not_done_for_report

    ap = argparse.ArgumentParser(prog="python -m compare.report", description=main.__doc__.split(".")[0])
    ap.add_argument("experiment")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        exp = read_experiment(args.experiment, args.set)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = not_done_for_report(exp)
    if missing:
        print(f"error: the report reads stages that are not done: {', '.join(missing)} (python -m compare "
              f"{exp.path} --status)", file=sys.stderr)
        return 1
    print(f"report: {write_report(exp)}")
    return 0


def _trainings(exp: Experiment) -> list[str]:
    """Every training stage: the stages, then each run's and block's seeds."""
    out = []
    for name, role in exp.trainings.items():
        out += [name] if role["role"] == "stage" else list(role["seeds"].values())
    return out


def _score_table_md(doc: dict, configs: dict, reference: str, chance: dict) -> str:
    return score_table(doc["scores"], configs, reference, chance)


def _read_geometry(folder: Path) -> tuple[dict, dict, dict | None]:
    """(profiles.json, its profiles with NaN for null, the per-pair overlaps or None) of an analysis folder."""
    geometry = json.loads((folder / "profiles.json").read_text())
    profiles = {name: {int(layer): {m: math.nan if v is None else float(v) for m, v in metrics.items()}
                       for layer, metrics in per_layer.items()} for name, per_layer in geometry["profiles"].items()}
    terms = None
    if (folder / "overlap_terms.safetensors").is_file():  # absent in profiles written before it existed
        from safetensors.numpy import load_file

        terms = load_file(str(folder / "overlap_terms.safetensors"))
    return geometry, profiles, terms


def geometry_section(exp: Experiment, answers: dict, doc: dict) -> None:
    """The geometry answers (the overlap's change with an interval over the pairs; the ID shape as a description)
    under each protocol analysed, and the logit lens, where analysed."""
    out = exp.output_dir
    doc["geometry"] = doc["lens"] = None
    if exp.analysis is None:
        return
    from midtune.files import copy_file

    protocols = exp.analysis.get("protocols", ["authors"])
    geometry, profiles, terms = _read_geometry(out / "analysis")
    start = "pretrained" if "pretrained" in profiles else "base"
    configs = configurations(exp)
    runs = {n: primary_model(n, configs[n]) for n, t in exp.trainings.items()
            if t["role"] == "run"}  # each run's own seed
    steps = ([("after the stages", "base", "pretrained")] if start == "pretrained" else []) + \
            [(f"after {name}", model, "base") for name, model in runs.items() if model in profiles]
    settings = geometry["settings"]
    representation = (f"the textual twin read at position `{settings.get('position', 'last')}`"
                      if settings.get("protocol") == "authors" else "mean caption-token representation")
    answers["id"] = id_answers(profiles, reference=start, representation=representation)
    n_boot = int(exp.report.get("n_boot") or stats.N_BOOT)  # the report's own resample count, for pairs too
    answers["overlap"] = overlap_answers(profiles, steps, terms, n_boot)
    answers["overlap_other"] = {}
    for protocol in protocols[1:]:
        folder = out / f"analysis-{protocol}"
        if (folder / "profiles.json").is_file():
            _, other, other_terms = _read_geometry(folder)
            answers["overlap_other"][protocol] = overlap_answers(other, steps, other_terms, n_boot)
    copy_file(out / "analysis" / "profile.png", out / "geometry.png")
    doc["geometry"] = {"settings": geometry["settings"], "protocol": geometry["settings"].get("protocol", "describe"),
                       "other_protocols": list(answers["overlap_other"])}
    if (out / "lens" / "lens.json").exists():
        lens = json.loads((out / "lens" / "lens.json").read_text())
        answers["lens"] = lens_answers(lens)
        copy_file(out / "lens" / "lens.png", out / "lens.png")
        doc["lens"] = {"settings": lens["settings"],
                       "n_pairs": next(iter(lens["models"].values()))["n_pairs"]}


def setup_line(exp: Experiment, runs: dict[str, dict], configs: dict[str, dict]) -> str:
    setup = [f"**Base**: `{exp.models.get('pretrained', exp.models['base'])}`."]
    stage_names = [n for n, t in exp.trainings.items() if t["role"] == "stage"]
    if stage_names:
        setup.append("**Stages** (in order, each from the model the previous one made): "
                     + "; ".join(f"{n} (trains {trained(runs[n])}, {runs[n]['steps']} steps)" for n in stage_names)
                     + ". **base** below is the model they made; **pretrained** the model before them.")
    names = [n for n, t in exp.trainings.items() if t["role"] == "run"]

    def seeds(n: str) -> str:
        s = [str(k) for k in configs[n]]
        return f", seeds {', '.join(s)}" if len(s) > 1 else (f", seed {s[0]}" if s[0] != "None" else "")

    own = {n: runs[primary_model(n, configs[n])] for n in names}
    setup.append("**Runs**, all from base with the same data: " + "; ".join(
        f"**{n}** trains {trained(own[n])} ({own[n]['steps']} steps, batch {own[n]['batch_size']}, "
        f"lr {own[n]['lr']:g}{seeds(n)})" for n in names) + f". Reference: **{exp.reference}**.")
    blocks = {n: t["block"] for n, t in exp.trainings.items() if t["role"] == "sweep"}
    if blocks:
        width = {b[1] - b[0] + 1 for b in blocks.values()}
        setup.append(f"**Sweep**: {len(blocks)} blocks of {', '.join(map(str, sorted(width)))} layers: "
                     + ", ".join(f"{b[0]}–{b[1]}" for b in sorted(blocks.values())) + ".")
    ref = runs[primary_model(exp.reference, configs[exp.reference])]
    setup.append(f"Precision ({exp.reference}): {ref['precision'] or 'as configured'}."
                 + (f" Hardware expected: {exp.hardware}." if exp.hardware else ""))
    return " ".join(setup)


def method_paragraph(doc: dict, configs: dict[str, dict]) -> str:
    s = doc["settings"]
    one_seed = all(len(v) == 1 for c, v in configs.items() if c != "base")
    seeds = ("Every run trained with **one seed: seed-to-seed variation is not measured**, so the intervals cover "
             "question sampling only (a second training of the same configuration can land outside them)."
             if one_seed else
             "Runs with several seeds: the intervals add the between-seed variance (a run and the reference with "
             "the same seed saw the same data order: the difference is paired on seeds too).")
    clustered = sorted(set(doc["clustering"].values()))
    return (f"Every score is the mean of per-question results from lmms-eval's sample logs, with a 95 % interval "
            f"(± half its width); every Δ is the *paired* difference on the same questions. Questions are resampled "
            f"{' / '.join(clustered) or 'by image'} (a cluster bootstrap, {s.get('n_boot') or stats.N_BOOT} draws, "
            f"shared by all models). {seeds} Verdicts come from the difference's interval [lo, hi] and the margin "
            f"m = {s['margin']:g} points fixed in the experiment file: better (lo > 0), keeps (−m ≤ lo ≤ 0), worse "
            f"(lo < −m ≤ hi < 0), loses (hi < −m), inconclusive (lo < −m, hi ≥ 0). † no interval (see report.json). "
            f"Method: docs/compare.md.")


def markdown(exp: Experiment, doc: dict, answers: dict, configs: dict, chance: dict, runs: dict) -> str:
    reference = exp.reference
    md = [f"# {exp.name}: layer blocks vs full fine-tuning", ""]
    if exp.description:
        md += [exp.description.strip(), ""]
    limit = f" Limit: {exp.eval['limit']} documents per task." if exp.eval.get("limit") else ""
    md += [setup_line(exp, runs, configs), "", "## Scores", "",
           f"lmms-eval ({', '.join(exp.eval['tasks'])}) on base and every run, in points (metrics in [0, 1] × 100); "
           f"Δ against {reference}.{limit} " + method_paragraph(doc, configs), "",
           _score_table_md(doc, configs, reference, chance), "",
           *_bullets(answers.get("learned", []) + answers["scores"]),
           *([f"- Left out of the verdicts: {'; '.join(doc['left_out'])}."] if doc["left_out"] else []), "",
           "![scores per task with 95 % intervals](scores.png)", "",
           "![paired differences from the reference](differences.png)", "",
           "## Training cost", "",
           "Each training's own measurements (one run each: no interval): wall time (loading the model, the loop and "
           "saving `final/`), median step, tokens per second and training memory (the peak during the loop above "
           "the loaded model). The step-time verdicts come from the cost probe instead: both configurations in one "
           "process, steps alternated on the same batches, so the machine's drift cancels in each pair; a ratio's "
           f"verdict is cheaper (hi < 1), costlier (lo > 1), same (within 1 ± {doc['settings']['cost_margin']:g}) or "
           "inconclusive.", "",
           cost_table(runs), "", *_bullets(answers["cost"]), ""]
    if doc.get("sweep"):
        md += sweep_markdown(doc, answers)
    md += geometry_markdown(doc, answers)
    md += ["## Files", "",
           "Each training in its own directory (`run.json`, `metrics.jsonl`, `config.yaml`, `final/`) · `eval/` "
           "lmms-eval results and per-question samples per model · `cost/` the cost probes"
           + (" · `analysis/` geometry profiles" if doc["geometry"] else "")
           + (" · `lens/` the logit lens" if doc["lens"] else "")
           + " · `report.json` (every estimate with `ci`, n, method and verdict), `scores.csv`, `cost.csv`.", "",
           stage_time_line(exp), ""]
    return "\n".join(md)


def stage_time_line(exp: Experiment) -> str:
    """The stages' own run times, from their markers: each counted once, when it ran (a stage reused later costs
    nothing; stages that ran side by side overlap in wall time)."""
    from compare.stages import read_marker

    seconds = [(read_marker(s) or {}).get("seconds") for s in exp.stages if s.kind != "report"]
    timed = [t for t in seconds if isinstance(t, (int, float))]
    untimed = len(seconds) - len(timed)
    line = f"The {len(timed)} stages' commands ran for {sum(timed):.0f} s in all, one after another or side by side"
    return line + (f"; {untimed} finished outside compare or before it timed stages." if untimed else ".")


def sweep_markdown(doc: dict, answers: dict) -> list[str]:
    keys = doc["verdict_tasks"]
    head = ["block", *(k.split("/")[0] for k in keys), "mean", "vs reference"]
    table = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in doc["sweep"]:
        vs = r["vs_reference"]
        table.append("| " + " | ".join([f"{r['block'][0]}–{r['block'][1]}",
                                        *(_cell(r["scores"][k], False) for k in keys), _cell(r["mean"], False),
                                        f"{_cell(vs, True)} **{vs['verdict']}**"]) + " |")
    return ["## Which layers matter: the sweep", "", "\n".join(table), "", *_bullets(answers["sweep"]), "",
            "![score vs block position, with 95 % bands](sweep.png)", ""]


PROTOCOL_WORDS = {
    "authors": "authors' protocol (each image with its question beside a textual twin: its captions and the same "
               "question, in the chat template; both read at the same position)",
    "describe": "describe protocol (the image with a fixed describe prompt, mean over its tokens, beside the caption "
                "alone, mean over its tokens)",
}


def geometry_markdown(doc: dict, answers: dict) -> list[str]:
    md = []
    if doc["geometry"]:
        settings = doc["geometry"]["settings"]
        k, n_pairs = settings["k"], settings["n_pairs"]
        md += ["## Geometry", "",
               f"Per hidden state (0 = embeddings), on {n_pairs} image/caption pairs, under the "
               f"**{PROTOCOL_WORDS.get(doc['geometry']['protocol'], doc['geometry']['protocol'])}**"
               + (f", read at position `{settings['position']}`" if settings.get("position") else "") +
               f" (docs/analysis.md): the intrinsic dimension (ID) of the textual and the visual representations, and "
               f"the visual↔textual neighbourhood overlap — the fraction of each image's {k} nearest images whose "
               f"partners are also among its partner's {k} nearest (chance about {k / n_pairs:.2f}). The overlap's "
               f"change after each step has a 95 % interval from resampling the pairs (each run's first seed: pair "
               f"sampling only, not seed-to-seed variation). **The ID shape is a point estimate: a description, not "
               f"a verdict** (the figure draws each curve's band).", "",
               *_bullets(answers["id"] + answers["overlap"]), "", "![geometry](geometry.png)", ""]
        for protocol, lines in answers.get("overlap_other", {}).items():
            md += [f"The overlap's change under the **{PROTOCOL_WORDS.get(protocol, protocol)}** instead "
                   f"(`analysis-{protocol}/`):", "", *_bullets(lines), ""]
    if doc["lens"]:
        labels = " and ".join(doc["lens"]["settings"]["labels"])
        md += ["## Logit lens on the image tokens", "",
               f"Each hidden state of the image prompt decoded through the model's own final norm and unembedding, "
               f"over {doc['lens']['n_pairs']} images: the rank of the image's {labels} word, for the mean "
               f"image-token state (solid) and the best single image token (dashed); median over the images, 1 = the "
               f"top token. Point estimates, no interval.", "", *_bullets(answers["lens"]), "",
               "![logit lens](lens.png)", ""]
    return md


def write_tables(out: Path, doc: dict, configs: dict[str, dict], runs: dict[str, dict]) -> None:
    """scores.csv (each row's estimate and interval per configuration) and cost.csv (each training's measurements)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "metric", "n", "unit", "configuration", "seeds", "estimate", "ci_low", "ci_high"])
    for e in doc["scores"]:
        for c, s in e["scores"].items():
            ci = s.get("ci") or ["", ""]
            w.writerow([e["task"], e["metric"], e["n"] or "", e["unit"], c, len(configs[c]),
                        "" if s["estimate"] is None else round(s["estimate"], 4), *(
                            x if x == "" else round(x, 4) for x in ci)])
    write_text(out / "scores.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ["wall_s", "step_s", "tokens_s", "peak_mb", "trainable", "total", "steps"]
    w.writerow(["run", "trained", *keys])
    for name, r in runs.items():
        w.writerow([name, trained(r), *(r[k] for k in keys)])
    write_text(out / "cost.csv", buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
