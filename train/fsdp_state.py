"""What an FSDP2 run saves: the trainable tensors and their optimizer state, each rank its own shard.

accelerate's FSDP save_state writes the whole model (every frozen tensor, in fp32 once upcast: about 28 GB per
checkpoint for a 7B model whose middle block trains) and reads its metadata back with pickle. Here each rank
writes only its shards of what trains, in the same safe formats as a one-process checkpoint:

    trainable-rank<r>.safetensors   rank r's local shard of every trainable tensor (DTensor.to_local())
    optimizer-rank<r>.pt            rank r's optimizer state, its tensors local shards too; read with weights_only

A shard is only meaningful on the same world size and the same FSDP units, which resume already insists on
(check_resume_shape refuses another world size); the global shape of each tensor is stored beside its shard and
checked again on load. The final model gathers the trainable tensors alone (gather_trainable); frozen ones are
never gathered, the merged directory is rebuilt from the base and the delta."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from midtune.adapters import unwrap
from midtune.checkpoint import CheckpointError


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(value):
    return value.to_local() if isinstance(value, _dtensor()) else value


def _params(accelerator, model) -> dict:
    return dict(unwrap(accelerator.unwrap_model(model)).named_parameters())


def save_trainable_shards(accelerator, model, optimizer, names: list[str], directory: Path) -> None:
    from safetensors.torch import save_file

    rank = accelerator.process_index
    params = _params(accelerator, model)
    shards = {n: _local(params[n]).detach().cpu().contiguous() for n in names}
    shapes = {n: list(params[n].shape) for n in names}
    save_file(shards, str(directory / f"trainable-rank{rank}.safetensors"),
              metadata={"global_shapes": json.dumps(shapes), "world_size": str(accelerator.num_processes)})
    state = optimizer.state_dict()
    local_optimizer_state = {
        "state": {i: {k: _local(v).detach().cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
                  for i, entry in state["state"].items()},
        "param_groups": state["param_groups"]}
    torch.save(local_optimizer_state, directory / f"optimizer-rank{rank}.pt")


def load_trainable_shards(accelerator, model, optimizer, names: list[str], directory: Path) -> None:
    """Copy this rank's shards back into the sharded parameters and optimizer state, with the checks and the
    safe reader (weights_only) of a one-process checkpoint."""
    from safetensors import safe_open

    # here, not at the top: train.checkpoints imports this module
    from train.checkpoints import check_trainable_set, load_optimizer_state, read_torch_state

    rank = accelerator.process_index
    file = directory / f"trainable-rank{rank}.safetensors"
    if not file.is_file():
        found = sorted(p.name for p in directory.glob("trainable-rank*.safetensors")) or ["none"]
        raise CheckpointError(f"{file}: missing; the checkpoint holds {', '.join(found)} (FSDP shards are per rank: "
                              f"resume on the world size it was written with)")
    params = _params(accelerator, model)
    with safe_open(str(file), framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("global_shapes", "{}"))
        check_trainable_set(file, f.keys(), names)
        with torch.no_grad():
            for name in names:
                shard, target = f.get_tensor(name), _local(params[name])
                if shapes.get(name) != list(params[name].shape) or shard.shape != target.shape:
                    raise CheckpointError(f"{file}: tensor {name!r} was sharded as {tuple(shard.shape)} of "
                                          f"{shapes.get(name)}, this run holds {tuple(target.shape)} of "
                                          f"{list(params[name].shape)}")
                target.copy_(shard)
    optimizer_file = directory / f"optimizer-rank{rank}.pt"
    state = read_torch_state(optimizer_file)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        param = ordered[int(index)]
        for key, value in entry.items():
            if isinstance(param, _dtensor()) and torch.is_tensor(value) and value.shape == _local(param).shape \
                    and value.dim() > 0:
                entry[key] = _dtensor().from_local(value.to(param.device), param.device_mesh, param.placements,
                                                   run_check=False, shape=param.shape, stride=param.stride())
    load_optimizer_state(optimizer, state, optimizer_file)


def gather_trainable(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, on rank 0's CPU (a collective: every rank calls it; the others get {}).
    Frozen tensors are never gathered: a 7B base is not assembled on one process to save a block."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(unwrap(model), options=options)
    return {n: state[n] for n in names} if state else {}
