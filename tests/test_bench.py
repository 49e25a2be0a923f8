"""train.bench: the analytic unit model, and the benchmark end to end on a very small model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from train.bench import PRESETS, SETUPS, Weights, block_layers, flop_weights, main, step_units

BLOCK = range(4, 12)  # the middle half of 16 layers


def ratio(mode, ckpt, base, w=None):
    w = w or Weights()
    return step_units(mode, ckpt, 16, BLOCK, w) / step_units(base, ckpt, 16, BLOCK, w)


def test_unit_model_reproduces_the_anchor_ratios():
    # decoder layers only: 36/48, 48/64, 48/56, 36/40
    assert ratio("midtune", False, "full") == pytest.approx(0.75)
    assert ratio("midtune", True, "full") == pytest.approx(0.75)
    assert ratio("midtune", True, "naive") == pytest.approx(48 / 56)
    assert ratio("midtune", False, "naive") == pytest.approx(0.9)
    # with the LM head of the prototype's shape (hidden 256, vocab 512) weighted by its FLOPs: the measured
    # table's analytic column, 0.749 / 0.858 / 0.901
    shape = replace(PRESETS["tiny"], hidden=256, heads=4, kv_heads=2, intermediate=1024, vocab=512)
    head = Weights(head=flop_weights(shape).head)
    assert head.head == pytest.approx(2 / 15)
    assert round(ratio("midtune", False, "full", head), 3) == 0.749
    assert round(ratio("midtune", True, "naive", head), 3) == 0.858
    assert round(ratio("midtune", False, "naive", head), 3) == 0.901
    assert block_layers(PRESETS["tiny"]) == BLOCK


def test_unit_model_counts_what_each_setup_runs():
    w = Weights(head=0.5, vision=2.0, vision_used=1.5, projector=0.25, lora=0.1)
    # full: 16 layers × (fwd, recompute, input-grad, weight-grad), trained head and projector, vision forward
    assert step_units("full", True, 16, BLOCK, w) == pytest.approx(64 + 1.5 + 2.0 + 0.5)
    # naive recomputes and back-propagates the vision layers it uses, and the prefix
    naive = step_units("naive", True, 16, BLOCK, w)
    assert naive - step_units("midtune", True, 16, BLOCK, w) == pytest.approx(4 * 2 + 2 * 1.5 + 0.25)
    # LoRA: no base weight-gradient in the block, adapters cost `lora` per pass
    lora = step_units("lora", False, 16, BLOCK, w)
    assert step_units("midtune", False, 16, BLOCK, w) - lora == pytest.approx(8 * (1 - 3 * 0.1))


def test_benchmark_end_to_end(tmp_path, capsys):
    """Every configuration on a very small model, one round of two steps, recorded to a scratch file."""
    out = tmp_path / "BENCH.md"
    main(["--preset", "smoke", "--rounds", "1", "--steps", "2", "--warmup", "1", "--threads", "1", "--in-process",
          "--configs", ",".join(SETUPS), "--output", str(out)])
    printed = capsys.readouterr().out
    text = out.read_text()
    for body in (printed, text):
        assert "| full fine-tuning | non-reentrant, all LLM layers |" in body
        assert "| midtune: block 1-2 | non-reentrant, block and above |" in body
        assert "| naive: block 1-2 | reentrant, every layer + input grads |" in body
        assert "| LoRA on the block 1-2 |" in body
        assert "| full fine-tuning | off |" in body
        assert "step time midtune / full" in body and "step time midtune / naive" in body
        assert "peak training memory midtune / full" in body
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "configuration" not in line}
    # the backward cut made visible: layer 0 runs once and records no graph under midtune, twice under naive
    assert rows["midtune: block 1-2/non-reentrant, block and above"].endswith("| 1, no |")
    assert rows["naive: block 1-2/reentrant, every layer + input grads"].endswith("| 2, yes |")
    assert "first-step loss identical across configurations; midtune and naive reach the same loss" in text
    assert "- command: `python -m train.bench --preset smoke" in text and "load average at start" in text


def test_workers_run_in_fresh_processes(tmp_path, capsys):
    main(["--preset", "smoke", "--rounds", "1", "--steps", "1", "--warmup", "1", "--threads", "1",
          "--configs", "midtune", "--no-record"])
    printed = capsys.readouterr().out
    assert "[1/1] round 1 midtune" in printed
    assert "| midtune: block 1-2 | non-reentrant, block and above |" in printed
