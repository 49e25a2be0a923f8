"""Looking inside: the logit lens, head ranking and editing, token-level attention knockout (every family)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from analysis.__main__ import main
from analysis.extract import Extractor, ExtractSettings, load_model, read_pairs, resolve_model
from analysis.heads import HeadEdit, HeadSettings, concept_words, dictionary, pursuit, rank_heads
from analysis.intervene import AttentionKnockout, knockout_block, read_questions
from analysis.lens import LogitLens, concept_tokens, rank_and_mass
from conftest import FAMILIES, TINY

NUM_LAYERS, NUM_HEADS = TINY["layers"], TINY["heads"]
PLANTED = (1, 2)  # (layer, head) made to write "red"


def question_inputs(model, processor, world):
    """A colour question's prompt with its image, as the model takes it."""
    q = read_questions(world, ["color"], limit=1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from midtune.data import load_image

    return dict(processor(text=[prompt], images=[load_image(str(q.image))], return_tensors="pt"))


# ---------------------------------------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_at_the_last_layer_is_the_models_own_logits(family, world, tiny_dir):
    from midtune.adapters import family_of

    model, processor = load_model(resolve_model(str(tiny_dir(family))), device="cpu")
    # a norm weight of ones makes the norm idempotent, and a lens that normed the last state twice would pass
    with torch.no_grad():
        family_of(model).parts(model).norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    extractor = Extractor(model, processor, ExtractSettings())
    enc, image_mask = extractor.encode_images(read_pairs(world / "pairs.jsonl", max_pairs=2))
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, use_cache=False)
    lens = LogitLens(model)
    assert lens.num_layers == NUM_LAYERS and len(out.hidden_states) == NUM_LAYERS + 1
    torch.testing.assert_close(lens.logits(out.hidden_states[-1], NUM_LAYERS), out.logits.float())
    # an earlier state goes through the final norm first: decoding it without would be another number
    inner = lens.logits(out.hidden_states[2], 2)
    raw = model.lm_head(out.hidden_states[2]).float()
    assert not torch.allclose(inner, raw)
    assert image_mask.sum() > 0


def test_rank_and_probability_of_a_word():
    logits = torch.tensor([[0.0, 5.0, 3.0, 1.0], [2.0, 1.0, 0.0, 4.0]])
    rank, mass = rank_and_mass(logits, torch.tensor([[2, -1], [1, 2]]))
    assert rank.tolist() == [2, 3]  # 1 = top; row 0: only token 1 scores above 3; row 1: tokens 3 and 0 above 1
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(mass, torch.stack([probs[0, 2], probs[1, 1] + probs[1, 2]]))


def test_a_words_tokens_start_the_word(tiny_dir):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_dir("llava")).tokenizer
    ids = concept_tokens(tokenizer, "red")
    assert ids and all(tokenizer.decode([i]).strip().lower() == "red" for i in ids)
    assert concept_tokens(tokenizer, "zqxjv") == []  # pieces shorter than 3 letters do not stand for a word


