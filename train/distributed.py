"""What DeepSpeed and FSDP need from midtune beyond accelerate's defaults."""

from __future__ import annotations

import os

import torch

from midtune.adapters import family_of, unwrap


def check_process_group(num_processes: int, env=os.environ) -> None:
    """Refuse a launch whose processes accelerate did not join into one group: torchrun on a machine without GPUs,
    accelerate not told to use the CPU. Each process would train alone on all the data and write the same
    output_dir, racing on its checkpoints."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        from train.stopping import UserError  # not at the top: stopping → checkpoints → this module

        raise UserError(f"launched as {world} processes (WORLD_SIZE={world}) but accelerate formed no process group, "
                        "so each would train alone and write the same output_dir. Without GPUs set "
                        "ACCELERATE_USE_CPU=true (or use `accelerate launch --cpu`); with GPUs, check that CUDA is "
                        "visible to every process")


def cpu_deepspeed_kwargs() -> list:
    """DeepSpeed on a machine without GPUs: accelerate finds no process-group backend for DeepSpeed's CPU
    accelerator and then counts one process, while DeepSpeed itself forms the full world (each of 2 ranks
    reported num_processes == 1 and the batch-size check failed). Naming gloo makes both agree."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def name_fsdp_wrap_classes(plugin, model) -> list[str] | None:
    """FSDP's transformer-based wrap needs the layer classes to shard by. Unless the accelerate config names them
    (fsdp_transformer_layer_cls_to_wrap), accelerate takes the model's `_no_split_modules`, which for LLaVA in
    transformers 5 lists CLIPTextEmbeddings, a class a vision-only tower does not have, and prepare() fails
    ("Could not find the transformer layer class CLIPTextEmbeddings in the model", the first FSDP2 run, on an
    H200). midtune names the classes of the LLM's decoder layers and the vision tower's layers, from the adapter
    table. Returns the names it set, or None where it left the plugin alone."""
    if plugin is None or plugin.transformer_cls_names_to_wrap:
        return None
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return None
    parts = family_of(model).parts(model)
    names = list(dict.fromkeys(type(layer).__name__ for layer in [*parts.language_layers, *parts.vision_layers]))
    plugin.transformer_cls_names_to_wrap = names
    return names


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def weights_checksum(model, names: list[str], accelerator) -> str:
    """sha256 of the trainable tensors, in float32. Under ZeRO-3 and FSDP2 each rank holds only a partition, so
    they are gathered first (a collective: every rank calls this); hashing the stand-ins would hash empty tensors."""
    import contextlib
    import hashlib

    params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
    gathered = contextlib.nullcontext()
    if zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None)
    digest = hashlib.sha256()
    with gathered:
        for name in names:
            value = params[name].detach()
            if hasattr(value, "full_tensor"):  # an FSDP2 shard (DTensor): the whole tensor, as on one process
                value = value.full_tensor()
            digest.update(value.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def set_deepspeed_clipping(accelerator, max_grad_norm: float) -> None:
    """DeepSpeed clips inside its engine, by its JSON's `gradient_clipping`, and never looks at what midtune asks:
    a hard-coded 1.0 there clipped runs of max_grad_norm=0. The shipped JSONs say "auto", filled here from
    optim.max_grad_norm (0 turns DeepSpeed's clipping off); a number that differs is refused, naming both."""
    from train.config import ConfigError

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    value = config.get("gradient_clipping", "auto")
    if value in ("auto", None):
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(value) != float(max_grad_norm):
        raise ConfigError(f"key 'optim.max_grad_norm': {max_grad_norm}, but the DeepSpeed config sets "
                          f"gradient_clipping {value}; set it to \"auto\" there (midtune fills it) or make them equal")
