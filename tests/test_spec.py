"""Tests for layer specs and the freezing plan (midtune.spec). Tiny in-memory models only."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from midtune.adapters import FAMILIES_BY_NAME, TinySize, model_class
from midtune.spec import (
    FreezePlan,
    SpecError,
    TrainableSpec,
    human_count,
    parameter_owner,
    resolve_layers,
    resolve_plan,
)

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
LLAVA_LIKE = ("llava", "llava_next", "llava_onevision")
SIZE = TinySize(
    vocab_size=64, layers=4, hidden=32, heads=4, kv_heads=2, vision_layers=2, vision_hidden=32, vision_heads=4,
    image_size=32, patch_size=8,
    special_ids={"<image>": 60, "<video>": 61, "<|image_pad|>": 62, "<|video_pad|>": 63, "<|vision_start|>": 58,
                 "<|vision_end|>": 59, "<|endoftext|>": 0, "<|im_end|>": 1},
)  # fmt: skip

# Expected ownership written out by hand (not taken from the adapter table), so a wrong table fails the tests.
LLM_LAYER = "model.language_model.layers.{}."
VISION = {f: "model.vision_tower." for f in LLAVA_LIKE} | {"qwen2_vl": "model.visual.", "qwen2_5_vl": "model.visual."}
VISION_LAYER = {f: "model.vision_tower.encoder.layers.{}." for f in LLAVA_LIKE} | {
    "qwen2_vl": "model.visual.blocks.{}.",
    "qwen2_5_vl": "model.visual.blocks.{}.",
}
PROJECTOR = {
    "llava": ("model.multi_modal_projector.",),
    "llava_next": ("model.multi_modal_projector.", "model.image_newline"),
    "llava_onevision": ("model.multi_modal_projector.", "model.image_newline"),
    "qwen2_vl": ("model.visual.merger.",),
    "qwen2_5_vl": ("model.visual.merger.",),
}


def tiny(family: str) -> nn.Module:
    fam = FAMILIES_BY_NAME[family]
    torch.manual_seed(0)
    return model_class(fam)(fam.build_tiny(SIZE))


def names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def matching(model: nn.Module, *prefixes: str) -> set[str]:
    """Parameter names equal to a prefix (bare parameters) or under it (prefixes end with '.')."""
    return {n for n in names(model) if any(n == p or n.startswith(p) for p in prefixes)}


def requires_grad(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, n, expected",
    [
        ("8-23", 32, list(range(8, 24))),
        (" 2 - 5 ", 8, [2, 3, 4, 5]),
        ("0-0", 4, [0]),
        ("-8--1", 32, list(range(24, 32))),
        ("4--1", 8, [4, 5, 6, 7]),
        ("-3-6", 8, [5, 6]),
        ([3, 5, 7], 32, [3, 5, 7]),
        ([7, 3, -1], 32, [3, 7, 31]),  # sorted, negatives normalised
        ((2, 0), 4, [0, 2]),
        ("3,5,7", 32, [3, 5, 7]),
        ("3, -1", 8, [3, 7]),
        (5, 32, [5]),
        (-1, 32, [31]),
        ("5", 32, [5]),
        ("-2", 8, [6]),
        ("all", 4, [0, 1, 2, 3]),
        (" ALL ", 3, [0, 1, 2]),
        ("none", 8, []),
        (None, 8, []),
        ([], 8, []),
        ("first:4", 32, [0, 1, 2, 3]),
        ("last:4", 32, [28, 29, 30, 31]),
        ("last:8", 8, list(range(8))),
        ("First: 2", 8, [0, 1]),
    ],
)
def test_layer_forms(layers, n, expected):
    assert resolve_layers(layers, n) == expected


@pytest.mark.parametrize(
    "frac, n, expected",
    [
        (0.5, 32, list(range(8, 24))),
        (0.5, 8, [2, 3, 4, 5]),
        (0.25, 8, [3, 4]),
        (1.0, 8, list(range(8))),
        (0.3, 10, [3, 4, 5]),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3 layers
        (0.5, 5, [1, 2, 3]),  # 2.5 rounds half *up* to 3 (Python's round() would give 2)
        (0.5, 7, [1, 2, 3, 4]),  # 3.5 → 4; leftover 3 is odd: 1 frozen below, 2 above (extra at the top)
        (0.5, 6, [1, 2, 3]),  # leftover 3: extra frozen layer at the top
        (0.01, 32, [15]),  # rounds to 0 → at least 1, centred with the extra frozen layer on top
        (0.125, 4, [1]),
    ],
)
def test_middle_fraction(frac, n, expected):
    assert resolve_layers(f"middle:{frac}", n) == expected


def test_middle_is_contiguous_and_centred_for_every_size():
    for n in range(1, 41):
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            got = resolve_layers(f"middle:{frac}", n)
            assert got == list(range(got[0], got[-1] + 1))
            below, above = got[0], n - 1 - got[-1]
            assert above - below in (0, 1), (n, frac, got)


@pytest.mark.parametrize(
    "layers, n, message",
    [
        (40, 32, "trainable.layers: layer 40 is out of range for a model with 32 LLM layers (valid: 0..31 or -32..-1)"),
        (-33, 32, "layer -33 is out of range for a model with 32 LLM layers (valid: 0..31 or -32..-1)"),
        ("30-40", 32, "layer 40 is out of range for a model with 32 LLM layers"),
        ("-40--1", 32, "layer -40 is out of range"),
        ([0, 8], 8, "layer 8 is out of range for a model with 8 LLM layers (valid: 0..7 or -8..-1)"),
        ("3,9", 8, "layer 9 is out of range"),
        ("first:40", 32, "'first:40' asks for 40 layers but the model has 32 LLM layers (valid: 1..32)"),
        ("last:9", 8, "'last:9' asks for 9 layers but the model has 8 LLM layers"),
    ],
)
def test_out_of_range(layers, n, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve_layers(layers, n)


@pytest.mark.parametrize(
    "layers, message",
    [
        ("5-3", "'5-3' selects no layers (start 5 is after end 3"),
        ("-1-0", "'-1-0' selects no layers (start 31 is after end 0"),
        ("middle:0", "'middle:0': fraction 0 is outside (0, 1] and selects no layers"),
        ("first:0", "'first:0' selects no layers (first:N needs N >= 1)"),
        ("last:0", "'last:0' selects no layers"),
    ],
)
def test_empty_selection(layers, message):
    with pytest.raises(SpecError) as err:
        resolve_layers(layers, 32)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([3, 3], "layer 3 is listed twice in [3, 3]"),
        ("3,5,3", "layer 3 is listed twice in '3,5,3'"),
        ([31, -1], "31 and -1 in [31, -1] are the same layer (model has 32 LLM layers)"),
    ],
)
def test_duplicates(layers, message):
    with pytest.raises(SpecError) as err:
        resolve_layers(layers, 32)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "layers, message",
    [
        ("abc", "cannot read 'abc' as a layer selection; expected \"all\""),
        ("8-", "cannot read '8-'"),
        ("8..23", "cannot read '8..23'"),
        ("3,,5", "cannot read '3,,5'"),
        ("3,5,", "cannot read '3,5,'"),
        ("", 'empty string; write "none"'),
        (True, 'True is not a layer selection; write "all" or "none"'),
        (2.5, "cannot read 2.5"),
        (["3"], "list entry '3' in ['3'] is not an integer layer index"),
        ([1, True], "list entry True"),
        ("first:x", "'first:x': N in first:N must be a whole number"),
        ("last:2.5", "N in last:N must be a whole number"),
        ("middle:abc", "F in middle:F must be a number in (0, 1]"),
        ("midle:0.5", "unknown form 'midle:0.5'"),
        ("top:3", "unknown form 'top:3'"),
    ],
)
def test_malformed(layers, message):
    with pytest.raises(SpecError) as err:
        resolve_layers(layers, 32)
    assert message in str(err.value)
    assert str(err.value).startswith("trainable.layers: ")


def test_unknown_form_suggests_closest():
    with pytest.raises(SpecError, match="did you mean 'middle:'"):
        resolve_layers("midle:0.5", 32)


@pytest.mark.parametrize("frac", ["1.5", "-0.5", "2", "nan"])
def test_fraction_outside_unit_interval(frac):
    with pytest.raises(SpecError) as err:
        resolve_layers(f"middle:{frac}", 32)
    assert f"fraction {frac} is outside (0, 1]" in str(err.value)


def test_where_prefix_names_the_field():
    with pytest.raises(SpecError, match=r"^stage2\.trainable\.layers: layer 9 is out of range"):
        resolve_layers(9, 4, where="stage2.trainable.layers")


# ---------------------------------------------------------------------------------------------------------
# TrainableSpec.from_dict
# ---------------------------------------------------------------------------------------------------------


def test_from_dict_defaults_and_values():
    spec = TrainableSpec.from_dict({"layers": "8-23", "projector": True})
    assert spec == TrainableSpec(layers="8-23", projector=True)
    assert spec.vision_tower is False and spec.embeddings is False and spec.lm_head is False and spec.norm is False
    spec = TrainableSpec.from_dict({"vision_tower": "last:2", "norm": "true", "lm_head": "False"})
    assert (spec.vision_tower, spec.norm, spec.lm_head) == ("last:2", True, False)
    assert json.loads(json.dumps(TrainableSpec.from_dict({"layers": (1, 2), "norm": True}).to_dict())) == {
        "layers": [1, 2], "vision_tower": False, "projector": False, "embeddings": False, "lm_head": False,
        "norm": True,
    }  # fmt: skip


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(SpecError) as err:
        TrainableSpec.from_dict({"layers": "all", "projecter": True})
    msg = str(err.value)
    assert msg.startswith("trainable: unknown key 'projecter'")
    assert "valid keys: layers, vision_tower, projector, embeddings, lm_head, norm" in msg
    assert "did you mean 'projector'?" in msg
    with pytest.raises(SpecError, match="unknown key 'zzz'") as err:
        TrainableSpec.from_dict({"zzz": 1}, where="cfg.trainable")
    assert str(err.value).startswith("cfg.trainable: ") and "did you mean" not in str(err.value)


@pytest.mark.parametrize("d", [{}, {"layers": "none"}, {"layers": [], "projector": False}, {"vision_tower": "none"}])
def test_nothing_would_train(d):
    with pytest.raises(SpecError, match="trainable: nothing would train"):
        TrainableSpec.from_dict(d)


def test_from_dict_checks_syntax_before_any_model():
    with pytest.raises(SpecError, match=r"trainable\.layers: cannot read '8-'"):
        TrainableSpec.from_dict({"layers": "8-", "projector": True})
    with pytest.raises(SpecError, match=r"trainable\.projector: expected true or false, got 'yes'"):
        TrainableSpec.from_dict({"layers": "all", "projector": "yes"})
    with pytest.raises(SpecError, match="expected a mapping"):
        TrainableSpec.from_dict(["layers"])


@pytest.mark.parametrize(
    "value, message",
    [
        ("last:0", "trainable.vision_tower: 'last:0' selects no layers"),
        ("last:x", "trainable.vision_tower: 'last:x': N in last:N must be a whole number"),
        ("first:2", "trainable.vision_tower: 'first:2' is not valid; use true / \"all\""),
        (3, "trainable.vision_tower: 3 is not valid"),
    ],
)
def test_vision_tower_values(value, message):
    with pytest.raises(SpecError) as err:
        TrainableSpec.from_dict({"vision_tower": value})
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# The plan on tiny models of every family
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_trainable_set(family):
    model = tiny(family)
    plan = resolve_plan(model, {"layers": [1, -1], "projector": True, "norm": True})
    expected = matching(
        model, LLM_LAYER.format(1), LLM_LAYER.format(3), *PROJECTOR[family], "model.language_model.norm."
    )
    assert plan.trainable_names == expected
    assert plan.trainable_layers == [1, 3] and plan.first_trainable_layer == 1
    assert plan.trains_below_llm  # the projector trains
    # Every parameter sits in exactly one row; counts add up.
    owned = [n for r in plan.rows for n in r.names]
    assert len(owned) == len(set(owned)) and set(owned) == names(model)
    assert plan.num_total == sum(p.numel() for p in model.parameters())
    assert plan.num_trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert [r.name for r in plan.rows] == [
        "embeddings", "vision_tower", "vision_tower.layers.0", "vision_tower.layers.1", "projector",
        "llm.layers.0", "llm.layers.1", "llm.layers.2", "llm.layers.3", "norm", "lm_head", "other",
    ]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_layers_are_never_vision_blocks(family):
    model = tiny(family)
    vision_layer0 = matching(model, VISION_LAYER[family].format(0))
    assert vision_layer0  # the vision tower has a layer 0 too
    plan = resolve_plan(model, {"layers": [0]})
    assert plan.trainable_names == matching(model, LLM_LAYER.format(0))
    assert not plan.trainable_names & matching(model, VISION[family])
    assert not plan.trains_below_llm
    assert set(plan.row("vision_tower.layers.0").names) == vision_layer0
    assert set(plan.row("llm.layers.0").names) == matching(model, LLM_LAYER.format(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_component_rows(family):
    model = tiny(family)
    plan = resolve_plan(model, {"layers": "none", "embeddings": True, "lm_head": True})
    assert set(plan.row("embeddings").names) == {"model.language_model.embed_tokens.weight"}
    assert set(plan.row("lm_head").names) == {"lm_head.weight"}
    assert set(plan.row("norm").names) == {"model.language_model.norm.weight"}
    assert set(plan.row("projector").names) == matching(model, *PROJECTOR[family])
    assert plan.trainable_names == {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert plan.trainable_layers == [] and plan.first_trainable_layer is None
    assert plan.row("other").names == []


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_merger_is_projector_not_vision_tower(family):
    model = tiny(family)
    merger = matching(model, "model.visual.merger.")
    assert merger
    plan = resolve_plan(model, {"vision_tower": True})
    assert set(plan.row("projector").names) == merger and not plan.row("projector").trainable
    tower = {n for r in plan.rows if r.name.startswith("vision_tower") for n in r.names}
    assert tower == matching(model, "model.visual.") - merger
    assert plan.trainable_names == tower  # the whole tower trains, the merger does not
    assert parameter_owner("model.visual.merger.mlp.0.weight", FAMILIES_BY_NAME[family].parts(model)) == "projector"
    assert parameter_owner("model.visual.blocks.1.attn.qkv.weight", FAMILIES_BY_NAME[family].parts(model)) == (
        "vision_tower.layers.1"
    )
    plan = resolve_plan(model, {"projector": True})
    assert plan.trainable_names == merger


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_image_newline_is_projector(family):
    model = tiny(family)
    plan = resolve_plan(model, {"projector": True})
    assert "model.image_newline" in plan.row("projector").names
    assert "model.image_newline" in plan.trainable_names
    assert plan.trainable_names == matching(model, "model.multi_modal_projector.", "model.image_newline")
    assert "model.image_newline" not in plan.row("other").names


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_last_n(family):
    model = tiny(family)
    plan = resolve_plan(model, {"vision_tower": "last:1"})
    assert plan.trainable_names == matching(model, VISION_LAYER[family].format(1))
    assert plan.trainable_vision_layers == [1]
    frozen_tower = matching(model, VISION[family]) - matching(model, VISION_LAYER[family].format(1))
    assert frozen_tower - matching(model, *PROJECTOR[family])  # patch embeddings, layer 0, norms: all frozen
    assert not plan.row("vision_tower").trainable and plan.row("vision_tower").names
    assert plan.trains_below_llm
    with pytest.raises(SpecError, match="'last:3' asks for 3 layers but the model has 2 vision layers"):
        resolve_plan(model, {"vision_tower": "last:3"})


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_sets_exactly_the_planned_flags(family):
    model = tiny(family)
    plan = resolve_plan(model, {"layers": "middle:0.5", "vision_tower": "last:1", "projector": True})
    expected = matching(
        model, LLM_LAYER.format(1), LLM_LAYER.format(2), VISION_LAYER[family].format(1), *PROJECTOR[family]
    )
    assert plan.trainable_names == expected
    for start in (True, False):  # whatever the flags were before
        model.requires_grad_(start)
        assert plan.apply(model) is model
        assert requires_grad(model) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_table_totals(family):
    model = tiny(family)
    plan = resolve_plan(model, {"layers": "2-3", "projector": True})
    table = plan.table()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if n in plan.trainable_names)
    last = table.splitlines()[-1]
    assert last.split()[:3] == ["TOTAL", human_count(trainable), human_count(total - trainable)]
    assert f"({100 * trainable / total:.2f}% of {human_count(total)} trainable)" in last
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:-2]}
    # Frozen layers 0-1 and trainable layers 2-3 collapse into one row each.
    layer_rows = [k for k in lines if k.startswith("llm.layers")]
    assert layer_rows == ["llm.layers.0-1", "llm.layers.2-3"]
    layers23 = sum(
        p.numel() for n, p in model.named_parameters() if n in matching(model, *map(LLM_LAYER.format, (2, 3)))
    )
    assert lines["llm.layers.2-3"] == [human_count(layers23), "0"]
    assert lines["projector"][1] == "0" and lines["embeddings"][0] == "0"
    assert "other" not in lines  # empty: not shown


def test_table_lists_every_status_boundary():
    model = tiny("llava")
    table = resolve_plan(model, {"layers": [0, 2, 3]}).table()
    rows = [line.split()[0] for line in table.splitlines() if line.startswith("llm.layers")]
    assert rows == ["llm.layers.0", "llm.layers.1", "llm.layers.2-3"]


@pytest.mark.parametrize(
    "n, text", [(0, "0"), (999, "999"), (1234, "1.23K"), (1_234_567, "1.23M"), (999_999, "1.00M"), (7e9, "7.00B")]
)
def test_human_count(n, text):
    assert human_count(n) == text


def test_to_dict_is_json():
    model = tiny("llava_next")
    plan = resolve_plan(model, {"layers": "last:2", "projector": True})
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["trainable_layers"] == [2, 3] and d["first_trainable_layer"] == 2
    assert d["num_total"] == sum(p.numel() for p in model.parameters())
    assert d["num_trainable"] == plan.num_trainable
    assert d["spec"]["layers"] == "last:2" and d["family"] == "llava_next"
    assert set(d["trainable_names"]) == plan.trainable_names
    assert [r["name"] for r in d["rows"]] == [r.name for r in plan.rows]


def test_unmatched_parameters_go_to_other_and_stay_frozen():
    model = tiny("llava")
    model.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    plan = resolve_plan(model, {"layers": "all", "vision_tower": True, "projector": True, "embeddings": True,
                                "lm_head": True, "norm": True})  # fmt: skip
    assert plan.row("other").names == ["extra"] and not plan.row("other").trainable
    assert plan.trainable_names == names(model) - {"extra"}
    plan.apply(model)
    assert not model.extra.requires_grad
    assert "other" in plan.table()


def test_component_that_matches_nothing_is_an_error():
    model = tiny("llava")
    model.model.multi_modal_projector = nn.Identity()  # exists, but owns no parameters
    with pytest.raises(
        SpecError, match=r"^trainable\.projector: matched no parameters in LlavaForConditionalGeneration"
    ):
        resolve_plan(model, {"layers": "all", "projector": True})
    resolve_plan(model, {"layers": "all"})  # not requested: fine


def test_tied_lm_head_is_explained():
    model = tiny("qwen2_vl")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tie_word_embeddings
    with pytest.raises(SpecError) as err:
        resolve_plan(model, {"lm_head": True})
    msg = str(err.value)
    assert msg.startswith("trainable.lm_head: matched no parameters in Qwen2VLForConditionalGeneration")
    assert "tied to model.language_model.embed_tokens.weight" in msg and "'embeddings'" in msg
    plan = resolve_plan(model, {"embeddings": True})
    plan.apply(model)
    assert model.lm_head.weight.requires_grad  # the same tensor


def test_wrapped_model_is_unwrapped():
    class Wrapper(nn.Module):  # what torch.compile leaves: the real model under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    model = tiny("llava")
    wrapped = Wrapper(model)
    plan = resolve_plan(wrapped, {"layers": [2]})
    assert plan.trainable_names == matching(model, LLM_LAYER.format(2))
    assert plan.apply(wrapped) is wrapped
    assert requires_grad(model) == matching(model, LLM_LAYER.format(2))


def test_plan_rejects_a_different_model():
    plan = resolve_plan(tiny("llava"), {"layers": [0]})
    with pytest.raises(SpecError, match="plan was made for a different model"):
        plan.apply(tiny("qwen2_vl"))


def test_plan_range_errors_name_the_model_size():
    model = tiny("llava")
    with pytest.raises(
        SpecError, match=r"layer 4 is out of range for a model with 4 LLM layers \(valid: 0\.\.3 or -4\.\.-1\)"
    ):
        resolve_plan(model, {"layers": [4]})
    assert isinstance(resolve_plan(model, TrainableSpec(layers="all")), FreezePlan)