def test_logit_lens_command(world, tiny_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    rc = main(["logit-lens", "--model", f"a={tiny_dir('llava')}", "--model", f"b={tiny_dir('qwen2_vl')}",
               "--pairs", str(world / "pairs.jsonl"), "--max-pairs", "6", "--top-k", "5", "--examples", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "lens.json").read_text())
    assert list(doc["models"]) == ["a", "b"] and doc["settings"]["labels"] == ["dominant_color", "dominant_shape"]
    for model in doc["models"].values():
        assert model["n_pairs"] == 6 and model["num_layers"] == NUM_LAYERS
        for readouts in model["concepts"].values():
            for values in readouts.values():
                assert len(values["median_rank"]) == NUM_LAYERS + 1
                assert all(1 <= r <= model["vocab_size"] for r in values["median_rank"])  # 1 = the top token
                assert all(0 <= f <= 1 for f in values["top_k_fraction"])
                first = values["first_top_k_layer"]
                assert first is None or values["top_k_fraction"][first] >= 0.5
                assert first is None or all(f < 0.5 for f in values["top_k_fraction"][:first])
        assert len(model["examples"]) == 2 and len(model["examples"][0]["top_k"]) == NUM_LAYERS + 1
        assert len(model["examples"][0]["top_k"][0]) == 5
    rows = list(csv.DictReader((out / "lens.csv").open()))
    assert len(rows) == 2 * 2 * 2 * (NUM_LAYERS + 1)  # models × concepts × readouts × hidden states
    assert (out / "lens.png").stat().st_size > 0 and len(doc["summary"]) == 4

    rc = main(["logit-lens", "--model", str(tiny_dir("llava")), "--pairs", str(world / "pairs.jsonl"),
               "--labels", "nonexistent", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 2 and "no label 'nonexistent'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------


def plant_red_head(model, processor, world) -> tuple[int, dict]:
    """Make head PLANTED write the "red" unembedding direction, with a positive sign at the colour question's last
    position; returns red's token id and that question's inputs."""
    from midtune.adapters import family_of

    parts = family_of(model).parts(model)
    red = concept_tokens(processor.tokenizer, "red")[0]
    inputs = question_inputs(model, processor, world)
    layer, head = PLANTED
    proj = parts.attention_output(layer)
    d = proj.in_features // parts.num_heads
    seen = {}
    handle = proj.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0][0, -1].detach().clone()))
    with torch.no_grad():
        model(**inputs, use_cache=False)
    handle.remove()
    z = seen["z"][head * d:(head + 1) * d]
    a = z / z.norm()
    u = dictionary(model)[red]
    with torch.no_grad():
        proj.weight[:, head * d:(head + 1) * d] = 5.0 * torch.outer(u, a) / z.norm()
    return red, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_head_ranks_first_and_suppressing_it_lowers_its_word(family, world, tiny_dir):
    model, processor = load_model(resolve_model(str(tiny_dir(family))), device="cpu")
    red, inputs = plant_red_head(model, processor, world)
    pairs = read_pairs(world / "pairs.jsonl", max_pairs=8)
    words = concept_words(pairs, "color")
    assert "red" in words
    ranking = rank_heads(model, processor, pairs, HeadSettings("color", words, atoms=4), progress=False)
    top = ranking["ranked"][0]
    assert (top["layer"], top["head"]) == PLANTED and top["relevance"] > 0.9
    assert all(r["relevance"] < 0.5 for r in ranking["ranked"][1:])
    assert top["affinity"] > 0.9  # its output lies along one concept atom
    assert ranking["num_heads"] == NUM_HEADS and ranking["samples"] > 0

    others = sorted({t for w in (*words, *concept_words(pairs, "shape")) if w != "red"
                     for t in concept_tokens(processor.tokenizer, w)} - {red})
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits[0, -1].float()
        with HeadEdit(model, [PLANTED], scale=0.0):
            after = model(**inputs, use_cache=False).logits[0, -1].float()
        restored = model(**inputs, use_cache=False).logits[0, -1].float()
    delta = after - before
    assert delta[red] < 0 and bool((delta[red] < delta[others]).all())
    torch.testing.assert_close(restored, before)  # the edit is gone with its context


def test_pursuit_finds_the_atoms_a_signal_is_made_of():
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(50, 16, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    x = torch.randn(6, 1, generator=gen) * atoms[7] + 0.5 * torch.randn(6, 1, generator=gen) * atoms[31]
    taken, energies = pursuit(x, atoms, steps=3)
    assert taken[:2] == [7, 31]
    assert sum(energies[:2]) == pytest.approx(float(x.square().sum()), rel=1e-4)  # two atoms explain it all


def test_heads_command_with_an_edit(world, tiny_dir, tmp_path, capsys):
    out = tmp_path / "heads"
    rc = main(["heads", "--model", str(tiny_dir("llava")), "--concept", "shape", "--world", str(world),
               "--max-pairs", "6", "--atoms", "3", "--edit", "suppress", "--top", "0.1", "--limit", "4",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "heads.json").read_text())
    assert len(doc["ranked"]) == NUM_LAYERS * NUM_HEADS
    relevance = [r["relevance"] for r in doc["ranked"]]
    assert relevance == sorted(relevance, reverse=True) and all(0 <= v <= 1 + 1e-6 for v in relevance)
    keys = [(r["relevance"], r["affinity"]) for r in doc["ranked"]]  # ties (most heads: 0) go by affinity
    assert keys == sorted(keys, reverse=True) and len({a for _, a in keys}) > 1
    edit = doc["edit"]
    conditions = edit["conditions"]
    assert len(conditions["edited"]["heads"]) == 2 == len(conditions["random"]["heads"])  # round(0.1 × 16)
    assert not set(conditions["edited"]["heads"]) & set(conditions["random"]["heads"])
    assert conditions["none"]["heads"] == [] and edit["n_questions"] == {"color": 4, "shape": 4}
    for c in conditions.values():
        assert set(c["accuracy"]) == {"color", "shape", "mean"} and 0 <= c["p_answer"]["color"] <= 1
    table = (out / "edit.md").read_text()
    assert "| none |" in table and "2 random (× 0)" in table
    assert (out / "heads.png").stat().st_size > 0 and (out / "heads.csv").is_file()


def test_bad_heads_and_lens_input_fails_before_a_model_loads(world, tiny_dir, tmp_path, capsys, monkeypatch):
    import analysis.extract

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(analysis.extract, "load_model", no_model)
    model = str(tiny_dir("llava"))
    heads = ["heads", "--model", model, "--world", str(world), "--out", str(tmp_path / "bad"), "--no-progress"]
    for args, needle in [
        (["--concept", "flavour"], "'_flavour'"),
        (["--concept", "color", "--words", "red,zqxjv"], "no token that starts the word 'zqxjv'"),
        (["--concept", "color", "--scale", "0.5"], "--scale applies to an edit"),
        (["--concept", "color", "--edit", "suppress", "--tasks", ","], "--tasks is empty"),
        (["--concept", "color", "--edit", "suppress", "--tasks", "flavour"], "task 'flavour'"),
        (["--concept", "color", "--top", "0"], "--top must be a fraction"),
    ]:
        assert main(heads + args) == 2, args
        assert needle in capsys.readouterr().err, args
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()[:3]]
    rows[1]["labels"]["dominant_color"] = "zqxjv"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["logit-lens", "--model", model, "--pairs", str(pairs), "--image-folder", str(world / "images"),
               "--out", str(tmp_path / "bad"), "--no-progress"])
    assert rc == 2 and "no token that starts the word 'zqxjv'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------
