"""Precision: which mixed precision a run uses, what is refused, and what is in effect after prepare()."""

from __future__ import annotations

import logging

import torch

from midtune.adapters import unwrap
from midtune.spec import FreezePlan, numel
from train.config import ConfigError, TrainConfig

log = logging.getLogger("midtune.train")


def resolve_mixed_precision(value: str, dtype: str = "float32") -> str:
    """auto: the weights' own low precision when loaded in one; for float32 weights bf16 where the GPU has it."""
    if value != "auto":
        return value
    if dtype in ("bfloat16", "float16"):
        return {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def check_precision(accelerator, config: TrainConfig) -> None:
    """Refuse precisions that would not do what they say on this machine."""
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if accelerator.mixed_precision == "fp16" and not deepspeed and accelerator.scaler is None:
        raise ConfigError("key 'mixed_precision': fp16 needs a GPU here: on the CPU accelerate runs neither fp16 "
                          "autocast nor loss scaling; use bf16 or no")
    mixed = config.dtype != config.trainable_dtype
    if accelerator.distributed_type.name == "FSDP" and mixed and accelerator.mixed_precision == "no":
        # With a mixed-precision policy FSDP2 gathers every unit in its param_dtype, so bf16 frozen and fp32
        # trainable weights may share a unit; without one a unit would gather two dtypes into one layer.
        raise ConfigError(f"keys 'dtype'/'trainable_dtype'/'mixed_precision': under FSDP, weights loaded in "
                          f"{config.dtype} beside {config.trainable_dtype} trainable ones need FSDP's mixed "
                          f"precision (mixed_precision=bf16), which gathers both in one dtype; or load everything "
                          f"in one dtype (dtype={config.trainable_dtype})")
    if config.trainable_dtype != "float32":
        log.warning(f"trainable_dtype={config.trainable_dtype}: AdamW updates {config.trainable_dtype} weights "
                    f"directly (no float32 master weights); updates below the dtype's resolution are lost")


def precision_summary(accelerator, model, plan: FreezePlan, config: TrainConfig) -> dict:
    """The dtypes in effect after prepare(): weights of frozen and trainable tensors (elements and bytes per
    dtype), the autocast dtype and where the master weights live."""
    trainable = set(plan.trainable_names)
    weights: dict[str, dict[str, dict[str, int]]] = {"trainable": {}, "frozen": {}}
    for name, p in unwrap(accelerator.unwrap_model(model)).named_parameters():
        kind = "trainable" if name in trainable else "frozen"
        entry = weights[kind].setdefault(str(p.dtype).removeprefix("torch."), {"parameters": 0, "bytes": 0})
        entry["parameters"] += numel(p)
        entry["bytes"] += numel(p) * p.element_size()
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(accelerator.mixed_precision)
    if accelerator.distributed_type.name == "DEEPSPEED":
        master = "float32 (DeepSpeed's optimizer)"
    else:
        master = "/".join(weights["trainable"]) or None
    line = (f"frozen {'/'.join(weights['frozen']) or '—'}, trainable {'/'.join(weights['trainable']) or '—'}, "
            f"master weights {master}, autocast {autocast or 'off'}")
    return {"dtype": config.dtype, "trainable_dtype": config.trainable_dtype, "autocast": autocast,
            "master_weights": master, "weights": weights, "line": line}


def loss_scale(accelerator) -> float | None:
    scaler = accelerator.scaler
    if scaler is not None:
        return float(scaler.get_scale())
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    optimizer = getattr(getattr(engine, "engine", None), "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def scaler_skipped(accelerator, scale_before: float | None) -> bool:
    """Whether the loss scaler skipped the last update. A GradScaler lowers its scale exactly when it skips
    (accelerate's own flag misses skips inside fused AdamW, which applies the scaler's inf check itself);
    DeepSpeed reports its overflow."""
    if accelerator.scaler is not None:
        return float(accelerator.scaler.get_scale()) < scale_before
    return accelerator.optimizer_step_was_skipped
