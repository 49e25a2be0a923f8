"""The demo's stage reuse and its report's verdicts (the full demo runs with `make demo`; a quick version of the
whole pipeline runs here as a slow test)."""

from __future__ import annotations

import json

import pytest

from midtune import demo, report
from midtune.shapes import generate_world


def _acc(color, shape, count, position, exists):
    a = dict(color=color, shape=shape, count=count, position=position, exists=exists)
    a["mean"] = sum(a.values()) / 5
    return a


def _run(step_s, wall_s, peak_mb, trainable):
    return {"step_s": step_s, "wall_s": wall_s, "peak_mb": peak_mb, "trainable": trainable, "total": 2_000_000,
            "steps": 150}


RUNS = {"full": _run(0.30, 50.0, 1000.0, 1_600_000), "middle": _run(0.21, 36.0, 900.0, 800_000)}


def test_verdicts_report_a_reproduced_claim_with_measured_ratios():
    acc = {"base": _acc(20, 30, 25, 25, 50), "full": _acc(90, 95, 80, 60, 85),
           "middle": _acc(89, 95, 79, 59, 85)}
    lines = report.verdicts(acc, RUNS, None)
    text = "\n".join(lines)
    assert "full fine-tuning beats both the base and chance by ≥ 10 points on count and position" in text
    assert "Middle block: -0.6 points vs full (the mean over color, shape, count, position, exists; all five: -0.6)" in text
    assert "0.70× the median step time" in text and "0.72× the training wall time" in text
    assert "0.90× the training memory" in text and "0.50× the parameters" in text
    assert "reproduced in the miniature" in text and "NOT" not in text
    assert "30% less time per step" in text


def test_verdicts_say_plainly_when_the_miniature_does_not_reproduce():
    acc = {"base": _acc(20, 30, 25, 25, 50), "full": _acc(90, 95, 80, 20, 85),
           "middle": _acc(70, 90, 60, 18, 80)}
    slower = {"full": RUNS["full"], "middle": _run(0.33, 55.0, 1000.0, 800_000)}
    text = "\n".join(report.verdicts(acc, slower, None))
    assert "does not beat both the base and chance by ≥ 10 points on position" in text
    assert "NOT reproduced in the miniature — the middle block is 12.5 points below full" in text
    assert "largest gap: color -20.0" in text and "all five: -10.4" in text
    assert "Cost claim (cheaper to train): NOT reproduced" in text


def test_beating_a_base_that_scores_zero_is_not_enough():
    acc = {"base": _acc(0, 0, 0, 0, 0), "full": _acc(18, 31, 46, 18, 50), "middle": _acc(18, 31, 51, 23, 50)}
    text = "\n".join(report.verdicts(acc, RUNS, None))
    assert "does not beat both the base and chance by ≥ 10 points on position" in text
    assert "above chance on 1 of 5 question types (count)" in text


def test_chance_levels_come_from_the_worlds_choices(world, tmp_path):
    summary = json.loads((world / "world.json").read_text())
    expected = {"color": 1 / 5, "shape": 1 / 3, "count": 1 / 4, "position": 1 / 9, "exists": 1 / 2}
    assert report.chance(summary) == expected
    assert report.chance(summary) == report.CHANCE  # the test world has the canonical grid and object count
    small = generate_world(tmp_path / "g2", seed=1, n_train=8, n_val=2, n_test=4, image_size=32, grid=2,
                           max_objects=3, progress=False)
    assert report.chance(small) == {**expected, "count": 1 / 3, "position": 1 / 4}  # 2 × 2 cells, up to 3 objects
    acc = {"base": _acc(20, 33, 25, 10, 50), "full": _acc(20, 33, 25, 30, 50), "middle": _acc(20, 33, 25, 30, 50)}
    quarter = {**report.CHANCE, "position": 1 / 4}  # a world whose position question had four answers
    assert "above chance on 1 of 5 question types (position)" in "\n".join(report.verdicts(acc, RUNS, None))
    assert "above chance on 0 of 5" in "\n".join(report.verdicts(acc, RUNS, None, quarter))


def test_the_claim_is_not_judged_when_full_fine_tuning_learned_nothing():
    acc = {name: _acc(20, 33, 25, 11, 50) for name in ("base", "full", "middle")}
    text = "\n".join(report.verdicts(acc, RUNS, None))
    assert "cannot be tested here — full fine-tuning learned no question type" in text
    assert "reproduced in the miniature" not in text


def test_geometry_verdict_finds_the_layer_where_overlap_grew_most():
    layers = range(9)  # 8 decoder layers + embeddings
    base = {layer: {"vt_overlap": 0.1} for layer in layers}
    full = {layer: {"vt_overlap": 0.1 + (0.3 if layer == 4 else 0.0)} for layer in layers}
    middle = {layer: {"vt_overlap": 0.1 + (0.2 if layer == 7 else 0.0)} for layer in layers}
    lines = report.geometry_verdicts({"profiles": {"base": base, "full": full, "middle": middle}})
    assert "grows most at hidden state 4 (+0.300; the middle third of the 8 decoder layers)" in lines[0]
    assert "hidden state 7 (+0.200; the last third" in lines[1]
    assert "4 (full)" in lines[2] and "7 (middle)" in lines[2]


def test_a_stage_is_reused_only_with_the_same_parameters(tmp_path, capsys):
    calls = []

    def run(out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "made").write_text("x")

    out = tmp_path / "s"
    demo.stage("s", out, {"a": 1}, False, run)
    demo.stage("s", out, {"a": 1}, False, run)
    assert len(calls) == 1 and "reusing" in capsys.readouterr().out
    demo.stage("s", out, {"a": 2}, False, run)  # changed parameters: redone
    demo.stage("s", out, {"a": 2}, True, run)  # --force: redone
    assert len(calls) == 3


def test_a_stage_cut_short_is_redone(tmp_path):
    out = tmp_path / "s"

    def crash(out):
        out.mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.stage("s", out, {"a": 1}, False, crash)
    assert not (out / ".midtune-stage.json").exists()
    demo.stage("s", out, {"a": 1}, False, lambda o: o.mkdir(parents=True))
    assert json.loads((out / ".midtune-stage.json").read_text()) == {"a": 1}


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, monkeypatch):
    """The whole pipeline — world, base, stages A/B/C twice, lmms-eval, analysis, report — with a few steps per
    stage and a few questions per task: checks the wiring, not the learning (that is `make demo`)."""
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--quick"])
    md = (out / "report.md").read_text()
    for model in ("base", "full", "middle"):
        assert f"| {model} |" in md
    assert "Middle block:" in md and "Paper's claim" in md
    assert (out / "geometry.png").stat().st_size > 10_000 and (out / "accuracy.png").stat().st_size > 10_000
    stamps = {name: (out / name / ".midtune-stage.json").stat().st_mtime_ns for name in
              ("world", "base", "stage_a", "stage_b", "stage_c_full", "stage_c_middle", "eval", "analysis")}
    demo.main(["--out", str(out), "--quick"])  # everything reused: no stage rewrites its marker
    assert {name: (out / name / ".midtune-stage.json").stat().st_mtime_ns for name in stamps} == stamps


def test_geometry_verdict_says_when_overlap_grows_nowhere():
    layers = range(9)
    base = {layer: {"vt_overlap": 0.24} for layer in layers}
    lower = {layer: {"vt_overlap": 0.20} for layer in layers}
    lines = report.geometry_verdicts({"profiles": {"base": base, "full": lower, "middle": base}})
    assert "(full vs base): the visual↔textual overlap grows at no hidden state (mean change over layers -0.040)" \
        in lines[0]
