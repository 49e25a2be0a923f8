"""The compare app: experiment files checked before anything runs, stage reuse and resumption, the report's
verdicts, and a small experiment on tiny models run end to end (the demo's own experiment runs with `make demo`;
a quick version of it runs here as a slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from compare import __main__ as compare_cli
from compare import geometry, report
from compare.__main__ import main as compare_main
from compare.experiment import ExperimentError, fingerprint_files, read_experiment
from conftest import experiment_file
from midtune.shapes import generate_world

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("color", "shape", "count", "position", "exists")
CHANCE = {"color": 20.0, "shape": 100 / 3, "count": 25.0, "position": 100 / 9, "exists": 50.0}


def _run(step_s, wall_s, peak_mb, trainable):
    return {"step_s": step_s, "wall_s": wall_s, "peak_mb": peak_mb, "trainable": trainable, "total": 2_000_000,
            "steps": 150, "layers": [0, 1], "num_layers": 4, "components": [], "tokens_s": 1234.0}


RUNS = {"full": _run(0.30, 50.0, 1000.0, 1_600_000), "middle": _run(0.21, 36.0, 900.0, 800_000)}


def test_chance_levels_come_from_the_worlds_choices(world, tmp_path):
    tasks = [f"midtune_shapes_{q}" for q in TASKS]
    chance = report.read_chance(str(world / "world.json"), tasks)
    assert chance == pytest.approx({f"midtune_shapes_{q}": v for q, v in CHANCE.items()})
    generate_world(tmp_path / "g2", seed=1, n_train=8, n_val=2, n_test=4, image_size=32, grid=2, max_objects=3,
                   progress=False)
    small = report.read_chance(str(tmp_path / "g2" / "world.json"), tasks)
    assert small["midtune_shapes_count"] == pytest.approx(100 / 3) and small["midtune_shapes_position"] == 25.0
    assert report.read_chance({"my_task": 0.25}, ["my_task"]) == {"my_task": 25.0}


def test_the_cost_table_gives_each_trainings_own_measurements():
    table = report.cost_table({"align": {**_run(0.1, 9.0, 50.0, 300), "layers": [], "components": ["projector"]},
                               **RUNS})
    assert "| align | projector | 150 | 9 | 0.10 | 1234 | 50 | 0.3K (0%) |" in table
    assert "| middle | LLM layers 0–1 of 4 |" in table


def _profile(values: list[float], metric: str) -> dict[int, dict[str, float]]:
    return {layer: {metric: v} for layer, v in enumerate(values)}


def test_id_answer_finds_the_expansion_contraction_shape_and_its_minimum():
    # 13 hidden states (12 layers): up to a peak at 3, down to a minimum at 8, up again at the end
    ids = [6, 10, 14, 18, 15, 12, 10, 8, 7, 9, 11, 12, 12]
    profiles = {"pretrained": _profile(ids, "textual_id"), "base": _profile(ids, "textual_id"),
                "full": _profile([v + (3 if i == 6 else 0) for i, v in enumerate(ids)], "textual_id")}
    lines = geometry.id_answers(profiles)
    assert "6.0 at the embeddings, lowest 6.0 at hidden state 0 before the peak, peak 18.0 at hidden state 3 (early)" \
        in lines[0]
    assert "minimum of 7.0 at hidden state 8 (intermediate)" in lines[0]
    assert "Valeriani et al. 2023: reproduced" in lines[0]
    assert lines[1] == "ID profile of base: identical to pretrained's (the LLM did not change)."
    assert "ID profile of full: largest change +3.0 at hidden state 6 (intermediate)" in lines[2]


def test_id_answer_says_when_the_shape_is_not_there():
    flat = {"pretrained": _profile([10, 10.5, 11, 11, 11.2, 11.5, 12], "textual_id")}
    line = geometry.id_answers(flat)[0]
    assert "NOT reproduced (no expansion, no contraction after the peak" in line
    rising = {"pretrained": _profile([5, 8, 11, 14, 17, 20, 23], "textual_id")}  # the peak is the last layer
    assert "NOT reproduced (no contraction after the peak" in geometry.id_answers(rising)[0]
    # SmolLM2's shape: the embeddings' ID above the next layers'; expansion counts from the dip after them
    dip = {"pretrained": _profile([8.8, 7.7, 7.3, 8.0, 9.0, 10.0, 10.8, 9.0, 7.0, 6.8, 6.9], "textual_id")}
    line = geometry.id_answers(dip)[0]
    assert "lowest 7.3 at hidden state 2 before the peak, peak 10.8 at hidden state 6" in line
    assert "Valeriani et al. 2023: reproduced" in line


def test_overlap_answers_locate_the_rise_after_the_stages_and_after_each_run():
    n = 10  # hidden states 0..9; thirds of 1..9 by depth: early 1-3, intermediate 4-6, late 7-9
    pretrained = _profile([0.1] * n, "vt_overlap")
    base = _profile([0.1, 0.1, 0.1, 0.1, 0.3, 0.4, 0.3, 0.12, 0.1, 0.1], "vt_overlap")
    full = _profile([0.1, 0.1, 0.1, 0.1, 0.3, 0.4, 0.3, 0.12, 0.5, 0.6], "vt_overlap")  # rises late only
    middle = _profile([0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.2, 0.12, 0.1, 0.1], "vt_overlap")  # falls
    steps = [("after the stages", "base", "pretrained"), ("after full", "full", "base"),
             ("after middle", "middle", "base")]
    profiles = {"pretrained": pretrained, "base": base, "full": full, "middle": middle}
    lines = geometry.overlap_answers(profiles, steps)  # no per-pair overlaps: point estimates, no verdict
    assert lines[0].startswith("Visual↔textual overlap after the stages (base vs pretrained): no verdict")
    assert "intermediate +0.233" in lines[0] and "largest rise +0.300 at hidden state 5 (intermediate)" in lines[0]
    assert "peak at hidden state 1 before, 5 after" in lines[0]  # hidden state 0 (the embeddings) left out

    # Per-pair overlaps whose means are the curves above, with pair-to-pair noise: intervals and verdicts.
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, size=(n, 200))
    terms = {name: np.array([[p[layer]["vt_overlap"]] for layer in range(n)]) + noise
             for name, p in profiles.items()}
    lines = geometry.overlap_answers(profiles, steps, terms)
    assert "(base vs pretrained): **rises** — rises in the intermediate layers, most there" in lines[0]
    assert "over 2000 resamples of the 200 pairs" in lines[0]
    assert "(full vs base): **unchanged**" in lines[1] and "largest rise +0.500 at hidden state 9 (late)" in lines[1]
    assert "(middle vs base): **falls**" in lines[2] and "intermediate -0.100 [" in lines[2]
    # Independent noise per model, ten pairs: the rise of +0.02 is not told from zero.
    small = {"a": _profile([0.1] * n, "vt_overlap"), "b": _profile([0.1] + [0.12] * (n - 1), "vt_overlap")}
    noisy = {"a": 0.1 + rng.normal(0, 0.2, (n, 10)), "b": 0.12 + rng.normal(0, 0.2, (n, 10))}
    (line,) = geometry.overlap_answers(small, [("after b", "b", "a")], noisy)
    assert "**inconclusive**" in line
    ci = geometry.overlap_change(small, "b", "a", noisy)["intervals"]["intermediate"]
    assert ci[0] < 0 < ci[1]
    assert geometry.overlap_verdict((-0.01, 0.015)) == "unchanged"


def test_summary_names_the_protocol_of_each_further_set_of_verdicts():
    answers = {"id": ["ID line"], "overlap": ["overlap line"], "overlap_other": {"describe": ["its line"]},
               "lens": ["lens line"]}
    assert report.summary_lines(answers) == ["ID line", "overlap line", "Under the describe protocol:", "its line",
                                             "lens line"]


def _lens_doc(ranks: dict[str, list[float]], top_k: int = 10) -> dict:
    """A lens.json with one concept; `ranks`: model → median ranks per hidden state (the best image token's are
    half those); the share of images in the top k is taken as 0.8 where the median is inside it, else 0.2."""
    def readout(r):
        share = [0.8 if v <= top_k else 0.2 for v in r]
        first = next((i for i, f in enumerate(share) if f >= 0.5), None)
        return {"median_rank": r, "top_k_fraction": share, "first_top_k_layer": first}

    return {"settings": {"top_k": top_k, "labels": ["dominant_color"]},
            "models": {name: {"num_layers": len(r) - 1, "concepts": {"dominant_color": {
                "mean_image": readout(r), "best_image_token": readout([v / 2 for v in r])}}}
                       for name, r in ranks.items()}}


def test_lens_answers_say_where_the_words_surface():
    late = [900, 800, 700, 600, 500, 400, 300, 100, 16, 4]  # hidden states 0..9; intermediate = 4..6
    lines = geometry.lens_answers(_lens_doc({"base": late, "middle": late}))
    assert lines[0] == ("dominant_color: the word is in the top 10 for half the images or more — base: mean image "
                        "state from hidden state 9, best image token from hidden state 8; middle: mean image state "
                        "from hidden state 9, best image token from hidden state 8.")
    assert "intermediate layers (hidden states 4–6): NOT reproduced — at its best intermediate hidden state the word " \
           "is in the top 10 for 20% of the images (median rank 150: base, dominant_color, best image token, " \
           "hidden state 6)" in lines[1]
    early = [900, 800, 700, 600, 30, 8, 6, 5, 4, 3]
    lines = geometry.lens_answers(_lens_doc({"base": late, "middle": early}))
    assert "intermediate layers (hidden states 4–6): yes — in the top 10 for 80% of the images (middle, " \
           "dominant_color, best image token, hidden state 6; median rank 3)" in lines[1]
    assert "middle: mean image state from hidden state 5" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# Experiment files
# ---------------------------------------------------------------------------------------------------------


def test_bad_experiment_files_get_one_clear_error_before_anything_runs(tiny_dir, world, tmp_path, capsys):
    model = tiny_dir("llava")
    cases = [
        ({"rnus": {"a": {}}}, "unknown key 'rnus'; did you mean 'runs'?"),
        ({"eval": {"tasks": ["x"], "limt": 3}}, "unknown key eval.'limt'; did you mean 'limit'?"),
        ({"runs": {"full": {}, "frozen": {"trainable.layers": "none"}}},
         "runs.frozen trainable: nothing would train (no LLM layers and every component off)"),
        ({"base": str(tmp_path / "no-such-model")}, f"base: model '{tmp_path / 'no-such-model'}' does not exist"),
        ({"base": None}, "missing key 'base'"),
        ({"data": "{wrld}/train.json"}, "data: unknown placeholder {wrld}"),
        ({"runs": {"full": {}, "base": {}}}, "name 'base' is reserved or used twice"),
        ({"reference": "fll"}, "reference: 'fll' is not one of the runs (full, middle)"),
        ({"sweep": {"width": 9, "stride": 1}}, "sweep.width 9 is more than the model's 4 LLM layers"),
        ({"launch": {"with": "srun"}}, "launch.with: 'srun' is not 'python' or 'accelerate'"),
        ({"base": f"{model}@{model}"}, "training starts from a model directory or hub id, not a delta"),
        ({"runs": None, "sweep": {"width": 2, "stride": 2}}, "no runs: name at least the reference run"),
        ({"data": "{output_dir.x}/train.json"}, "not a plain {placeholder}"),
        ({"seeds": [0, 0]}, "seeds must be a list of distinct integers"),
        ({"runs": {"full": {"seeds": ["a"]}}}, "runs.full.seeds must be a list of distinct integers"),
        ({"report": {"margin": -1}}, "report.margin must be a number ≥ 0"),
        ({"report": {"keeps": 2}}, "unknown key report.'keeps'"),
    ]
    for change, message in cases:
        path = experiment_file(tmp_path, model, world, **change)
        with pytest.raises(ExperimentError, match=None) as e:
            read_experiment(path)
        assert message in str(e.value) and str(path) in str(e.value), (message, str(e.value))
        assert compare_main([str(path)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_a_bad_train_key_in_the_last_run_fails_before_the_first_stage(tiny_dir, world, tmp_path, capsys):
    path = experiment_file(tmp_path, tiny_dir("llava"), world,
                           runs={"full": {}, "middle": {"trainable.layers": "1-2", "optim.lrr": 1e-3}})
    assert compare_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: middle: override 'optim.lrr=0.001': unknown key 'optim.lrr'; did you mean 'optim.lr'?" \
        in err
    assert not (tmp_path / "out").exists()


def test_stages_read_what_their_commands_name_and_overrides_merge_key_by_key(tiny_dir, world, tmp_path):
    path = experiment_file(tmp_path, tiny_dir("llava"), world, prepare={"world": {"command": ["python", "-c", "pass"]}},
                           data="{world}/train.json", train_overrides={"trainable": {"norm": True}, "max_steps": 3},
                           runs={"full": {}, "middle": {"trainable": {"layers": "1-2"}, "data": "{world}/other.json"}})
    exp = read_experiment(path)
    stages = {s.name: s for s in exp.stages}
    assert stages["full"].after == ["world"] and stages["middle"].after == ["world"]  # its data lives under {world}
    middle = stages["middle"].command
    assert "trainable.norm=true" in middle and "trainable.layers=1-2" in middle and "max_steps=3" in middle
    assert f"data={tmp_path / 'out' / 'world' / 'other.json'}" in middle  # the run's own data wins
    assert not any(w.startswith("data=") and w.endswith("train.json") for w in middle)


def test_fast_dtype_is_bfloat16_only_where_the_machine_runs_it_natively(tiny_dir, world, tmp_path, monkeypatch):
    import torch

    from midtune import sources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # AVX2 only: emulated bf16
    assert sources.fast_dtype() == "float32"
    path = experiment_file(tmp_path, tiny_dir("llava"), world, train_overrides={"dtype": "{fast_dtype}"},
                           eval={"tasks": ["midtune_shapes_color"], "dtype": "{fast_dtype}"})
    stages = {s.name: s for s in read_experiment(path).stages}
    assert "dtype=float32" in stages["full"].command and "float32" in stages["eval/base"].command
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # AMX / AVX512-BF16
    assert sources.fast_dtype() == "bfloat16"
    assert "dtype=bfloat16" in {s.name: s for s in read_experiment(path).stages}["full"].command


def test_force_with_only_redoes_the_named_stages_and_invalidates_what_reads_them(tiny_dir, world, tmp_path,
                                                                                 monkeypatch):
    from compare import stages as runner

    ran = []
    monkeypatch.setattr(runner, "run_command", lambda command, **_: ran.append(command) or 0)
    path = experiment_file(tmp_path, tiny_dir("llava"), world)
    exp = read_experiment(path)
    for stage in exp.stages:
        runner.run_stage(stage, exp, force=False)
    ran.clear()
    assert compare_main([str(path), "--only", "middle", "--force"]) == 0
    assert [c[c.index("-m") + 1] for c in ran] == ["train", "eval"]  # middle and eval/middle, nothing upstream
    # the table is out of date, and the report that reads it
    assert [s.name for s in exp.stages if not runner.is_done(s, exp)] == ["eval", "report"]


def test_the_headline_metric_is_the_tasks_own_summary_or_the_one_named():
    rows = [{"task": "mmstar", "metric": m, "leaf": True, "unit": "points", "values": {}}
            for m in ("coarse perception", "math", "average")]
    rows.append({"task": "pope", "metric": "accuracy", "leaf": True, "unit": "points", "values": {}})
    assert report.primary(rows)["mmstar"]["metric"] == "average"
    assert report.primary(rows, {"mmstar": "math"})["mmstar"]["metric"] == "math"
    assert report.primary(rows)["pope"]["metric"] == "accuracy"


def test_a_resumed_run_is_marked_in_the_cost_table():
    resumed = {"full": RUNS["full"], "middle": {**RUNS["middle"], "resumed": True}}
    assert "| middle (resumed) |" in report.cost_table(resumed)
    assert not report.timed_whole(resumed["middle"]) and report.timed_whole(resumed["full"])


def test_print_commands_lists_every_stage_in_order_with_a_sweep_and_accelerate(tiny_dir, world, tmp_path, capsys):
    path = experiment_file(tmp_path, tiny_dir("llava"), world, sweep={"width": 2, "stride": 2},
                           launch={"with": "accelerate", "config_file": str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
                               "num_processes": 2})
    assert compare_main([str(path), "--print-commands"]) == 0
    out = capsys.readouterr().out
    stages = [line.split("]")[0].removeprefix("# [") for line in out.splitlines() if line.startswith("# [")]
    assert stages == ["full", "middle", "layers_0-1", "layers_2-3", "eval/base", "eval/full", "eval/middle",
                      "eval/layers_0-1", "eval/layers_2-3", "eval", "report"]
    assert "-m accelerate.commands.launch --config_file" in out and "--num_processes 2 -m train --config" in out
    assert "trainable.layers=2-3" in out and "trainable.layers=1-2" in out
    assert not (tmp_path / "out").exists()
    exp = read_experiment(path)
    assert exp.trainings["layers_2-3"] == {"role": "sweep", "block": [2, 3], "num_layers": 4,
                                           "seeds": {0: "layers_2-3"}}
    assert not exp.cost_probes and "launch 2 processes" in exp.cost_probe_skipped


def test_seeds_are_an_axis_each_seed_a_training_of_its_own(tiny_dir, world, tmp_path, monkeypatch, capsys):
    """seeds: [0, 1] (the config's own seed is 0), middle with its own three: each (run, seed) trains and is
    evaluated as a stage; the same seed gives both runs the same `seed=` (the same data order)."""
    from compare import stages as runner

    path = experiment_file(tmp_path, tiny_dir("llava"), world, seeds=[0, 1],
                           runs={"full": {}, "middle": {"trainable.layers": "1-2", "seeds": [0, 1, 2]}},
                           analysis={"pairs": str(world / "pairs.jsonl")})
    exp = read_experiment(path)
    stages = {s.name: s for s in exp.stages}
    assert [s.name for s in exp.stages if s.kind == "train"] == ["full", "full-seed1", "middle", "middle-seed1",
                                                                 "middle-seed2"]
    assert exp.trainings["full"]["seeds"] == {0: "full", 1: "full-seed1"}
    assert not any(w.startswith("seed=") for w in stages["full"].command)  # the config's own seed: the run itself
    assert "seed=1" in stages["full-seed1"].command and "seed=1" in stages["middle-seed1"].command
    assert {"eval/full-seed1", "eval/middle-seed2", "cost/middle"} <= set(stages)
    analysed = " ".join(stages["analysis"].command)
    assert "--model=full=" in analysed and "seed1" not in analysed  # geometry: each run's own seed
    assert "--protocol authors" in analysed and "analysis-describe" not in stages  # one protocol by default
    assert compare_main([str(path), "--print-commands"]) == 0
    assert "# [middle-seed2] to run" in capsys.readouterr().out
    assert compare_cli.named(exp, ["middle"]) == {"middle", "middle-seed1", "middle-seed2", "eval/middle",
                                             "eval/middle-seed1", "eval/middle-seed2"}

    calls = []

    def fake_run(command, **_):
        calls.append(command)
        return 1 if "seed=2" in command and len([c for c in calls if "seed=2" in c]) == 1 else 0

    monkeypatch.setattr(runner, "run_command", fake_run)

    def invocation() -> dict[str, str]:
        exp = read_experiment(path)
        out = {}
        for s in exp.stages:
            try:
                out[s.name] = runner.run_stage(s, exp, force=False)
            except runner.StageFailed:
                out[s.name] = "failed"
                (s.out / "checkpoint-1").mkdir()  # what the cut-short training had saved
        return out

    first = invocation()
    assert first["middle-seed2"] == "failed" and first["full-seed1"] == "ran"
    second = invocation()
    assert second["middle-seed2"] == "resumed"
    assert [c for c in calls if "seed=2" in c and "-m" in c and c[c.index("-m") + 1] == "train"][-1][-1] == \
        "resume_from=latest"
    assert second["full-seed1"] == "reused" and second["middle"] == "reused"
    # a third seed for everything later: only its trainings, their evals and the table run
    doc = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**doc, "seeds": [0, 1, 3]}, sort_keys=False))
    third = invocation()
    assert sorted(k for k, v in third.items() if v != "reused") == ["eval", "eval/full-seed3", "full-seed3", "report"]


def _task_dir(tmp_path: Path, world: Path) -> Path:
    """An lmms-eval task of the user's own (not midtune's), found through include_path: name a pair's colour."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()][:3]
    (tasks / "colour.jsonl").write_text("".join(
        json.dumps({"image": str(world / "images" / r["image"]), "question": "what colour is it?",
                    "answer": r["labels"]["dominant_color"]}) + "\n" for r in rows))
    (tasks / "utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    with Image.open(doc['image']) as im:\n"
        "        return [im.convert('RGB')]\n\n\ndef doc_to_text(doc, lmms_eval_specific_kwargs=None):\n"
        "    return doc['question']\n\n\ndef process_results(doc, results):\n"
        "    return {'accuracy': float((results[0] if results else '').strip() == doc['answer'])}\n")
    (tasks / "my_colour.yaml").write_text(
        f"task: my_colour\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'colour.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_new_tokens: 4\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def _stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob(".midtune-*.json")}


@pytest.mark.slow
def test_a_small_experiment_on_tiny_models_end_to_end(tiny_dir, world, tmp_path, capsys):
    """Two runs and a two-block sweep from a tiny llava and an lmms-eval task of the user's own from include_path;
    the report's numbers are the runs' own; an interrupted experiment resumes. (The quick demo below covers the
    geometry and the logit lens.)"""
    tasks = _task_dir(tmp_path, world)
    path = experiment_file(tmp_path, tiny_dir("llava"), world, sweep={"width": 2, "stride": 2},
                           eval={"tasks": ["my_colour", "midtune_shapes_color"], "limit": 3, "batch_size": 4,
                             "include_path": str(tasks)}, report={"cost_probe": {"warmup": 0, "steps": 2}})
    out = tmp_path / "out"
    # "Interrupted" after the full run: only it (and its eval) ran.
    assert compare_main([str(path), "--only", "full"]) == 0
    assert sorted(_stamps(out)) == ["eval/full/.midtune-stage.json", "full/.midtune-stage.json"]
    first = _stamps(out)
    assert compare_main([str(path)]) == 0
    log = capsys.readouterr().out
    assert "[full] reusing" in log and "[eval/full] reusing" in log and "[middle] building" in log
    assert all(_stamps(out)[k] == v for k, v in first.items())  # the finished stages were not redone

    doc = json.loads((out / "report.json").read_text())
    models = ["base", "full", "middle", "layers_0-1", "layers_2-3"]
    assert list(doc["models"]) == models
    for model in models:
        results = json.loads((out / "eval" / model / "results.json").read_text())["results"]
        for row in doc["scores"]:
            if row["metric"] == "accuracy" and row["task"] in results:
                assert row["scores"][model]["estimate"] == pytest.approx(100 * results[row["task"]]["accuracy,none"])
    assert {r["task"] for r in doc["scores"]} == {"my_colour", "midtune_shapes_color", "mean over the 2 tasks"}
    for name in ("full", "middle", "layers_0-1", "layers_2-3"):
        run = json.loads((out / name / "run.json").read_text())
        assert doc["runs"][name]["wall_s"] == run["wall_time_s"]
        assert doc["runs"][name]["step_s"] == run["median_step_time_s"]
        assert doc["runs"][name]["trainable"] == run["parameters"]["trainable"]
        assert doc["runs"][name]["layers"] == run["plan"]["trainable_layers"]
    assert doc["runs"]["middle"]["layers"] == [1, 2] and doc["runs"]["layers_2-3"]["layers"] == [2, 3]
    assert [r["block"] for r in doc["sweep"]] == [[0, 1], [2, 3]]
    md = (out / "report.md").read_text()
    assert "## Which layers matter: the sweep" in md and "## Geometry" not in md
    # every score with its interval from the sample logs, every comparison with a verdict, every cost ratio too
    for row in doc["scores"]:
        if row["leaf"] and row["task"] == "midtune_shapes_color":
            assert all(s["ci"] is not None for s in row["scores"].values())
    for name in ("middle", "layers_0-1", "layers_2-3"):
        assert doc["comparisons"][name]["mean"]["verdict"] in ("better", "keeps", "worse", "loses", "inconclusive")
        assert doc["cost"][name]["verdict"] in ("cheaper", "same", "costlier", "inconclusive")
        probe = json.loads((out / "cost" / name / "probe.json").read_text())
        assert len(probe["runs"][name]["step_times"]) == 2 and probe["settings"]["same_batches"]
    assert "one seed: seed variation not measured" in md
    for png in ("scores.png", "differences.png", "sweep.png"):
        assert (out / png).stat().st_size > 5_000

    stamps = _stamps(out)
    assert compare_main([str(path)]) == 0  # everything reused: no stage rewrites its marker
    assert _stamps(out) == stamps


def test_a_changed_run_redoes_only_itself_its_eval_and_the_table(tiny_dir, world, tmp_path, monkeypatch):
    from compare import stages as runner

    monkeypatch.setattr(runner, "run_command", lambda command, **_: 0)
    path = experiment_file(tmp_path, tiny_dir("llava"), world, sweep={"width": 2, "stride": 2},
                           analysis={"pairs": str(world / "pairs.jsonl")})

    def invocation() -> dict[str, str]:
        exp = read_experiment(path)
        return {s.name: runner.run_stage(s, exp, force=False) for s in exp.stages}

    assert set(invocation().values()) == {"ran"}
    assert set(invocation().values()) == {"reused"}
    path.write_text(path.read_text().replace("trainable.layers: 1-2", "trainable.layers: 1-3"))
    redone = sorted(k for k, v in invocation().items() if v == "ran")
    assert redone == ["analysis", "cost/middle", "eval", "eval/middle", "middle", "report"]
    path.write_text(path.read_text().replace("limit: 2", "limit: 3"))  # every eval, nothing trained
    assert sorted(k for k, v in invocation().items() if v == "ran") == [
        "eval", "eval/base", "eval/full", "eval/layers_0-1", "eval/layers_2-3", "eval/middle", "report"]


def test_a_training_cut_short_resumes_from_its_checkpoint(tiny_dir, world, tmp_path, monkeypatch):
    """A run with the same inputs and a checkpoint on disk continues (resume_from=latest), not from scratch."""
    from compare import stages as runner

    path = experiment_file(tmp_path, tiny_dir("llava"), world)
    exp = read_experiment(path)
    full = next(s for s in exp.stages if s.name == "full")
    calls = []

    def fake_run(command, **_):
        calls.append(command)
        return 1 if len(calls) == 1 else 0

    monkeypatch.setattr(runner, "run_command", fake_run)
    with pytest.raises(runner.StageFailed, match="stage 'full' failed"):
        runner.run_stage(full, exp, force=False)
    (full.out / "checkpoint-1").mkdir()  # what the interrupted training had saved
    assert runner.run_stage(full, exp, force=False) == "resumed"
    assert calls[1][-1] == "resume_from=latest" and (full.out / "checkpoint-1").exists()
    assert runner.run_stage(full, exp, force=False) == "reused"
    assert runner.run_stage(full, exp, force=True) == "ran" and calls[2][-1] != "resume_from=latest"
    assert not (full.out / "checkpoint-1").exists()  # --force starts over


def test_results_of_jobs_run_outside_compare_are_picked_up(tiny_dir, world, tmp_path, monkeypatch):
    """--print-commands hands the stages to a scheduler; the next compare takes what they finished."""
    from compare import stages as runner

    path = experiment_file(tmp_path, tiny_dir("llava"), world)
    exp = read_experiment(path)
    full = next(s for s in exp.stages if s.name == "full")
    (full.out / "final").mkdir(parents=True)
    (full.out / "final" / "config.json").write_text("{}")
    (full.out / "run.json").write_text("{}")
    monkeypatch.setattr(runner, "run_command", lambda command, **_: pytest.fail(f"ran {command}"))
    assert runner.run_stage(full, exp, force=False) == "picked up"
    assert runner.run_stage(full, exp, force=False) == "reused"


def test_a_kept_directory_is_not_taken_for_a_finished_stage(tiny_dir, world, tmp_path, monkeypatch):
    """The analysis directory is kept when redone (its per-model extractions are reused); an earlier result in it
    must not be picked up as this run's when the new run is cut short."""
    from compare import stages as runner

    path = experiment_file(tmp_path, tiny_dir("llava"), world, analysis={"pairs": str(world / "pairs.jsonl")})
    exp = read_experiment(path)
    analysis = next(s for s in exp.stages if s.name == "analysis")
    (analysis.out / "extract").mkdir(parents=True)
    (analysis.out / "profiles.json").write_text("{}")
    analysis.marker.write_text('{"record": "an earlier run\'s", "finished": 0}')
    monkeypatch.setattr(runner, "run_command", lambda command, **_: 1)
    with pytest.raises(runner.StageFailed):
        runner.run_stage(analysis, exp, force=False)
    assert (analysis.out / "extract").is_dir() and not (analysis.out / "profiles.json").exists()
    monkeypatch.setattr(runner, "run_command", lambda command, **_: 0)
    assert runner.run_stage(analysis, exp, force=False) == "ran"


@pytest.mark.slow
def test_quick_demo_experiment_writes_the_report(tmp_path):
    """The demo's own experiment file — world, vision tower, compose from SmolLM2's GGUF, alignment, full and middle
    instruction tuning, lmms-eval, geometry, logit lens, the report — with its sizes shrunk by --set: checks the
    wiring, not the learning (that is `make demo`)."""
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    quick = ["--set", f"output_dir={out}", "--set", "vars.n_train=200", "--set", "vars.n_val=10",
             "--set", "vars.n_test=60", "--set", "vars.vision_steps=5", "--set", "train_overrides.max_steps=2",
             "--set", "train_overrides.batch_size=2", "--set", "eval.limit=4",
             "--set", "analysis.args=[--no-idcorr, --k, 5, --max-pairs, 24, --gride-rank, 4]",
             "--set", "analysis.protocol=[authors, describe]",  # what `make demo PROTOCOLS="authors, describe"` sets
             "--set", "analysis.lens_args=[--max-pairs, 8]",
             "--set", "report.cost_probe={warmup: 0, steps: 2}"]
    assert compare_main([str(ROOT / "configs/experiments/demo.yaml"), *quick]) == 0
    md = (out / "report.md").read_text()
    for model in ("base", "full", "middle"):
        assert f"| {model} |" in md
    for section in ("## Scores", "## Training cost", "## Geometry", "## Logit lens on the image tokens"):
        assert section in md
    assert "Visual features readable as the words they depict in the intermediate layers" in md
    assert "ID profile of pretrained on the captions" in md
    assert "ID profile of base: identical to pretrained's" in md  # alignment leaves the LLM as it was
    assert "overlap after the stages (base vs pretrained)" in md
    assert "under the **authors' protocol" in md and "read at position `last`" in md
    assert "The overlap's change under the **describe protocol" in md  # the demo's second protocol
    assert md.count("95 % interval over 2000 resamples of the 24 pairs") == 6  # 3 steps × 2 protocols
    assert "| middle | LLM layers 7–21 of 30 |" in md and "| align | projector |" in md
    assert "| midtune_shapes_color | accuracy | 4 | 20.0 |" in md  # chance from the world's choices
    assert "middle vs full: step time" in md and "alternated in one process" in md
    for png in ("geometry.png", "scores.png", "differences.png", "lens.png"):
        assert (out / png).stat().st_size > 10_000
    stamps = _stamps(out)
    assert compare_main([str(ROOT / "configs/experiments/demo.yaml"), *quick]) == 0
    assert _stamps(out) == stamps  # everything reused: no stage rewrites its marker


def test_analysis_protocols_each_get_a_stage(tiny_dir, world, tmp_path):
    path = experiment_file(tmp_path, tiny_dir("llava"), world,
                           analysis={"pairs": str(world / "pairs.jsonl"), "protocol": ["describe", "authors"]})
    stages = {s.name: s for s in read_experiment(path).stages}
    assert "--protocol describe" in " ".join(stages["analysis"].command)  # the first: the report's own
    assert stages["analysis-authors"].out.name == "analysis-authors"
    assert "--protocol authors" in " ".join(stages["analysis-authors"].command)
    for bad in ("theirs", ["authors", "authors"], []):
        path = experiment_file(tmp_path, tiny_dir("llava"), world,
                               analysis={"pairs": str(world / "pairs.jsonl"), "protocol": bad})
        with pytest.raises(ExperimentError, match="analysis.protocol: .* one or more of authors, describe"):
            read_experiment(path)


def test_the_shipped_experiment_files_are_valid(monkeypatch, tmp_path, capsys):
    """Every experiment under configs/experiments reads and plans (models it would download may be absent here:
    a hub id is accepted without a download)."""
    files = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert len(files) >= 4
    monkeypatch.chdir(ROOT)
    for f in files:
        exp = read_experiment(f, [f"output_dir={tmp_path / f.stem}"])
        assert exp.stages and exp.reference in exp.trainings, f
        assert exp.hardware, f"{f}: says what hardware it expects"


def test_a_watched_module_counts_by_its_code_not_its_comments(tmp_path):
    """Fixing a docstring or a comment of a watched module (the world's generator, compose) must not redo every
    stage after it; changing its code must."""
    module = tmp_path / "gen.py"
    module.write_text('"""Generator."""\n\ndef make(n):\n    """Make n."""\n    return n + 1  # one more\n')
    before = fingerprint_files(module)
    module.write_text('"""The generator,\nreworded."""\n\ndef make(n):\n    """Make n things."""\n'
                      '    # why: one more\n    return n + 1\n')
    assert fingerprint_files(module) == before
    module.write_text('"""Generator."""\n\ndef make(n):\n    """Make n."""\n    return n + 2\n')
    assert fingerprint_files(module) != before
    data = tmp_path / "template.jinja"  # any other file counts byte for byte
    data.write_text("{# a #}x")
    kept = fingerprint_files(data)
    data.write_text("{# b #}x")
    assert fingerprint_files(data) != kept


def test_an_edited_chat_template_file_redoes_compose(tmp_path):
    """compose's chat template file is an input by its content: editing it makes a new composed model (and so
    redoes what is trained from it), the path alone would not."""
    template = tmp_path / "chatml.jinja"
    template.write_text((ROOT / "configs/demo/chatml.jinja").read_text())
    settings = [f"base.compose.chat_template={template}", f"output_dir={tmp_path / 'demo'}"]

    def compose_inputs():
        exp = read_experiment(ROOT / "configs/experiments/demo.yaml", settings)
        return next(s for s in exp.stages if s.name == "composed").params

    before = compose_inputs()
    assert before["chat_template"] is not None
    template.write_text(template.read_text().replace("<|im_end|>", "<|im_end|> "))
    assert compose_inputs() != before
