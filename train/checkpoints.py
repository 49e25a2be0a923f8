"""Resumable training checkpoints: `output_dir/checkpoint-<step>/`.

    trainable.safetensors   the trainable tensors only (a frozen 7B base is not copied at every save)
    optimizer.pt            the optimizer's state dict, read back with weights_only=True
    scheduler.pt            the LR scheduler's state dict (stepped by hand, so saved on every backend)
    rng-<rank>.json         python / numpy / torch RNG states of each rank
    trainer_state.json      step, data position and the metrics needed to continue

Under DeepSpeed and FSDP parameters or optimizer state are partitioned across ranks, so their own checkpoints
are written (accelerate's `save_state`; DeepSpeed excludes frozen parameters) in place of the first three files.

A checkpoint is written into `.checkpoint-<step>.tmp` and renamed when complete, so `checkpoint-*` directories
are always whole and `resume_from=latest` can trust the newest one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from midtune.adapters import unwrap

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for d in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume_from: str, output_dir: Path) -> Path:
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from=latest: no complete checkpoint-* in {output_dir}")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from={resume_from!r}: not a complete checkpoint (no {STATE_FILE})")
    return path


def _rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(accelerator, model, optimizer, scheduler, trainable_names: list[str], output_dir: Path,
                    step: int, trainer_state: dict, save_total_limit: int) -> Path:
    from safetensors.torch import save_file

    target = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    elif accelerator.distributed_type.name == "FSDP":  # parameters are sharded: FSDP's own state dicts
        accelerator.save_state(str(tmp))
    elif accelerator.is_main_process:
        params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
        save_file({n: params[n].detach().cpu().contiguous() for n in trainable_names}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process:  # stepped by hand, so no engine saves it for us
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last: marks the checkpoint whole
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path) -> dict:
    """Restore a checkpoint into the prepared objects; returns its trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.load_state(str(path), load_module_strict=False)
    elif accelerator.distributed_type.name == "FSDP":
        accelerator.load_state(str(path))
    else:
        tensors = load_file(str(path / "trainable.safetensors"))
        params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
        missing = set(tensors) - set(params)
        if missing:
            raise ValueError(f"{path}: checkpoint tensors not in the model, e.g. {sorted(missing)[0]!r}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{accelerator.process_index}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return state
