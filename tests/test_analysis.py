"""The analysis app: extraction, profiles, the attention knockout, layer suggestions, the training hook, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.__main__ import main
from analysis.extract import (
    PROTOCOL_KINDS,
    AnalysisError,
    ExtractSettings,
    InMemoryExtraction,
    extract,
    load_model,
    read_pairs,
    resolve_model,
    twin_text,
)
from analysis.geometry import GeometryWarning
from analysis.intervene import AttentionKnockout, ChoiceScorer, Question, read_questions, uses_cache
from analysis.profile import METRICS, ProfileSettings, compute_profile, read_profiles
from analysis.suggest import suggest_block

NUM_LAYERS = 4  # conftest.TINY


def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def trained_run(world, tiny_dir, tmp_path_factory):
    """A tiny llava trained for 3 steps on layers 1-2, with the analysis hook profiling its checkpoint."""
    from train.config import load_config
    from train.recipe import train

    out = tmp_path_factory.mktemp("analysis-run") / "run"
    overrides = dict(model=tiny_dir("llava"), data=world / "train.json", image_folder=world / "images",
                     output_dir=out, batch_size=4, max_steps=3, seed=0, report_to="[tensorboard]",
                     **{"optim.lr": 1e-3, "trainable.layers": "1-2", "analysis.pairs": world / "pairs.jsonl",
                        "analysis.k": 4, "analysis.batch_size": 10})
    fresh_accelerate_state()
    try:
        train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    finally:
        fresh_accelerate_state()
    return out


def mixed_size_pairs(world: Path, tmp_path: Path, n: int = 6) -> Path:
    """A pairs file whose images come in two sizes, so Qwen's image prompts differ in length (padding)."""
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()[:n]]
    (tmp_path / "images").mkdir()
    for i, row in enumerate(rows):
        with Image.open(world / "images" / row["image"]) as im:
            im = im.convert("RGB")
            if i % 2:
                im = im.resize((96, 64))
            im.save(tmp_path / "images" / f"{row['id']}.png")
        row["image"] = f"{row['id']}.png"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_extraction_is_right_and_padding_invariant(family, world, tiny_dir, tmp_path):
    pairs = read_pairs(mixed_size_pairs(world, tmp_path, n=5))
    ref = resolve_model(str(tiny_dir(family)))
    one = extract(ref, pairs, tmp_path / "bs1", ExtractSettings(batch_size=1), progress=False)
    four = extract(ref, pairs, tmp_path / "bs4", ExtractSettings(batch_size=4), progress=False)
    assert one.num_layers == NUM_LAYERS and one.ids == [p.id for p in pairs]
    for kind in ("image_mean", "image_last", "caption_mean"):
        a, b = one.array(kind), four.array(kind)
        assert a.shape == (len(pairs), NUM_LAYERS + 1, 64)  # every hidden state: embeddings + one per layer
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)  # batch 1 vs padded batches of 4: fp16 precision
        assert np.array_equal(one.layer(kind, 2), a[:, 2])
    assert not np.allclose(one.array("image_mean"), one.array("caption_mean"), atol=1e-2)

    # The vectors are what they claim to be: recompute pair 1 (a resized image) by hand.
    model, processor = load_model(ref, device="cpu")
    image_token = model.config.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with Image.open(pairs[1].image) as im:
        enc = processor(text=[prompt], images=[im.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
        text = processor.tokenizer(pairs[1].caption, return_tensors="pt")
        text_states = model(**text, output_hidden_states=True).hidden_states
    positions = enc["input_ids"][0] == image_token
    for layer in (0, 3):
        np.testing.assert_allclose(one.array("image_mean")[1, layer], states[layer][0, positions].mean(0),
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(one.array("image_last")[1, layer], states[layer][0, -1], rtol=2e-3, atol=2e-3)
        # the sequence's first position (an attention sink) is left out of the caption mean: a tokenizer without
        # BOS puts the caption's first token there; with BOS, the BOS (a special token) is left out anyway
        np.testing.assert_allclose(one.array("caption_mean")[1, layer], text_states[layer][0][1:].mean(0),
                                   rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_authors_protocol_reads_image_and_twin_at_the_same_positions(family, world, tiny_dir, tmp_path):
    """The authors' protocol: the image with its question beside the textual twin (the captions written out, the
    same question), both in the chat template, read at the last token, as a sequence mean and at one drawn
    token; padding-invariant, and equal to a hand computation."""
    pairs = read_pairs(mixed_size_pairs(world, tmp_path, n=5), need_question=True)
    ref = resolve_model(str(tiny_dir(family)))
    settings = dict(protocol="authors", token_seed=3)
    one = extract(ref, pairs, tmp_path / "bs1", ExtractSettings(batch_size=1, **settings), progress=False)
    four = extract(ref, pairs, tmp_path / "bs4", ExtractSettings(batch_size=4, **settings), progress=False)
    assert one.protocol == "authors" and one.kinds == PROTOCOL_KINDS["authors"]
    for kind in one.kinds:
        np.testing.assert_allclose(one.array(kind), four.array(kind), rtol=2e-3, atol=2e-3)
    with pytest.raises(AnalysisError, match="no representation 'image_mean'"):
        one.layer("image_mean", 1)
    # Another token seed draws other tokens, and only the drawn tokens change.
    other = extract(ref, pairs, tmp_path / "seed4", ExtractSettings(batch_size=4, protocol="authors", token_seed=4),
                    progress=False)
    assert np.array_equal(other.array("visual_last"), four.array("visual_last"))
    assert not np.array_equal(other.array("visual_token"), four.array("visual_token"))

    model, processor = load_model(ref, device="cpu")
    pair = pairs[1]
    visual = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair.question}]}]
    prompt = processor.apply_chat_template(visual, tokenize=False, add_generation_prompt=True)
    twin = twin_text(pair.captions, pair.question)
    assert twin.startswith(f"Below are {len(pair.captions)} descriptions of an image.") and twin.endswith(pair.question)
    assert all(f"{i}. {c}" in twin for i, c in enumerate(pair.captions, 1))
    textual = [{"role": "user", "content": [{"type": "text", "text": twin}]}]
    twin_prompt = processor.apply_chat_template(textual, tokenize=False, add_generation_prompt=True)
    with Image.open(pair.image) as im:
        enc = processor(text=[prompt], images=[im.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
        text = processor.tokenizer(twin_prompt, return_tensors="pt", add_special_tokens=False)
        text_states = model(**text, output_hidden_states=True).hidden_states
    for layer in (1, 3):
        for side, h in (("visual", states[layer][0]), ("textual", text_states[layer][0])):
            np.testing.assert_allclose(one.array(f"{side}_last")[1, layer], h[-1], rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(one.array(f"{side}_mean")[1, layer], h.mean(0), rtol=2e-3, atol=2e-3)
    # The drawn visual token is an image token; the drawn textual token one of the captions' own tokens.
    image_rows = states[3][0][enc["input_ids"][0] == model.config.image_token_id]
    assert torch.isclose(image_rows, torch.from_numpy(one.array("visual_token")[1, 3]), rtol=2e-3, atol=2e-3
                         ).all(1).any()
    offsets = processor.tokenizer(twin_prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = [(twin_prompt.index(c), twin_prompt.index(c) + len(c)) for c in pair.captions]
    drawn = [i for i, row in enumerate(text_states[3][0])
             if torch.allclose(row, torch.from_numpy(one.array("textual_token")[1, 3]), rtol=2e-3, atol=2e-3)]
    assert drawn and all(any(lo <= offsets[i][0] and offsets[i][1] <= hi for lo, hi in spans) for i in drawn)


def test_authors_protocol_needs_a_question_per_pair(world, tiny_dir, tmp_path):
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()[:3]]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: r[k] for k in ("id", "image", "caption")}) + "\n" for r in rows))
    pairs = read_pairs(plain, world / "images")
    with pytest.raises(AnalysisError, match="pair 'test_000000' has no question"):
        extract(resolve_model(str(tiny_dir("llava"))), pairs, tmp_path / "x", ExtractSettings(protocol="authors"),
                progress=False)
    assert not (tmp_path / "x").exists()


