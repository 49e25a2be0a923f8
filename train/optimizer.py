"""The optimizer: AdamW over what trains, grouped by component learning rate and weight decay; trainable
tensors kept in their master dtype."""

from __future__ import annotations

import torch

from midtune.adapters import unwrap
from midtune.checkpoint import (
    DTYPES,
)
from midtune.spec import FreezePlan
from train.config import TrainConfig


def component_of(row_name: str) -> str:
    if row_name.startswith("vision_tower"):
        return "vision"
    if row_name in ("embeddings", "lm_head"):
        return "embeddings"
    if row_name == "projector":
        return "projector"
    return "llm"


def build_optimizer(model, plan: FreezePlan, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only, grouped by component learning rate and by weight decay
    (none on norms and biases)."""
    opt = config.optim
    lrs = {"llm": opt.lr, "projector": opt.projector_lr, "vision": opt.vision_lr, "embeddings": opt.embeddings_lr}
    owner = {name: component_of(row.name) for row in plan.rows for name in row.names}
    exempt = no_decay_names(unwrap(model))
    groups: dict[tuple[str, bool], list] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((owner[name], name in exempt), []).append(p)
    param_groups = [
        {"params": params, "lr": lrs[component] if lrs[component] is not None else opt.lr,
         "weight_decay": 0.0 if no_decay else opt.weight_decay, "name": f"{component}{'/no_decay' if no_decay else ''}"}
        for (component, no_decay), params in sorted(groups.items())
    ]
    fused = opt.fused
    if fused is None:  # fused AdamW is several times faster than the per-parameter loop, CPU included
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused)


def no_decay_names(model) -> set[str]:
    """Parameters weight decay must not touch: biases, normalisation weights and other vectors (CLIP's class
    embedding). Decided by the owning module's role and the parameter's real shape: under ZeRO-3 every parameter
    is a 1-element stand-in (shape [0] or [1]), so `p.ndim < 2` would exempt all of them and weight decay would
    silently never apply."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)) or \
            type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))
        for pname, p in module.named_parameters(recurse=False):
            shape = getattr(p, "ds_shape", None) or p.shape
            if is_norm or pname == "bias" or len(shape) < 2:
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


def keep_trainable_in(model, plan: FreezePlan, dtype_name: str) -> None:
    """Cast only what trains to `dtype_name` (float32: the master weights AdamW updates, so steps of lr 1e-5
    are not rounded away by bf16's 8-bit mantissa); frozen tensors stay in the loaded dtype, at half the bytes."""
    target = DTYPES[dtype_name]
    params = dict(unwrap(model).named_parameters())
    for name in plan.trainable_names:
        p = params[name]
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
