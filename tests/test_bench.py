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


def test_the_papers_blocks_scale_to_the_real_llm():
    """LLaVA-7B's layers 6-16 of 32 and OneVision-4B's 8-25 of 36, at the same fraction and position of depth in
    SmolLM2-135M's 30 layers; the head costs only the labelled positions there, logits everywhere cost more."""
    from train.bench import analytic, labelled_positions, scaled_block

    assert scaled_block(6, 16, 32, 30) == "6-15" and scaled_block(8, 25, 36, 30) == "7-21"
    llava, onevision = PRESETS["smollm2-llava"], PRESETS["smollm2-onevision"]
    assert block_layers(llava) == range(6, 16) and block_layers(onevision) == range(7, 22)
    assert flop_weights(llava).head < flop_weights(llava, all_logits=True).head
    assert analytic(llava, SETUPS["full-all-logits"], "full", 8) > 1 > analytic(llava, SETUPS["midtune"], "full", 8)
    # with Qwen2.5-VL's vocabulary and a short answer after a long prompt, the head everywhere dominates the step
    qwen = PRESETS["qwen-vocab"]
    assert qwen.seq_len == 1088 and labelled_positions(qwen) == 128
    assert analytic(qwen, SETUPS["full-all-logits"], "full", 8) > 3


@pytest.mark.slow
def test_benchmark_on_the_real_llm(tmp_path, capsys, monkeypatch):
    """The real-LLM preset end to end (composed once into $MIDTUNE_CACHE), one step per configuration."""
    monkeypatch.setenv("MIDTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "BENCH.md"
    main(["--preset", "smollm2-llava", "--rounds", "1", "--steps", "1", "--warmup", "1", "--batch", "2",
          "--threads", "1", "--in-process", "--configs", "full,full-all-logits,midtune", "--output", str(out)])
    text = out.read_text()
    assert "smollm2-135m-instruct (pretrained, 30×576" in text
    assert "| midtune: block 6-15 |" in text and "| full fine-tuning, logits everywhere |" in text
    assert "logits at labels / logits everywhere" in text and "vs the paper" in text


def test_text_only_batches_with_short_answers(tmp_path, capsys):
    """--text-only --answer-len: no image tokens or pixels, labels on the last tokens only; the logits goal is
    measured on that mix too."""
    from dataclasses import replace

    from train.bench import labelled_positions, make_batch

    preset = replace(PRESETS["smoke"], images=False, answer_len=3)
    batch = make_batch(preset, 0, None, image_id=preset.vocab - 1)
    assert "pixel_values" not in batch and batch["input_ids"].shape == (preset.batch, preset.text_len)
    assert labelled_positions(preset) == 3 and (batch["labels"] != -100).sum(dim=1).tolist() == [3] * preset.batch
    assert (batch["labels"][:, -3:] == batch["input_ids"][:, -3:]).all()
    assert flop_weights(preset).vision == 0 and flop_weights(preset).projector == 0
    main(["--preset", "smoke", "--text-only", "--answer-len", "3", "--rounds", "1", "--steps", "1", "--warmup", "1",
          "--threads", "1", "--in-process", "--configs", "full,full-all-logits", "--no-record"])
    assert "logits at labels / logits everywhere" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--answer-len", "0", "--no-record"])


def test_the_llava_7b_width_preset_fits_the_gpu_and_keeps_the_papers_fraction_of_depth():
    from train.bench import layer_parameters, layers_that_fit, with_layers

    preset = replace(PRESETS["llava7b-width"], dtype="bf16")
    # Vicuna-7B's decoder layer: 4 × 4096² attention + 3 × 4096 × 11008 MLP + two norms
    assert layer_parameters(preset) == 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    assert preset.image_tokens == 576 and block_layers(preset) == range(6, 17)  # the paper's 6-16 of 32
    gib = 2 ** 30
    # full fine-tuning in bf16 (weights, gradients, AdamW moments: 8 B a parameter) of all 32 layers is ~57 GB:
    # an H100's 80 GB holds them in its 70 % share, a 40 GB card about half
    assert layers_that_fit(preset, 79 * gib) == 32 and layers_that_fit(preset, 139 * gib) == 32
    assert 12 <= layers_that_fit(preset, 40 * gib) <= 16
    assert layers_that_fit(replace(preset, dtype="fp32"), 79 * gib) < 32  # fp32 state needs twice the room
    for layers, block in ((32, range(6, 17)), (20, range(4, 11)), (16, range(3, 8))):
        scaled = with_layers(preset, layers)
        assert block_layers(scaled) == block and scaled.layers == layers
        assert abs(len(block) / layers - 11 / 32) < 0.05  # about a third of the depth, as in the paper