def test_pairs_carry_their_captions_and_question_and_bad_ones_are_named(world, tmp_path):
    import json

    pairs = read_pairs(world / "pairs.jsonl", max_pairs=3, need_question=True)
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()[:3]]
    assert [p.captions for p in pairs] == [tuple(r["captions"]) for r in rows]
    assert [p.question for p in pairs] == [r["question"] for r in rows]
    plain = tmp_path / "plain.jsonl"  # a pairs file of a user's own: one caption, no question
    plain.write_text("".join(json.dumps({k: r[k] for k in ("id", "image", "caption")}) + "\n" for r in rows))
    (first, *_) = read_pairs(plain, world / "images")
    assert first.captions == (rows[0]["caption"],) and first.question is None
    with pytest.raises(AnalysisError, match=r"plain.jsonl: line 1 \(id='test_000000'\): no 'question'"):
        read_pairs(plain, world / "images", need_question=True)
    for bad, needle in [({"captions": []}, "'captions' must be a list"), ({"captions": ["a", ""]}, "'captions'"),
                        ({"question": " "}, "empty 'question'")]:
        plain.write_text(json.dumps({**rows[0], **bad}) + "\n")
        with pytest.raises(AnalysisError, match=needle):
            read_pairs(plain, world / "images")


def test_interrupted_extraction_resumes(world, tiny_dir, tmp_path, monkeypatch):
    from analysis import extract as extract_module

    pairs = read_pairs(world / "pairs.jsonl", max_pairs=8)
    ref = resolve_model(str(tiny_dir("llava")))
    settings = ExtractSettings(batch_size=2, shard_size=3)
    reference = extract(ref, pairs, tmp_path / "whole", settings, progress=False)

    class Interrupted(Exception):
        pass

    def stop(info):
        raise Interrupted

    out = tmp_path / "partial"
    with pytest.raises(Interrupted):
        extract(ref, pairs, out, settings, progress=False, on_shard=stop)
    first = out / "shard-0000000-0000003.safetensors"
    assert sorted(p.name for p in out.glob("shard-*")) == [first.name]
    assert json.loads((out / "index.json").read_text())["complete"] is False
    with pytest.raises(AnalysisError, match="incomplete"):
        extract_module.Extraction(out)
    (out / ".shard-0000003-0000006.safetensors.tmp-999").write_bytes(b"half a shard")  # a write cut short
    stamp = first.stat().st_mtime_ns

    seen = []
    run = extract_module.Extractor.run
    monkeypatch.setattr(extract_module.Extractor, "run", lambda self, batch: (seen.extend(batch), run(self, batch))[1])
    resumed = extract(ref, pairs, out, settings, progress=False)
    assert [p.id for p in seen] == [p.id for p in pairs[3:]]  # only what was missing
    assert first.stat().st_mtime_ns == stamp and not list(out.glob(".shard-*"))
    for kind in ("image_mean", "image_last", "caption_mean"):
        assert np.array_equal(resumed.array(kind), reference.array(kind))
    seen.clear()
    extract(ref, pairs, out, settings, progress=False)  # complete: nothing runs
    assert seen == []
    extract(ref, pairs, out, ExtractSettings(batch_size=2, shard_size=3, prompt="What is this?"), progress=False)
    assert len(seen) == len(pairs)  # other settings: started over