# Token-level knockout
# ---------------------------------------------------------------------------------------------------------


def test_knockout_blocks_for_each_target():
    ids = torch.tensor([[5, 9, 9, 6, 7, 8]])  # 9 = image token
    block = {t: knockout_block(ids, 9, t, last=torch.tensor([3]))[0] for t in
             ("image", "last-image", "after-image", "last")}
    assert block["image"].nonzero().tolist() == [[q, k] for q in (3, 4, 5) for k in (1, 2)]
    assert block["last-image"].nonzero().tolist() == [[q, 2] for q in (3, 4, 5)]
    assert block["after-image"].nonzero().tolist() == [[q, 3] for q in (4, 5)]
    assert block["last"].nonzero().tolist() == [[q, 3] for q in (4, 5)]
    assert not knockout_block(torch.tensor([[5, 6, 7]]), 9, "last-image").any()  # no image: nothing blocked


@pytest.mark.parametrize("family", FAMILIES)
def test_knocking_out_a_token_nothing_later_sees_changes_nothing(family, world, tiny_dir):
    model, processor = load_model(resolve_model(str(tiny_dir(family))), device="cpu")
    inputs = question_inputs(model, processor, world)
    with torch.no_grad():
        base = model(**inputs, use_cache=False).logits
        with AttentionKnockout(model, target="last") as knockout:  # no prompt end given: the sequence's last token
            knockout.layers = range(NUM_LAYERS)
            same = model(**inputs, use_cache=False).logits
            assert knockout.applied == NUM_LAYERS
        with AttentionKnockout(model, target="last-image") as knockout:
            knockout.layers = range(NUM_LAYERS)
            cut = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert not torch.allclose(cut[0, -1], base[0, -1])  # the last image token did carry something


def test_blocking_the_prompts_last_token_moves_only_later_answer_tokens(world, tiny_dir):
    from analysis.intervene import ChoiceScorer, Question

    model, processor = load_model(resolve_model(str(tiny_dir("llava"))), device="cpu")
    q = read_questions(world, ["color"], limit=1)[0]
    q = Question(**{**vars(q), "choices": ["red", "a red circle at the top"], "answer": "red"})
    scorer = ChoiceScorer(model, processor, [q])
    lengths = [n for _, meta in scorer.batches for _, _, n in meta]
    assert lengths[0] == 1 and lengths[1] > 2
    base = scorer.nll()[0]
    with AttentionKnockout(model, target="last") as knockout:
        scorer.knockout = knockout
        knockout.layers = range(NUM_LAYERS)
        blocked = scorer.nll()[0]
        assert knockout.applied == NUM_LAYERS
    assert blocked[0] == base[0]  # one token: predicted at the blocked token itself, so it cannot move
    assert blocked[1] != base[1]  # its later tokens no longer see the prompt's last token


def test_intervention_command_with_a_token_target(world, tiny_dir, tmp_path):
    out = tmp_path / "knockout"
    rc = main(["intervene", "--model", str(tiny_dir("qwen2_vl")), "--tasks", "color", "--world", str(world),
               "--window", "2", "--limit", "3", "--target", "last", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "intervention.json").read_text())
    assert result["target"] == "last" and "prompt's last token" in result["block"]
    assert [(w["start"], w["end"]) for w in result["windows"]] == [(0, 2), (1, 3), (2, 4)]
    assert result["single_token_choices"] is True  # colours are one token each: the command warns
    # one-token answers cannot move when only the prompt's last token is blocked
    assert result["all_layers"]["changed"] == 0 and result["all_layers"]["accuracy"] == result["baseline"]["accuracy"]
