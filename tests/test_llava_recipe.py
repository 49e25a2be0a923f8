"""LLaVA-1.5 as published: pad-to-square images (`image_aspect_ratio: pad`), saved with the model so evaluation
and analysis shape images alike, and the `plain` conversation of stage 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_train import run

from conftest import FAMILIES
from midtune.checkpoint import load_pretrained, load_with_delta
from midtune.data import SupervisedDataset, conversation_template, parse_row, render_text
from midtune.images import fit_images, image_aspect_ratio, pad_colour, pad_to_square, set_image_aspect_ratio

ROOT = Path(__file__).resolve().parents[1]


def wide_image_with_marked_edges(width=96, height=64) -> Image.Image:
    """A 3:2 grey image whose leftmost and rightmost eighths are red: what a centre crop cuts off."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    for x in list(range(width // 8)) + list(range(width - width // 8, width)):
        for y in range(height):
            image.putpixel((x, y), (255, 0, 0))
    return image


def red_share(pixel_values: torch.Tensor, processor) -> float:
    """The fraction of the processed image's pixels that are (de-normalised) red."""
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    rgb = pixel_values[0] * std + mean
    return float(((rgb[0] > 0.9) & (rgb[1] < 0.1)).float().mean())


def test_pad_keeps_the_edges_a_centre_crop_cuts_and_fills_with_the_processors_mean(tiny_dir):
    _, processor = load_pretrained(str(tiny_dir("llava")))
    image = wide_image_with_marked_edges()
    padded = pad_to_square(image, pad_colour(processor))
    assert padded.size == (96, 96) and padded.getpixel((0, 40)) == (255, 0, 0)  # centred, the long side kept
    assert padded.getpixel((48, 2)) == tuple(int(x * 255) for x in processor.image_processor.image_mean)
    native = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert image_aspect_ratio(processor) == "native" and fit_images(processor, [image]) == [image]
    set_image_aspect_ratio(processor, "pad")
    shaped = processor.image_processor(images=fit_images(processor, [image]), return_tensors="pt")["pixel_values"]
    # CLIP's resize + centre crop keeps 2/3 of the width: most of the red edges are gone; padded they stay
    assert red_share(native, processor) < 0.5 * red_share(shaped, processor)
    assert red_share(shaped, processor) == pytest.approx(0.25 * 64 / 96, abs=0.04)
    with pytest.raises(ValueError, match="native, pad"):
        set_image_aspect_ratio(processor, "square")


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_lengths_counted_from_headers_match_the_processed_items(world, tiny_dir, family, tmp_path):
    """The upfront length check counts image tokens from header sizes: with pad it must count the padded square
    (Qwen2-VL's token count follows the image's size), or every item would disagree with its check."""
    _, processor = load_pretrained(str(tiny_dir(family)))
    set_image_aspect_ratio(processor, "pad")
    wide = tmp_path / "wide.png"
    wide_image_with_marked_edges(80, 48).save(wide)
    rows = [{"id": "wide", "image": str(wide), "conversations": [
        {"from": "human", "value": "<image>\nwhat is at the edges?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    dataset = SupervisedDataset(tmp_path / "rows.json", processor, image_folder=tmp_path, allow_outside_images=True)
    assert len(dataset[0]["input_ids"]) == dataset.lengths[0]


def test_a_run_with_pad_saves_it_with_the_model_and_its_delta_so_eval_applies_it(world, tiny_dir, tmp_path):
    base = tiny_dir("llava")
    run(world, base, tmp_path / "run", max_steps=1, image_aspect_ratio="pad", **{"trainable.layers": "1"})
    final = tmp_path / "run" / "final"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["image_aspect_ratio"] == "pad"
    _, merged_processor = load_pretrained(str(final))
    assert image_aspect_ratio(merged_processor) == "pad"  # processor_config.json of the merged model
    with safe_open(str(final / "delta.safetensors"), framework="pt") as f:
        assert f.metadata()["image_aspect_ratio"] == "pad"
    _, processor = load_with_delta(str(base), final / "delta.safetensors")  # the base's processor says native
    assert image_aspect_ratio(processor) == "pad"
    from eval.lmms_plugin import Midtune

    lm = Midtune(pretrained=str(final), device="cpu", dtype="float32")
    lm.task_dict = {"t": {"test": [{"image": wide_image_with_marked_edges()}]}}
    (shaped,) = lm._visuals(lambda doc: [doc["image"]], "t", "test", 0)
    assert shaped.size == (96, 96)  # the evaluated model sees its images as it trained on them


def test_the_plain_conversation_is_the_image_then_the_caption_and_the_model_keeps_its_chat_template(
        world, tiny_dir, tmp_path):
    _, processor = load_pretrained(str(tiny_dir("llava")))
    row = {"id": "c", "image": "train/train_000000.png", "conversations": [
        {"from": "human", "value": "<image>\nGive a short description of the image."},
        {"from": "gpt", "value": "a purple triangle"}]}
    sample = parse_row(row, 0, "rows.json", world / "images", False)
    rendered = render_text(processor, sample, conversation_template(processor, "plain"))
    eos = processor.tokenizer.eos_token
    assert rendered.text == f"<image>a purple triangle{eos}"  # no roles, no prompt text (LLaVA's preprocess_plain)
    labelled = processor.tokenizer.decode([i for i, lab in zip(rendered.ids, rendered.is_label) if lab])
    assert labelled == f"a purple triangle{eos}" and not rendered.is_label[0]

    (tmp_path / "captions.json").write_text(json.dumps([row] * 4))
    run(world, tiny_dir("llava"), tmp_path / "align", data=tmp_path / "captions.json", max_steps=1,
        conversation="plain", **{"trainable.layers": "none", "trainable.projector": "true"})
    _, trained = load_pretrained(str(tmp_path / "align" / "final"))
    assert trained.chat_template == processor.chat_template  # stage 2 renders with the chat template again


def test_the_shipped_llava_configs_are_llava_1_5_as_published():
    from train.config import load_config

    configs = sorted((ROOT / "configs" / "llava-1.5-7b").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(str(path), [])
        assert config.image_aspect_ratio == "pad", path.name
        assert config.conversation == ("plain" if path.name == "stage_b_align.yaml" else "chat"), path.name
        assert config.global_batch_size == (256 if path.name == "stage_b_align.yaml" else 128), path.name