def test_lora_checkpoint_tensors_are_merged_onto_the_base(tiny_dir, tmp_path):
    """A LoRA run's checkpoint holds PEFT-named adapters; the profile rebuilds W + (alpha / r) B A."""
    from safetensors.torch import save_file

    base = str(tiny_dir("llava"))
    module = "model.language_model.layers.1.self_attn.q_proj"
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    save_file({f"{module}.lora_A.default.weight": a, f"{module}.lora_B.default.weight": b},
              str(tmp_path / "trainable.safetensors"))
    model, _ = load_model(resolve_model(str(tmp_path), base=base, lora_scale=2.0), device="cpu")
    plain, _ = load_model(resolve_model(base), device="cpu")
    expected = plain.get_parameter(f"{module}.weight") + 2.0 * b @ a
    assert torch.allclose(model.get_parameter(f"{module}.weight"), expected, atol=1e-5)
    with pytest.raises(AnalysisError, match="--lora-scale"):
        load_model(resolve_model(str(tmp_path), base=base), device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Profiles and the training hook
# ---------------------------------------------------------------------------------------------------------


def test_training_hook_logs_checkpoint_profiles(trained_run):
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    analysis = [line for line in lines if "analysis" in line]
    assert [line["step"] for line in analysis] == [3]  # the one checkpoint (the final save)
    metrics = analysis[0]["analysis"]
    assert set(metrics) == set(METRICS)
    assert all(len(values) == NUM_LAYERS + 1 for values in metrics.values())
    # the authors' protocol by default, read at the last token: the same embedding for every pair at index 0
    assert metrics["visual_id"][0] is None and all(v is not None and v > 0 for v in metrics["visual_id"][1:])
    step_dir = trained_run / "analysis" / "step-3"
    assert {"profiles.json", "profiles.csv", "profile.png", "profile.log"} <= {p.name for p in step_dir.iterdir()}
    assert not (step_dir / "trainable.safetensors").exists() and not (step_dir / "extract").exists()
    events = b"".join(p.read_bytes() for p in (trained_run / "logs").rglob("events.out.tfevents*"))
    assert b"analysis/visual_id/layer_3" in events
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]


