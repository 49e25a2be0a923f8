"""Loading models, and the delta checkpoint format shared by train, eval and analysis.

A *delta* is a safetensors file holding only the tensors a run trained, with metadata naming the base model
and a hash of the base's weight files, so that `base + delta` can be rebuilt (and a wrong base refused):

    metadata = {"format": "midtune-delta/1", "method": "full" | "lora", "base_model": ..., "base_hash": ...,
                "lora_config": <json, for method lora>, "trainable": <json spec>}

For `method: full` the tensors are the trained parameters under their model names. For `method: lora` they are
PEFT's adapter tensors (names as in `get_peft_model_state_dict`) plus any fully trained components; export
merges them through PEFT.

Deltas and merged directories are written atomically (midtune.files), so a crash never leaves a half-written
checkpoint where a complete one is expected.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from midtune.adapters import family_for_config, model_class
from midtune.files import atomic_dir, atomic_file

DELTA_FORMAT = "midtune-delta/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' attention kernels; the two flash ones need their own packages (flash-attn, kernels).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class CheckpointError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention implementation transformers cannot run here, before any weights are read."""
    if name is None:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(f"attn_implementation {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise CheckpointError("attn_implementation 'flash_attention_2' needs the flash-attn package "
                                  "(pip install flash-attn --no-build-isolation, on a CUDA machine); or use 'sdpa'")


def attn_implementations(model) -> dict[str, str]:
    """Which attention implementation each part of a loaded model runs ({"model": ..., "text": ..., ...})."""
    config = getattr(model, "config", None)
    found = {"model": getattr(config, "_attn_implementation", None)}
    for part in ("text_config", "vision_config"):
        sub = getattr(config, part, None)
        if sub is not None and getattr(sub, "_attn_implementation", None):
            found[part.removesuffix("_config")] = sub._attn_implementation
    return {k: v for k, v in found.items() if v}


def load_pretrained(path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
                    device_map=None, attn_implementation: str | None = "sdpa"):
    """(model, processor) of any supported family from a directory or hub id, via vanilla transformers.
    `attn_implementation`: sdpa (default), eager, flash_attention_2 (needs flash-attn), ...; None: transformers'
    own choice."""
    from transformers import AutoConfig, AutoProcessor

    check_attn_implementation(attn_implementation)

    local = Path(path)
    if (path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise CheckpointError(f"model {path!r}: no such model directory (expected a config.json in it)")
    from safetensors import SafetensorError

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {path!r}: cannot read its config: {_first_line(e)}") from None
    family = family_for_config(config)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = model_class(family).from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, device_map=device_map, **extra
        )
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, truncated or mismatched files
        raise CheckpointError(f"model {path!r}: cannot load it: {type(e).__name__}: {_first_line(e)}") from None
    return model, processor


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def weight_files(path: str) -> list[Path]:
    """The safetensors files of a local model directory or a cached hub model."""
    local = Path(path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(local.glob("*.safetensors"))
    files = [f for f in files if f.name != "delta.safetensors"]
    if not files:
        raise CheckpointError(f"model {path!r}: no *.safetensors weight files")
    return files


def base_hash(path: str) -> str:
    """sha256 over the base model's weight files (names and bytes): identifies the exact weights."""
    digest = hashlib.sha256()
    for f in weight_files(path):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Delta
# ---------------------------------------------------------------------------------------------------------


def save_delta(path: Path, tensors: dict[str, torch.Tensor], *, base_model: str, base_hash: str, method: str,
               trainable: dict, lora_config: dict | None = None, image_aspect_ratio: str | None = None) -> None:
    """`image_aspect_ratio`: how the trained model's images are shaped (midtune.images), applied to the base's
    processor when the delta is loaded onto it."""
    from safetensors.torch import save_file

    metadata = {
        "format": DELTA_FORMAT,
        "method": method,
        "base_model": str(base_model),
        "base_hash": base_hash,
        "trainable": json.dumps(trainable),
    }
    if lora_config is not None:
        metadata["lora_config"] = json.dumps(lora_config)
    if image_aspect_ratio is not None:
        metadata["image_aspect_ratio"] = image_aspect_ratio
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"delta {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"delta {str(path)!r}: not a readable safetensors file ({e})") from None
    if metadata.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"delta {str(path)!r}: not a midtune delta (metadata format={metadata.get('format')!r})")
    return tensors, metadata


