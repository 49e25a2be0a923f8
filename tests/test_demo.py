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
            "steps": 150, "layers": [0, 1], "num_layers": 4, "components": []}


RUNS = {"full": _run(0.30, 50.0, 1000.0, 1_600_000), "middle": _run(0.21, 36.0, 900.0, 800_000)}


def test_accuracy_verdicts_report_a_reproduced_claim():
    acc = {"base": _acc(20, 30, 25, 25, 50), "full": _acc(90, 95, 80, 60, 85),
           "middle": _acc(89, 95, 79, 59, 85)}
    text = "\n".join(report.accuracy_verdicts(acc))
    assert "clearly beats the aligned base (≥ 10 points over both the base and chance) on 5 of 5" in text
    assert "reproduced — the middle block is no more than 2 points below full: -0.6 points vs full, mean over the 5 " \
           "types" in text
    assert "largest gap: color -1.0" in text and "NOT" not in text


def test_accuracy_verdicts_say_plainly_when_the_claim_is_not_reproduced():
    acc = {"base": _acc(20, 30, 25, 25, 50), "full": _acc(90, 95, 80, 20, 85),
           "middle": _acc(70, 90, 60, 18, 80)}
    text = "\n".join(report.accuracy_verdicts(acc))
    assert "on 4 of 5 question types (color, shape, count, exists)" in text
    assert "NOT reproduced — the middle block is 12.5 points below full" in text
    assert "largest gap: color -20.0" in text and "all five: -10.4" in text


def test_cost_verdicts_give_measured_ratios_and_say_when_middle_is_not_cheaper():
    text = "\n".join(report.cost_verdicts(RUNS))
    assert "0.70× the median step time, 0.72× the wall time, 0.90× the training memory, 0.50× the trainable" in text
    assert "reproduced — 30% less time per step" in text
    slower = {"full": RUNS["full"], "middle": _run(0.33, 55.0, 1000.0, 800_000)}
    assert "Cost claim (cheaper to train): NOT reproduced" in "\n".join(report.cost_verdicts(slower))
    noise = {"full": RUNS["full"], "middle": _run(0.29, 48.0, 1000.0, 800_000)}  # 0.97×: within timing noise
    assert "NOT reproduced — the middle block's step is 0.97× the full one (needs ≤ 0.95×)" in \
        "\n".join(report.cost_verdicts(noise))
    table = report.cost_table({"align": {**_run(0.1, 9.0, 50.0, 300), "layers": [], "components": ["projector"]},
                               **RUNS})
    assert "| align | projector | 150 | 9 | 0.10 | 50 | 0.3K (0%) |" in table
    assert "| middle | LLM layers 0–1 of 4 |" in table


def test_beating_a_base_that_scores_zero_is_not_enough():
    acc = {"base": _acc(0, 0, 0, 0, 0), "full": _acc(18, 31, 46, 18, 50), "middle": _acc(18, 31, 51, 23, 50)}
    text = "\n".join(report.accuracy_verdicts(acc))
    assert "on 1 of 5 question types (count)" in text


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
    assert "on 1 of 5 question types (position)" in "\n".join(report.accuracy_verdicts(acc))
    assert "on 0 of 5" in "\n".join(report.accuracy_verdicts(acc, quarter))


def test_the_claim_is_not_judged_when_full_fine_tuning_learned_nothing():
    acc = {name: _acc(20, 33, 25, 11, 50) for name in ("base", "full", "middle")}
    text = "\n".join(report.accuracy_verdicts(acc))
    assert "cannot be tested here — full fine-tuning is ≥ 10 points above chance on no question type" in text
    assert "reproduced" not in text


def _profile(values: list[float], metric: str) -> dict[int, dict[str, float]]:
    return {layer: {metric: v} for layer, v in enumerate(values)}


def test_id_answer_finds_the_expansion_contraction_shape_and_its_minimum():
    # 13 hidden states (12 layers): up to a peak at 3, down to a minimum at 8, up again at the end
    ids = [6, 10, 14, 18, 15, 12, 10, 8, 7, 9, 11, 12, 12]
    profiles = {"pretrained": _profile(ids, "textual_id"), "base": _profile(ids, "textual_id"),
                "full": _profile([v + (3 if i == 6 else 0) for i, v in enumerate(ids)], "textual_id")}
    lines = report.id_answers(profiles)
    assert "6.0 at the embeddings, lowest 6.0 at hidden state 0 before the peak, peak 18.0 at hidden state 3 (early)" \
        in lines[0]
    assert "minimum of 7.0 at hidden state 8 (intermediate)" in lines[0]
    assert "Valeriani et al. 2023: reproduced" in lines[0]
    assert lines[1] == "ID profile of base: identical to the pretrained one (the LLM did not change)."
    assert "ID profile of full: largest change +3.0 at hidden state 6 (intermediate)" in lines[2]