def test_profile_of_a_trained_model_beside_its_base(trained_run, world, tiny_dir, tmp_path):
    from analysis.plots import plot_profiles

    out = tmp_path / "profile"
    rc = main(["profile", "--model", f"base={tiny_dir('llava')}", "--model", f"tuned={trained_run / 'final'}",
               "--pairs", str(world / "pairs.jsonl"), "--out", str(out), "--k", "5", "--batch-size", "10",
               "--no-progress", "--gride-rank", "4"])  # 20 pairs: the authors' scale 16 needs 34
    assert rc == 0
    doc = read_profiles(out)
    assert list(doc["profiles"]) == ["base", "tuned"] and doc["models"]["tuned"]["num_layers"] == NUM_LAYERS
    assert doc["settings"]["protocol"] == "authors" and doc["settings"]["gride_rank"] == 4
    for name, per_layer in doc["profiles"].items():
        assert sorted(per_layer) == list(range(NUM_LAYERS + 1))
        assert all(math.isnan(v) for v in per_layer[0].values())  # the last token's embedding: one for every pair
        for layer, m in per_layer.items():
            if layer == 0:
                continue
            for metric in ("visual_id", "textual_id", "visual_id_gride", "textual_id_gride", "vt_overlap",
                           "label_overlap", "probe_acc", "idcorr"):
                assert math.isfinite(m[metric]), (name, layer, metric)
            assert 0 < m["visual_id"] < 64 and 0 < m["textual_id"] < 64
            assert 0 <= m["vt_overlap"] <= 1 and 0 <= m["label_overlap"] <= 1 and 0 <= m["probe_acc"] <= 1
            assert math.isnan(m["last_id"]) and math.isnan(m["last_t_overlap"])  # describe's own
            for metric in ("visual_id", "textual_id", "visual_id_gride", "textual_id_gride", "vt_overlap"):
                assert m[f"{metric}_lo"] <= m[f"{metric}_hi"], (name, layer, metric)  # its band (pairs resampled)
            assert m["vt_overlap_lo"] <= m["vt_overlap"] <= m["vt_overlap_hi"]
    assert "95 % band" in doc["metrics"]["vt_overlap_lo"] and doc["settings"]["band_resamples"] == 200
    assert doc["metrics"]["textual_id_gride"] == "textual ID (GRIDE, n1 = 4)"  # the one scale, named
    base, tuned = doc["profiles"]["base"], doc["profiles"]["tuned"]
    for layer in (1,):  # input of the trained layers 1-2: untouched by training
        assert base[layer]["visual_id"] == tuned[layer]["visual_id"]
    assert base[3]["visual_id"] != tuned[3]["visual_id"]
    # The hook rebuilt the same model from base + checkpoint tensors.
    hook = read_profiles(trained_run / "analysis" / "step-3")["profiles"]["step-3"]
    assert [hook[layer]["visual_id"] for layer in range(1, 5)] == pytest.approx([tuned[layer]["visual_id"]
                                                                                 for layer in range(1, 5)])
    with open(out / "profiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[2]["vt_overlap_lo"]) == pytest.approx(base[2]["vt_overlap_lo"], rel=1e-5)
    assert [(r["model"], int(r["layer"])) for r in rows] == \
        [(n, layer) for n in ("base", "tuned") for layer in range(5)]
    with Image.open(out / "profile.png") as im:
        assert im.size[0] > 800
    fig = plot_profiles(doc["profiles"], tmp_path / "again.png")
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 8 and all([line.get_label() for line in ax.lines] == ["base", "tuned"] for ax in panels)
    assert not any("last-token" in ax.get_title() for ax in panels)  # describe's metrics: not computed, not drawn
    banded = [ax for ax in panels if ax.collections]  # the bands are filled areas, one per model
    assert {ax.get_title() for ax in banded} >= {"visual ID (TwoNN)", "visual↔textual overlap", "textual ID (GRIDE)"}
    assert all(len(ax.collections) == 2 for ax in banded)
    assert not any("probe" in ax.get_title() or "label" in ax.get_title() for ax in banded)
    # a metric computed nowhere (IdCorr under --no-idcorr) gets no panel, not an empty one
    without = {name: {layer: {**m, "idcorr": float("nan")} for layer, m in per_layer.items()}
               for name, per_layer in doc["profiles"].items()}
    titles = [ax.get_title() for ax in plot_profiles(without, tmp_path / "no-idcorr.png").axes if ax.lines]
    assert len(titles) == len(panels) - 1 and not any("IdCorr" in t for t in titles)
    # the per-pair overlaps behind the curves, for intervals on differences between models
    from safetensors.numpy import load_file

    terms = load_file(str(out / "overlap_terms.safetensors"))
    assert terms["base"].shape == (NUM_LAYERS + 1, len(doc["settings"]["ids"]))
    assert np.nanmean(terms["tuned"][3]) == pytest.approx(tuned[3]["vt_overlap"], rel=1e-5)
    assert np.isnan(terms["base"][0]).all()
    # the GRIDE scale plot: every scale at every measured layer, the profile's value its column at n1 = 4
    curves = json.loads((out / "gride_scaling.json").read_text())
    assert curves["gride_rank"] == 4 and sorted(curves["models"]["base"]) == ["1", "2", "3", "4"]
    textual = curves["models"]["tuned"]["3"]["textual"]
    assert textual["n1"] == [1, 2, 4, 8] and textual["ids"][2] == pytest.approx(tuned[3]["textual_id_gride"], rel=1e-6)
    assert (out / "gride_scaling.png").stat().st_size > 10_000

    # The describe protocol: its own extraction beside the authors' one, and its last-token metrics.
    rc = main(["profile", "--model", f"base={tiny_dir('llava')}", "--pairs", str(world / "pairs.jsonl"),
               "--out", str(out), "--k", "5", "--batch-size", "10", "--no-progress", "--protocol", "describe",
               "--band-resamples", "0"])
    described = read_profiles(out)
    assert rc == 0 and described["settings"]["protocol"] == "describe" and described["settings"]["gride_rank"] == 8
    assert {p.name for p in (out / "extract").iterdir()} >= {"base", "base-authors"}
    m = described["profiles"]["base"]
    assert math.isnan(m[0]["last_id"]) and all(math.isfinite(m[layer]["last_id"]) for layer in range(1, 5))
    assert all(math.isfinite(m[layer]["vt_overlap"]) for layer in range(5))


def test_undefined_metrics_are_nan_with_a_warning_naming_the_layer():
    rng = np.random.default_rng(0)
    n, layers, dim = 24, 3, 8
    arrays = {kind: rng.standard_normal((n, layers + 1, dim)) for kind in ("image_mean", "image_last", "caption_mean")}
    arrays["image_mean"][:, 1] = 1.0  # constant visual representation at layer 1
    arrays["caption_mean"][3, 2, 0] = np.nan  # a NaN in the textual one at layer 2
    labels = ["red", "blue"] * (n // 2)
    with pytest.warns(GeometryWarning) as record:
        profile = compute_profile(InMemoryExtraction(arrays), labels, ProfileSettings(k=5, idcorr_shuffles=0),
                                  name="m")
    messages = [str(w.message) for w in record]
    assert any("layer 1" in m and "constant" in m for m in messages)
    assert any("layer 2" in m and "NaN" in m for m in messages)
    assert math.isnan(profile[1]["visual_id"]) and math.isnan(profile[1]["probe_acc"])
    assert math.isfinite(profile[1]["textual_id"])
    assert math.isnan(profile[2]["textual_id"]) and math.isnan(profile[2]["vt_overlap"])
    assert math.isfinite(profile[2]["visual_id"])
    assert all(math.isfinite(profile[3][m]) for m in ("visual_id", "textual_id", "vt_overlap", "probe_acc"))
    with pytest.warns(GeometryWarning, match="layer 0.*one class"):
        single = compute_profile(InMemoryExtraction(arrays), ["red"] * n, ProfileSettings(k=5, idcorr=False))
    assert math.isnan(single[0]["probe_acc"])
    with pytest.raises(AnalysisError, match="k \\+ 2"):
        compute_profile(InMemoryExtraction(arrays), labels, ProfileSettings(k=30))


# ---------------------------------------------------------------------------------------------------------
# Intervention
# ---------------------------------------------------------------------------------------------------------


def test_intervention_command(world, tiny_dir, tmp_path):
    out = tmp_path / "knockout"
    rc = main(["intervene", "--model", str(tiny_dir("llava")), "--tasks", "color,exists", "--world", str(world),
               "--window", "2", "--limit", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "intervention.json").read_text())
    assert [(w["start"], w["end"]) for w in result["windows"]] == [(0, 2), (1, 3), (2, 4)]
    for entry in [result["baseline"], result["all_layers"], *result["windows"]]:
        assert set(entry["accuracy"]) == {"color", "exists", "mean"}
        assert all(0 <= v <= 1 for v in entry["accuracy"].values())
    assert result["baseline"]["changed"] == 0 and result["n_questions"] == {"color": 3, "exists": 3}
    assert (out / "intervention.png").stat().st_size > 0


def test_knockout_cuts_the_image_off(world, tiny_dir):
    for family in ("llava", "qwen2_vl"):
        model, processor = load_model(resolve_model(str(tiny_dir(family))), device="cpu")
        q = read_questions(world, ["color"], limit=1)[0]
        other = next(p.image for p in read_pairs(world / "pairs.jsonl") if p.image != q.image.resolve())
        scorers = [ChoiceScorer(model, processor, [q]), ChoiceScorer(model, processor, [Question(**{**vars(q),
                                                                                            "image": other})])]
        with AttentionKnockout(model) as knockout:
            base = [s.nll()[0] for s in scorers]
            knockout.layers = range(NUM_LAYERS)
            blocked = [s.nll()[0] for s in scorers]
            assert knockout.applied == 2 * NUM_LAYERS  # every layer's attention got the blocked mask
            model.set_attn_implementation("eager")  # the additive-float-mask path gives the same numbers
            blocked_eager = scorers[0].nll()[0]
            model.set_attn_implementation("sdpa")
            knockout.layers = [1]
            one_layer = scorers[0].nll()[0]
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
            prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            with Image.open(q.image) as im:
                enc = processor(text=[prompt], images=[im.convert("RGB")], return_tensors="pt")
            with pytest.raises(AnalysisError, match="KV cache"):  # generation would silently unblock new tokens
                model.generate(**enc, max_new_tokens=2, do_sample=False)
        assert base[0] != base[1]  # normally the answer depends on the image …
        assert blocked[0] == blocked[1]  # … blocked in every layer, the text cannot see it at all
        assert blocked[0] != base[0] and one_layer not in (base[0], blocked[0])
        assert blocked_eager == pytest.approx(blocked[0], abs=1e-4)
    assert knockout._handles == []


def test_knockout_sees_a_cache_under_any_keyword():
    # transformers 5.24 renamed the layers' `past_key_values` keyword to `cache`, and the guard, which read the old
    # name, stopped firing; a cache is recognised by its type, whatever the keyword or position
    from transformers import DynamicCache

    assert uses_cache((), {"past_key_values": DynamicCache()})
    assert uses_cache((), {"cache": DynamicCache()})
    assert uses_cache((torch.zeros(1), DynamicCache()), {})
    assert not uses_cache((torch.zeros(1),), {"cache": None, "past_key_values": None, "use_cache": False})


# ---------------------------------------------------------------------------------------------------------
# suggest-layers
# ---------------------------------------------------------------------------------------------------------


def test_suggested_layers_are_a_valid_training_spec(world, tiny_dir, tmp_path):
    from midtune.spec import resolve_layers
    from train.config import load_config, plain

    snippet = tmp_path / "layers.yaml"
    rc = main(["suggest-layers", "--model", str(tiny_dir("llava")), "--pairs", str(world / "pairs.jsonl"),
               "--k", "5", "--no-idcorr", "--out", str(snippet), "--no-progress"])
    assert rc == 0
    text = snippet.read_text()
    assert text.startswith("# ") and "rule id_valley" in text
    config = load_config(snippet, [f"model={tiny_dir('llava')}", f"data={world / 'train.json'}",
                                   f"output_dir={tmp_path / 'run'}"])
    layers = resolve_layers(plain(config.trainable.layers), NUM_LAYERS)
    assert len(layers) == 2 and layers == list(range(layers[0], layers[0] + 2))


def test_suggestion_rule():
    def profile(visual_id, overlap=None):
        overlap = overlap or [0.3] * len(visual_id)
        return {h + 1: {"visual_id": v, "vt_overlap": o} for h, (v, o) in enumerate(zip(visual_id, overlap))}

    # peak at hidden index 3, valley at index 7 (= output of decoder layer 6) → block centred on layer 6
    ids = [10, 14, 20, 17, 14, 11, 9, 10, 12, 12, 11, 11]
    s = suggest_block(profile(ids), 12, fraction=0.25)
    assert (s.start, s.end, s.fallback) == (5, 7, False) and "first local minimum" in s.reason
    s = suggest_block(profile(ids, overlap=[0.1] * 8 + [0.3, 0.5, 0.3, 0.1]), 12, fraction=0.5, rule="overlap_peak")
    assert (s.start, s.end) == (6, 11) and "index 10" in s.reason  # centred on layer 9 (7-12), shifted to fit
    flat = suggest_block(profile([7.0] * 12), 12, fraction=0.5)
    assert flat.fallback and "flat" in flat.reason and (flat.start, flat.end) == (3, 8)  # = middle:0.5
    falling = suggest_block(profile(list(range(20, 8, -1))), 12)
    assert falling.fallback and "no valley" in falling.reason
    rising = suggest_block(profile(list(range(9, 21))), 12)
    assert rising.fallback and "no early peak" in rising.reason
    assert suggest_block(profile([5, float("nan"), 7, 6]), 4).fallback
    assert 'layers: "3-8"' in flat.yaml()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(world, tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("llava"))
    rows = (world / "pairs.jsonl").read_text().splitlines()

    def pairs_file(lines: list[str]) -> Path:
        path = tmp_path / f"pairs{len(list(tmp_path.glob('pairs*')))}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    def fails(args: list[str], *needles: str) -> None:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # one line, the last thing said
        assert err.startswith("error: ") and all(n in err for n in needles), err

    profile = ["profile", "--model", model, "--out", str(tmp_path / "out"), "--image-folder", str(world / "images"),
               "--k", "5"]
    broken = json.loads(rows[3]) | {"image": "test/nowhere.png"}
    fails(profile + ["--pairs", str(pairs_file(rows[:3] + [json.dumps(broken)] + rows[4:]))],
          "line 4", "nowhere.png", "not found")
    fails(profile + ["--pairs", str(pairs_file(rows[:2] + ["{not json"]))], "line 3", "not valid JSON")
    fails(profile + ["--pairs", str(world / "pairs.jsonl"), "--k", "30"], "20 pairs", "k + 2 = 32")
    fails(profile + ["--pairs", str(world / "pairs.jsonl"), "--label", "mood"], "no label 'mood'")
    fails(["profile", "--model", str(tmp_path / "no-model"), "--pairs", str(world / "pairs.jsonl"),
           "--out", str(tmp_path / "o"), "--k", "5"], "does not exist")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "trainable.safetensors"))
    fails(["profile", "--model", str(tmp_path / "trainable.safetensors"), "--pairs", str(world / "pairs.jsonl"),
           "--out", str(tmp_path / "o"), "--k", "5"], "--base")
    fails(["intervene", "--model", model, "--tasks", "colour", "--world", str(world), "--out", str(tmp_path / "i")],
          "colour", "color, count")
    fails(["intervene", "--model", model, "--tasks", "color", "--world", str(world), "--window", "9",
           "--limit", "1", "--out", str(tmp_path / "i")], "window 9")
    fails(["suggest-layers", "--profile", str(tmp_path / "none.json")], "does not exist")
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_bad_analysis_section_before_starting(world, tiny_dir, tmp_path):
    from train.config import ConfigError, load_config
    from train.recipe import train

    base = [f"model={tiny_dir('llava')}", f"data={world / 'train.json'}", f"image_folder={world / 'images'}",
            f"output_dir={tmp_path / 'run'}", "max_steps=1", "report_to=[]"]
    plain = tmp_path / "plain.jsonl"  # a user's pairs without questions: the default (authors) protocol needs them
    plain.write_text("".join(json.dumps({k: r[k] for k in ("id", "image", "caption")}) + "\n"
                             for r in map(json.loads, (world / "pairs.jsonl").read_text().splitlines())))
    for extra, needle in [(["analysis.pairs=/nowhere/pairs.jsonl"], "does not exist"),
                          ([f"analysis.pairs={world / 'pairs.jsonl'}"], "k + 2 = 32"),  # 20 pairs, k = 30
                          ([f"analysis.pairs={world / 'pairs.jsonl'}", "analysis.k=4", "analysis.every=often"],
                           "analysis.every"),
                          ([f"analysis.pairs={world / 'pairs.jsonl'}", "analysis.k=4", "analysis.protocol=theirs"],
                           "analysis.protocol"),
                          ([f"analysis.pairs={plain}", f"analysis.image_folder={world / 'images'}",
                            "analysis.k=4"], "no 'question'")]:
        with pytest.raises(ConfigError, match="analysis") as e:
            train(load_config(None, base + extra))
        assert needle in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing was started
