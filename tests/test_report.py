"""compare's report from per-question results: lmms-eval sample logs read and joined on doc_id, intervals and
verdicts per run, seeds, metrics without per-question results, the sweep's best block, cost refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from compare import report, stats

TASKS = ("color", "shape")


def _write_eval(out: Path, answers: dict[str, dict[str, list[float]]], per_image: int = 2,
                extra: dict | None = None) -> None:
    """eval/<model>/samples_<task>.jsonl, results.json and eval/comparison.csv as python -m eval writes them;
    answers[model][task] = per-question 0/1 results; `per_image` questions share each image."""
    eval_dir = out / "eval"
    rows = []
    models = list(answers)
    for task in answers[models[0]]:
        rows.append({"task": task, "metric": "accuracy", "n": len(answers[models[0]][task]),
                     **{m: float(np.mean(answers[m][task])) for m in models}})
    for m, tasks in answers.items():
        d = eval_dir / m
        d.mkdir(parents=True, exist_ok=True)
        configs = {}
        for task, values in tasks.items():
            with open(d / f"samples_{task}.jsonl", "w") as fh:
                for i, v in enumerate(values):
                    doc = {"image": f"img{i // per_image}.png", "question": f"q{i}"}
                    fh.write(json.dumps({"doc_id": i, "doc": doc, "input_media": [doc["image"]],
                                         "accuracy": float(v)}) + "\n")
            configs[task] = {"metric_list": [{"metric": "accuracy", "aggregation": "mean"}]}
        (d / "results.json").write_text(json.dumps({"results": {}, "configs": configs, **(extra or {})}))
    with open(eval_dir / "comparison.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["task", "metric", "n", *models])
        w.writeheader()
        w.writerows(rows)


def _exp(out: Path, seeds: dict[str, dict], blocks: dict[str, list[int]] | None = None, **report_settings):
    trainings = {name: {"role": "run", "block": None, "seeds": s} for name, s in seeds.items()}
    for name, block in (blocks or {}).items():
        trainings[name]["role"], trainings[name]["block"] = "sweep", block
    return SimpleNamespace(output_dir=out, trainings=trainings, reference="full", report=report_settings,
                           cost_probes={}, cost_probe_skipped="report.cost_probe is false")


def _evidence(tmp_path, answers, seeds, blocks=None, **settings):
    _write_eval(tmp_path, answers)
    exp = _exp(tmp_path, seeds, blocks, **settings)
    configs = report.configurations(exp)
    rows = report.read_scores(tmp_path / "eval" / "comparison.csv", list(answers))
    return report.gather_evidence(exp, rows, configs, {"n_boot": 500, **settings}), configs


def _answers(rng, n: int, p: float) -> list[float]:
    return list((rng.random(n) < p).astype(float))


def test_a_run_identical_to_the_reference_keeps_and_a_much_worse_one_loses(tmp_path):
    rng = np.random.default_rng(0)
    full = {t: _answers(rng, 600, 0.7) for t in TASKS}  # 300 images, two questions each
    bad = {t: [v * (rng.random() < 0.6) for v in full[t]] for t in TASKS}  # loses ~28 points
    answers = {"base": {t: _answers(rng, 600, 0.2) for t in TASKS}, "full": full, "same": dict(full), "bad": bad}
    ev, configs = _evidence(tmp_path, answers, {"full": {0: "full"}, "same": {0: "same"}, "bad": {0: "bad"}})
    leaves, left_out = report.leaf_keys(ev, {})
    assert leaves == ["color/accuracy", "shape/accuracy"] and not left_out
    lines, result = report.comparison_answers(ev, leaves, "full", ["same", "bad"], margin=2.0)
    same = result["same"]["mean"]
    assert same["verdict"] == "keeps" and same["estimate"] == 0 and -2 < same["ci"][0] < 0 < same["ci"][1] < 2
    assert all(t["verdict"] == "keeps" for t in result["same"]["tasks"].values())
    assert result["bad"]["mean"]["verdict"] == "loses" and result["bad"]["mean"]["ci"][1] < -2
    assert "one seed: seed variation not measured" in lines[0] and "**keeps**" in lines[0]
    # the paired mean over tasks equals the mean of the per-task score differences
    bad_points = np.mean([100 * (np.mean(bad[t]) - np.mean(full[t])) for t in TASKS])
    assert result["bad"]["mean"]["estimate"] == pytest.approx(bad_points)
    learned, _ = report.learned_answers(ev, leaves, "full", {"color": 20.0, "shape": 33.3})
    assert "learned (its gain over the base and chance has a 95 % interval above 0) on 2 of 2 tasks" in learned[0]


def test_scores_come_from_the_sample_logs_and_carry_intervals_and_n(tmp_path):
    rng = np.random.default_rng(1)
    answers = {m: {t: _answers(rng, 200, p) for t in TASKS} for m, p in (("base", 0.3), ("full", 0.6),
                                                                          ("middle", 0.6))}
    ev, configs = _evidence(tmp_path, answers, {"full": {0: "full"}, "middle": {0: "middle"}})
    entries = report.score_rows(ev, "full", 2.0, ["color/accuracy", "shape/accuracy"])
    color = next(e for e in entries if e["task"] == "color")
    full = color["scores"]["full"]
    assert full["estimate"] == pytest.approx(100 * np.mean(answers["full"]["color"]))
    assert full["ci"][0] < full["estimate"] < full["ci"][1]
    assert full["n_questions"] == 200 and full["n_clusters"] == 100 and full["n_seeds"] == 1  # 2 per image
    assert 5 < full["ci"][1] - full["estimate"] < 12  # ±~7 points at 200 questions, 60 %
    assert color["differences"]["middle"]["verdict"] in stats.VERDICTS
    table = report.score_table(entries, configs, "full", {})
    assert "| color | accuracy | 200 |" in table and " ± " in table
    mean = entries[-1]
    assert mean["task"] == "mean over the 2 tasks" and mean["n"] == 400
    assert mean["scores"]["full"]["estimate"] == pytest.approx(
        np.mean([e["scores"]["full"]["estimate"] for e in entries[:2]]))
    assert mean["differences"]["middle"]["verdict"] in stats.VERDICTS


def test_seeds_enter_the_interval_and_pair_with_the_reference(tmp_path):
    rng = np.random.default_rng(2)
    answers = {"base": {t: _answers(rng, 200, 0.3) for t in TASKS}}
    for s, (pf, pm) in enumerate(((0.6, 0.5), (0.7, 0.75), (0.5, 0.4))):  # seeds move both a lot
        answers[f"full-seed{s}"] = {t: _answers(rng, 200, pf) for t in TASKS}
        answers[f"middle-seed{s}"] = {t: _answers(rng, 200, pm) for t in TASKS}
    seeds = {"full": {s: f"full-seed{s}" for s in range(3)}, "middle": {s: f"middle-seed{s}" for s in range(3)}}
    ev, configs = _evidence(tmp_path, answers, seeds)
    leaves, _ = report.leaf_keys(ev, {})
    _, result = report.comparison_answers(ev, leaves, "full", ["middle"], margin=2.0)
    mean = result["middle"]["mean"]
    assert mean["n_seeds"] == 3 and mean["seed_variation"] == "measured"
    assert "same seed, same data order" in mean["method"]
    one = stats.difference(ev.resampler, {0: "middle-seed0"}, {0: "full-seed0"}, leaves)
    assert mean["ci"][1] - mean["ci"][0] > one.ci[1] - one.ci[0]  # the seeds' spread widens it
    assert "(3 seeds)" in report.score_table(report.score_rows(ev, "full", 2.0, leaves), configs, "full", {})


def test_a_task_without_per_question_results_is_shown_without_an_interval_and_says_why(tmp_path):
    rng = np.random.default_rng(3)
    answers = {m: {t: _answers(rng, 50, 0.5) for t in TASKS} for m in ("base", "full", "middle")}
    _write_eval(tmp_path, answers)
    (tmp_path / "eval" / "middle" / "samples_shape.jsonl").unlink()
    exp = _exp(tmp_path, {"full": {0: "full"}, "middle": {0: "middle"}})
    configs = report.configurations(exp)
    rows = report.read_scores(tmp_path / "eval" / "comparison.csv", list(answers))
    ev = report.gather_evidence(exp, rows, configs, {"n_boot": 200})
    leaves, left_out = report.leaf_keys(ev, {})
    assert leaves == ["color/accuracy"]
    assert left_out == ["shape (no per-question results (no sample log of middle))"]
    shape = next(e for e in report.score_rows(ev, "full", 2.0, leaves) if e["task"] == "shape")
    assert shape["scores"]["middle"]["ci"] is None and "no sample log of middle" in shape["no_interval"]
    assert "| shape | accuracy | 50 | 50.0†" in report.score_table([shape], configs, "full", {}) or \
        "†" in report.score_table([shape], configs, "full", {})


def test_sample_logs_that_do_not_give_lmms_evals_score_get_no_interval(tmp_path):
    rng = np.random.default_rng(4)
    answers = {m: {"color": _answers(rng, 40, 0.5)} for m in ("base", "full")}
    _write_eval(tmp_path, answers)
    path = tmp_path / "eval" / "comparison.csv"
    lines = path.read_text().splitlines()
    lines[1] = "color,accuracy,40,0.0,1.0"  # not what the logs give
    path.write_text("\n".join(lines) + "\n")
    exp = _exp(tmp_path, {"full": {0: "full"}})
    rows = report.read_scores(path, ["base", "full"])
    ev = report.gather_evidence(exp, rows, report.configurations(exp), {"n_boot": 100})
    assert not ev.has("color/accuracy") and "different questions?" in ev.why["color/accuracy"]


def test_the_sweep_names_its_best_block_with_an_interval_and_those_it_cannot_be_told_from(tmp_path):
    rng = np.random.default_rng(5)
    full = {t: _answers(rng, 400, 0.7) for t in TASKS}

    def flip(values, p):
        return [1 - v if rng.random() < p else v for v in values]

    answers = {"base": {t: _answers(rng, 400, 0.2) for t in TASKS}, "full": full,
               "layers_0-1": {t: [v * (rng.random() < 0.5) for v in full[t]] for t in TASKS},  # far below
               "layers_2-3": {t: flip(full[t], 0.02) for t in TASKS},
               "layers_4-5": {t: flip(full[t], 0.03) for t in TASKS}}
    seeds = {n: {0: n} for n in answers if n != "base"}
    blocks = {"layers_0-1": [0, 1], "layers_2-3": [2, 3], "layers_4-5": [4, 5]}
    ev, configs = _evidence(tmp_path, answers, seeds, blocks)
    leaves, _ = report.leaf_keys(ev, {})
    others = list(blocks)
    _, comparisons = report.comparison_answers(ev, leaves, "full", others, 2.0)
    lines, rows = report.sweep_answers(ev, leaves, blocks, "full", 2.0, comparisons)
    best = max(rows, key=lambda r: r["mean"]["estimate"])
    assert best["run"] in ("layers_2-3", "layers_4-5")
    assert lines[0].startswith(f"Highest mean over the 2 tasks: layers {best['block'][0]}–{best['block'][1]}")
    assert "not told apart from it" in lines[0] and "0–1" not in lines[0].split("not told apart")[1]
    assert not next(r for r in rows if r["run"] == "layers_0-1")["indistinguishable_from_best"]
    assert "0–1" not in lines[1] and comparisons["layers_0-1"]["mean"]["verdict"] == "loses"


def _run(setup: dict, **changes) -> dict:
    base = {"step_s": 1.0, "wall_s": 10.0, "peak_mb": 100.0, "trainable": 10, "total": 20, "steps": 5,
            "layers": [0], "num_layers": 2, "components": [], "tokens_s": 1.0, "resumed": False,
            "setup": {"distributed_type": "NO", "world_size": 1, "device": "cpu", "mixed_precision": "bf16",
                      "batch_size": 8, "grad_accum": 1, "max_length": 2048, **setup}}
    return {**base, **changes}


def test_a_cost_comparison_across_backends_or_batch_shapes_is_refused_with_the_reason(tmp_path):
    exp = SimpleNamespace(reference="full", cost_probes={}, cost_probe_skipped="report.cost_probe is false")
    configs = {"base": {None: "base"}, "full": {0: "full"}, "zero3": {0: "zero3"}, "same": {0: "same"}}
    runs = {"full": _run({}), "zero3": _run({"distributed_type": "DEEPSPEED", "world_size": 8}),
            "same": _run({}, trainable=5)}
    lines, result = report.cost_answers(exp, runs, configs, ["zero3", "same"], 0.05)
    assert result["zero3"]["verdict"] == "refused"
    assert "distributed_type 'DEEPSPEED' vs 'NO'" in lines[0] and "world_size 8 vs 1" in lines[0]
    assert result["same"]["verdict"] == "not measured" and "no cost probe: report.cost_probe is false" in lines[1]
    assert "trainable parameters 0.50×" in lines[1]


def test_cost_verdicts_come_from_the_probes_alternated_steps(tmp_path):
    rng = np.random.default_rng(6)
    drift = np.exp(np.cumsum(rng.normal(0, 0.1, 12)))
    probe = tmp_path / "cost" / "middle"
    probe.mkdir(parents=True)
    (probe / "probe.json").write_text(json.dumps({"runs": {
        "full": {"step_times": list(2.0 * drift)}, "middle": {"step_times": list(1.3 * drift * 1.01)}},
        "settings": {"steps": 12}}))
    exp = SimpleNamespace(reference="full", cost_probes={"middle": str(probe)}, cost_probe_skipped=None)
    runs = {"full": _run({}), "middle": _run({}, step_s=1.2)}
    lines, result = report.cost_answers(exp, runs, {"full": {0: "full"}, "middle": {0: "middle"}}, ["middle"], 0.05)
    assert result["middle"]["verdict"] == "cheaper"
    assert result["middle"]["step_ratio"]["estimate"] == pytest.approx(1.3 * 1.01 / 2.0)
    assert "step time 0.66×, 95 % interval [0.66, 0.66] (12 steps of each" in lines[0]