def test_id_answer_says_when_the_shape_is_not_there():
    flat = {"pretrained": _profile([10, 10.5, 11, 11, 11.2, 11.5, 12], "textual_id")}
    line = report.id_answers(flat)[0]
    assert "NOT reproduced (no expansion, no contraction after the peak" in line
    rising = {"pretrained": _profile([5, 8, 11, 14, 17, 20, 23], "textual_id")}  # the peak is the last layer
    assert "NOT reproduced (no contraction after the peak" in report.id_answers(rising)[0]
    # SmolLM2's shape: the embeddings' ID above the next layers'; expansion counts from the dip after them
    dip = {"pretrained": _profile([8.8, 7.7, 7.3, 8.0, 9.0, 10.0, 10.8, 9.0, 7.0, 6.8, 6.9], "textual_id")}
    line = report.id_answers(dip)[0]
    assert "lowest 7.3 at hidden state 2 before the peak, peak 10.8 at hidden state 6" in line
    assert "Valeriani et al. 2023: reproduced" in line


def test_overlap_answers_locate_the_rise_after_alignment_and_after_tuning():
    n = 10  # hidden states 0..9; thirds of 1..9 by depth: early 1-3, intermediate 4-6, late 7-9
    pretrained = _profile([0.1] * n, "vt_overlap")
    base = _profile([0.1, 0.1, 0.1, 0.1, 0.3, 0.4, 0.3, 0.12, 0.1, 0.1], "vt_overlap")
    full = _profile([0.1, 0.1, 0.1, 0.1, 0.3, 0.4, 0.3, 0.12, 0.5, 0.6], "vt_overlap")  # rises late only
    middle = _profile([0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.2, 0.12, 0.1, 0.1], "vt_overlap")  # falls
    lines = report.overlap_answers({"pretrained": pretrained, "base": base, "full": full, "middle": middle})
    assert lines[0].startswith("Visual↔textual overlap after alignment (base vs pretrained): rises in the "
                               "intermediate layers, most there")
    assert "intermediate +0.233" in lines[0] and "largest rise +0.300 at hidden state 5 (intermediate)" in lines[0]
    assert "peak at hidden state 1 before, 5 after" in lines[0]  # hidden state 0 (the embeddings) left out
    assert "(full vs base): does NOT rise in the intermediate layers" in lines[1]
    assert "largest rise +0.500 at hidden state 9 (late)" in lines[1]
    assert "(middle vs base): does NOT rise" in lines[2] and "intermediate -0.100" in lines[2]


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
    lines = report.lens_answers(_lens_doc({"base": late, "middle": late}))
    assert lines[0] == ("dominant_color: the word is in the top 10 for half the images or more — base: mean image "
                        "state from hidden state 9, best image token from hidden state 8; middle: mean image state "
                        "from hidden state 9, best image token from hidden state 8.")
    assert "intermediate layers (hidden states 4–6): NOT reproduced — at its best intermediate hidden state the word " \
           "is in the top 10 for 20% of the images (median rank 150: base, dominant_color, best image token, " \
           "hidden state 6)" in lines[1]
    early = [900, 800, 700, 600, 30, 8, 6, 5, 4, 3]
    lines = report.lens_answers(_lens_doc({"base": late, "middle": early}))
    assert "intermediate layers (hidden states 4–6): yes — in the top 10 for 80% of the images (middle, " \
           "dominant_color, best image token, hidden state 6; median rank 3)" in lines[1]
    assert "middle: mean image state from hidden state 5" in lines[0]


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
    """The whole pipeline on the pretrained LLM — world, vision tower, compose from SmolLM2's GGUF, alignment,
    full and middle instruction tuning, lmms-eval, a geometry profile of the four models, the report — with a few
    steps per stage and a few questions per task: checks the wiring, not the learning (that is `make demo`)."""
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--quick"])
    md = (out / "report.md").read_text()
    for model in ("base", "full", "middle"):
        assert f"| {model} |" in md
    for section in ("## (a)", "## (b)", "## (c)", "## (d)", "## (e)"):
        assert section in md
    assert "Visual features readable as the words they depict in the intermediate layers" in md
    assert "ID profile of the pretrained LLM on the world's captions" in md
    assert "ID profile of base: identical to the pretrained one" in md  # alignment leaves the LLM as it was
    assert "overlap after alignment (base vs pretrained)" in md and "Paper's claim" in md
    assert "| middle | LLM layers 7–21 of 30 |" in md and "| align | projector |" in md
    assert (out / "geometry.png").stat().st_size > 10_000 and (out / "accuracy.png").stat().st_size > 10_000
    assert (out / "lens.png").stat().st_size > 10_000
    stamps = {name: (out / name / ".midtune-stage.json").stat().st_mtime_ns for name in
              ("world", "vision", "composed", "stage_b", "stage_c_full", "stage_c_middle", "eval", "analysis", "lens")}
    demo.main(["--out", str(out), "--quick"])  # everything reused: no stage rewrites its marker
    assert {name: (out / name / ".midtune-stage.json").stat().st_mtime_ns for name in stamps} == stamps
