"""Family adapters on tiny models of every supported family, and the tiny-model round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image

from conftest import FAMILIES
from midtune.adapters import (
    FAMILIES_BY_NAME,
    UnsupportedModelError,
    family_for_config,
    family_of,
    image_token_mask,
)


def load(tiny_dir, family):
    """Load exactly as a user would: vanilla AutoProcessor + the family's class, from the saved directory."""
    path = tiny_dir(family)
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, FAMILIES_BY_NAME[family].model_class).from_pretrained(path)
    return processor, model


def world_batch(processor, world, question="what color is the circle?"):
    image = Image.open(world / "images" / "test" / "test_000000.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_language_layers_not_vision_blocks(tiny_dir, family):
    _, model = load(tiny_dir, family)
    fam = family_of(model)
    assert fam.name == family
    parts = fam.parts(model)
    text_config = model.config.get_text_config()
    assert parts.num_layers == text_config.num_hidden_layers
    # the decoder layers of the *language* model: they take hidden states of the LLM width and own attention
    # projections of that width; none of their parameters belong to the vision tower
    vision_params = {id(p) for p in parts.vision_tower.parameters()}
    for layer in parts.language_layers:
        assert not any(id(p) in vision_params for p in layer.parameters())
        assert layer.input_layernorm.weight.shape == (text_config.hidden_size,)
    assert all(any(p is q for q in parts.vision_tower.parameters()) for p in parts.vision_layers[0].parameters())
    vision_depth = getattr(model.config.vision_config, "num_hidden_layers", None) or model.config.vision_config.depth
    assert parts.num_vision_layers == vision_depth
    # every part is the model's own module
    assert parts.embeddings is model.get_input_embeddings()
    assert parts.lm_head is model.get_output_embeddings()
    owned = {n for n, _ in model.named_parameters()}
    for component, paths in parts.component_paths().items():
        assert paths, component
        for path in paths:
            assert any(n == path or n.startswith(path + ".") for n in owned), (component, path)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_round_trip_forward_on_a_world_image(tiny_dir, world, family):
    processor, model = load(tiny_dir, family)
    batch = world_batch(processor, world)
    mask = image_token_mask(batch["input_ids"], model)
    n_image_tokens = int(mask.sum())
    assert n_image_tokens > 0
    # the image's tokens are one contiguous run
    positions = mask[0].nonzero().flatten()
    assert positions[-1] - positions[0] + 1 == n_image_tokens
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(out.logits).all()
    # the adapter resolves the family from a saved config alone (before loading weights)
    assert family_for_config(transformers.AutoConfig.from_pretrained(tiny_dir(family))).name == family


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_start_at_fan_in_init_not_the_hub_default(tiny_dir, family):
    """Weights drawn with std 1/sqrt(width): the hub default 0.02 left a width-128 LLM stuck at the answer priors."""
    _, model = load(tiny_dir, family)
    parts = family_of(model).parts(model)
    width = model.config.get_text_config().hidden_size
    assert model.config.get_text_config().initializer_range == pytest.approx(width ** -0.5)
    for weight in (parts.embeddings.weight, parts.language_layers[0].self_attn.q_proj.weight, parts.lm_head.weight):
        assert weight.std().item() == pytest.approx(width ** -0.5, rel=0.1)


def test_unsupported_class_lists_supported_ones():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError) as err:
        family_of(model)
    message = str(err.value)
    assert "LlamaForCausalLM" in message
    for fam in FAMILIES_BY_NAME.values():
        assert fam.model_class in message
    with pytest.raises(UnsupportedModelError, match="Qwen2_5_VLForConditionalGeneration"):
        family_for_config(model.config)


def test_tiny_cli_builds_a_loadable_model(world, tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "midtune.tiny", "--family", "qwen2_5_vl", "--data", str(world), "--out", str(out),
           "--layers", "2", "--hidden", "32", "--vision-layers", "1", "--vision-hidden", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "tiny qwen2_5_vl model" in result.stdout
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert family_of(model).parts(model).num_layers == 2
    processor = transformers.AutoProcessor.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(**world_batch(processor, world)).logits).all()