def check_base(metadata: dict[str, str], base: str, delta_path: str | Path) -> None:
    actual = base_hash(base)
    if metadata["base_hash"] != actual:
        raise CheckpointError(
            f"delta {str(delta_path)!r} was trained on base {metadata['base_model']!r} "
            f"({metadata['base_hash'][:19]}…), "
            f"but {base!r} has different weights ({actual[:19]}…)"
        )


def apply_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> torch.nn.Module:
    """Write a delta into `model` (in place for full deltas; returns the merged model for LoRA deltas)."""
    if metadata["method"] == "lora":
        return merge_lora(model, tensors, json.loads(metadata["lora_config"]))
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise CheckpointError(f"delta tensor {name!r} does not exist in {type(model).__name__}")
        if params[name].shape != value.shape:
            raise CheckpointError(f"delta tensor {name!r}: shape {tuple(value.shape)} ≠ model "
                                  f"{tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    return model


def merge_lora(model, tensors: dict[str, torch.Tensor], lora_config: dict):
    """`model` with LoRA adapters merged in through PEFT (W + lora_alpha / r · B A): the one LoRA merge, used by
    export, eval and analysis. `tensors`: PEFT's adapter tensors (names as in `get_peft_model_state_dict`) plus
    any fully trained components under their model names. Returns the merged model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    try:
        peft_model = get_peft_model(model, LoraConfig(**lora_config))
    except ValueError as e:  # PEFT: target modules not found in the model
        raise CheckpointError(f"LoRA adapters do not match {type(model).__name__}: {e}") from None
    adapter = {k: v for k, v in tensors.items() if "lora_" in k}
    result = set_peft_model_state_dict(peft_model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"LoRA delta has tensors the model does not: {result.unexpected_keys[:3]}")
    merged = peft_model.merge_and_unload()
    full = {k: v for k, v in tensors.items() if "lora_" not in k}
    if full:
        apply_delta(merged, full, {"method": "full"})
    return merged


LORA_PARAMETER = re.compile(r"(.*)\.lora_([AB])\.[^.]+\.weight")


def apply_trained_tensors(model, tensors: dict[str, torch.Tensor], lora_scale: float | None = None):
    """`model` with a training checkpoint's `trainable.safetensors` written in (it names tensors as the PEFT-wrapped
    model's parameters: `X.lora_A.default.weight`, `X.base_layer.weight`). LoRA pairs are merged by merge_lora,
    with the adapter config rebuilt from the tensors (r from their shape) and `lora_scale` (alpha / r), which
    a checkpoint does not record. Returns the model (a new object when LoRA was merged)."""
    adapters: dict[str, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}
    modules: dict[str, int] = {}
    for name, value in tensors.items():
        m = LORA_PARAMETER.fullmatch(name)
        if m:
            adapters[f"base_model.model.{m.group(1)}.lora_{m.group(2)}.weight"] = value
            if m.group(2) == "A":
                modules[m.group(1)] = value.shape[0]
        else:
            full[name.replace(".base_layer.", ".")] = value
    if not adapters:
        return apply_delta(model, full, {"method": "full"})
    if lora_scale is None:
        raise CheckpointError("the tensors hold LoRA adapters: their scale (lora alpha / r) is needed to merge them")
    ranks = set(modules.values())
    if len(ranks) != 1 or len(adapters) != 2 * len(modules):
        raise CheckpointError(f"LoRA tensors do not come in A/B pairs of one rank (ranks {sorted(ranks)})")
    r = ranks.pop()
    config = {"r": r, "lora_alpha": lora_scale * r, "bias": "none",
              "target_modules": "|".join(re.escape(module) for module in sorted(modules))}
    return merge_lora(model, {**adapters, **full}, config)


def load_with_delta(base: str, delta: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                    verify_base: bool = True, attn_implementation: str | None = "sdpa"):
    """(model, processor): the base model with a delta applied (LoRA merged)."""
    tensors, metadata = load_delta(delta)
    if verify_base:
        check_base(metadata, base, delta)
    model, processor = load_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                       attn_implementation=attn_implementation)
    if metadata.get("image_aspect_ratio"):  # the trained model's image shaping, not the base's
        from midtune.images import set_image_aspect_ratio

        set_image_aspect_ratio(processor, metadata["image_aspect_ratio"])
    return apply_delta(model, tensors, metadata), processor


def save_merged(model, processor, out_dir: Path) -> None:
    """A standard Hugging Face directory (model + processor + chat template), written atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
