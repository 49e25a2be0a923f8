"""Where a model's weights come from: a merged/HF directory, a hub id, or a midtune delta on its base.

Kept free of lmms-eval imports so `python -m eval` can check its arguments before loading lmms-eval.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "half": "float16"}


# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate: `pretrained` (a directory or hub id; the base when `delta` is set) + optional delta."""

    pretrained: str
    delta: str | None = None

    def describe(self) -> str:
        return f"{self.delta} on base {self.pretrained}" if self.delta else self.pretrained

    def to_dict(self) -> dict:
        return {"pretrained": self.pretrained, "delta": self.delta}


def _looks_local(path: str) -> bool:
    """A path the user meant as a local file or directory (hub ids are `name` or `org/name`)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def resolve_source(pretrained: str | None, delta: str | None = None) -> ModelSource:
    """Where a model comes from, from what a user wrote. Raises CheckpointError naming the problem.

    * `pretrained` = merged/HF directory or hub id, no delta → that model;
    * `pretrained` = a delta file (`.../delta.safetensors`), or a run's `final/` holding only a delta → that delta on
      the base named in its metadata (`base_model`);
    * `delta` given → that delta on `pretrained`, or on its metadata's base when `pretrained` is None.
    """
    from midtune.checkpoint import CheckpointError, load_delta

    def base_of(delta_path: str) -> str:
        _, metadata = load_delta(delta_path)
        base = metadata.get("base_model")
        if not base:
            raise CheckpointError(f"delta {delta_path!r} names no base model in its metadata; give the base explicitly")
        if _looks_local(base) and not Path(base).expanduser().exists():
            raise CheckpointError(f"delta {delta_path!r} was trained on base {base!r}, which does not exist here; "
                                  f"give the base explicitly (python -m eval: NAME=DELTA@BASE; lmms-eval: "
                                  f"pretrained=BASE,delta=DELTA)")
        return base

    if delta is not None:
        if not Path(delta).expanduser().is_file():
            raise CheckpointError(f"delta {delta!r} does not exist")
        base = pretrained or base_of(delta)
        _check_model_path(base)
        return ModelSource(_expand(base), _expand(str(delta)))
    if not pretrained:
        raise CheckpointError("no model given (pretrained=...)")
    path = Path(pretrained).expanduser()
    if path.is_file() or pretrained.endswith(".safetensors"):
        if not path.is_file():
            raise CheckpointError(f"delta {pretrained!r} does not exist")
        return ModelSource(_expand(base_of(pretrained)), _expand(pretrained))
    if path.is_dir() and not (path / "config.json").is_file() and (path / "delta.safetensors").is_file():
        delta_path = str(path / "delta.safetensors")
        return ModelSource(_expand(base_of(delta_path)), delta_path)
    _check_model_path(pretrained)
    return ModelSource(_expand(pretrained))


def _expand(path: str) -> str:
    """`~` expanded for paths that exist locally (transformers does not expand it); hub ids unchanged."""
    local = Path(path).expanduser()
    return str(local) if path.startswith("~") and local.exists() else path


def _check_model_path(path: str) -> None:
    from midtune.checkpoint import CheckpointError

    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{path!r} is not a model directory (no config.json in it)")
    elif local.exists():
        raise CheckpointError(f"{path!r} is a file, not a model directory or a midtune delta")
    elif _looks_local(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")


def resolve_dtype(dtype: Any, device: str) -> str:
    import torch

    if dtype is None or str(dtype) == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32" if not device.startswith("cuda") else "float16"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(sorted(DTYPE_ALIASES))}")
    return name


def fast_dtype() -> str:
    """The dtype this machine computes fastest in: bfloat16 on a GPU that has it and on a CPU with native bf16
    (AMX or AVX512-BF16, where a bf16 matmul ran 4.5× an fp32 one), float32 elsewhere: on an AVX2-only CPU torch
    emulates bf16 and a matmul ran 24× slower than in fp32 (the demo's alignment step: 80 s instead of ~1 s)."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def resolve_device(device: Any) -> str:
    import torch

    if device is None or str(device) in ("", "auto"):
        if torch.cuda.is_available():
            local_rank = os.environ.get("LOCAL_RANK")  # one process per GPU under accelerate/torchrun
            return f"cuda:{local_rank}" if local_rank is not None else "cuda"
        return "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device
