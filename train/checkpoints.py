"""Resumable training checkpoints (`output_dir/checkpoint-<step>/`) and the final model (`output_dir/final/`).

    trainable.safetensors   the trainable tensors only (a frozen 7B base is not copied at every save)
    optimizer.pt            the optimizer's state dict, read back with weights_only=True
    scheduler.pt            the LR scheduler's state dict (stepped by hand, so saved on every backend)
    scaler.pt               fp16 only: the GradScaler's loss scale and growth tracker
    rng-<rank>.json         python / numpy / torch RNG states of each rank
    trainer_state.json      step, data position and the metrics needed to continue

Under DeepSpeed and FSDP parameters or optimizer state are partitioned across ranks. DeepSpeed writes its own
checkpoint (accelerate's `save_state`, frozen parameters excluded) in place of the first two files; under FSDP2
each rank writes its shard of the trainable tensors and of their optimizer state (train/fsdp_state.py).

A checkpoint is written into `.checkpoint-<step>.tmp`, flushed to disk and renamed when complete, so
`checkpoint-*` directories are always whole and `resume_from=latest` can trust the newest one. A save that fails
(a full disk) removes its temporary directory and raises CheckpointSaveError; one cut short by a crash leaves
only the temporary directory, which the next start removes. Older checkpoints are rotated out only after the
new one is in place.
"""

from __future__ import annotations

import json
import pickle  # only for the exception torch.load raises on a refused file
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from midtune.adapters import unwrap
from midtune.checkpoint import (
    DTYPES,
    CheckpointError,
    base_hash,
    load_with_delta,
    save_delta,
)
from midtune.files import atomic_dir, fault_point, fsync_tree, replace_dir
from midtune.images import image_aspect_ratio
from midtune.spec import FreezePlan
from train.config import TrainConfig
from train.distributed import zero3_enabled
from train.fsdp_state import gather_trainable, load_trainable_shards, save_trainable_shards
from train.lora import lora_config_dict

STATE_FILE = "trainer_state.json"


class CheckpointSaveError(Exception):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoints are untouched."""


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for d in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume_from: str, output_dir: Path) -> Path:
    """The checkpoint `resume_from` names; raises CheckpointError naming what is missing."""
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest: no complete checkpoint-* in {output_dir}")
        return found[-1]
    path = Path(resume_from)
    if not path.is_dir():
        raise CheckpointError(f"resume_from={resume_from!r}: no such checkpoint directory")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from={resume_from!r}: not a complete checkpoint (no {STATE_FILE})")
    return path


def remove_interrupted_saves(output_dir: Path) -> list[Path]:
    """Delete what saves cut short by a crash left behind (`.checkpoint-N.tmp`, `.final.tmp-PID`, ...)."""
    pattern = re.compile(r"\.(checkpoint-\d+|final)\.(tmp|old)(-\d+)?")
    leftovers = [d for d in Path(output_dir).glob(".*") if pattern.fullmatch(d.name)]
    for d in leftovers:
        shutil.rmtree(d, ignore_errors=True)
    return leftovers


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


def all_ranks_ok(accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process: ranks must agree before one of them stops."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def save_checkpoint(accelerator, model, optimizer, scheduler, trainable_names: list[str], output_dir: Path,
                    step: int, trainer_state: dict, save_total_limit: int) -> Path:
    """Write `checkpoint-<step>/` atomically. A failed write (a full disk) on any rank raises CheckpointSaveError
    on every rank, with the temporary directory removed and the earlier checkpoints untouched."""
    target = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"  # one name on every rank (a PID suffix would differ)
    failure: OSError | None = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _write_checkpoint_files(accelerator, model, optimizer, scheduler, trainable_names, tmp)
    except OSError as e:
        failure = e
    if all_ranks_ok(accelerator, failure is None) and accelerator.is_main_process:  # also the barrier
        try:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))  # last: marks the checkpoint whole
            fsync_tree(tmp)
            replace_dir(tmp, target)
        except OSError as e:
            failure = e
    if not all_ranks_ok(accelerator, failure is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        reason = (failure.strerror or str(failure)) if failure is not None else "a write failed on another process"
        raise CheckpointSaveError(f"could not write checkpoint-{step} in {output_dir}: {reason}; nothing "
                                  f"half-written was left and {kept}") from failure
    if accelerator.is_main_process and save_total_limit:  # only now that the new one is in place
        for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def _write_checkpoint_files(accelerator, model, optimizer, scheduler, trainable_names: list[str], tmp: Path) -> None:
    from safetensors.torch import save_file

    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    elif accelerator.distributed_type.name == "FSDP":  # each rank its shard of what trains (train/fsdp_state.py)
        save_trainable_shards(accelerator, model, optimizer, trainable_names, tmp)
    elif accelerator.is_main_process:
        params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
        tensors = {n: params[n].detach().cpu().contiguous() for n in trainable_names}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        fault_point("checkpoint.write")  # tests: a crash or a full disk half-way through a save
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process:  # stepped by hand, so no engine saves it for us
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None and accelerator.distributed_type.name != "FSDP":  # fp16's loss scale
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))


def read_torch_state(path: Path) -> dict:
    """A state dict saved with torch.save, read with weights_only=True: tensors and plain containers only, so a
    tampered file cannot run code. Raises CheckpointError naming the file."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except pickle.UnpicklingError as e:  # what the restricted unpickler refused, in torch's words
        detail = next((line.strip() for line in str(e).splitlines() if "nsupported" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{path}: refused to load: it holds Python objects that no checkpoint contains "
                              f"({detail}); it was not written by midtune or has been altered") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint file ({str(e).splitlines()[0]})") from None


def check_trainable_set(file: Path, found, trainable_names: list[str]) -> None:
    """Refuse a checkpoint file whose tensor names are not this run's trainable set, naming one that differs."""
    found, expected = set(found), set(trainable_names)
    if found != expected:
        extra, missing = sorted(found - expected), sorted(expected - found)
        example = f"it holds {extra[0]!r}, which this run does not train" if extra else \
            f"it lacks {missing[0]!r}, which this run trains"
        raise CheckpointError(f"{file}: a checkpoint of a different trainable set ({example}); resume with the "
                              f"config it was written with")


def load_optimizer_state(optimizer, state: dict, file: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{file}: does not fit this run's optimizer ({e})") from None


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, data layout); CheckpointError naming it."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / STATE_FILE}: not a trainer state ({e})") from None
    return state


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, trainable_names: list[str]) -> dict:
    """Restore a checkpoint into the prepared objects; returns its trainer state. A checkpoint of another run
    (other trainable tensors) or a damaged one raises CheckpointError naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_trainer_state(path)
    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.load_state(str(path), load_module_strict=False)
    elif accelerator.distributed_type.name == "FSDP":
        load_trainable_shards(accelerator, model, optimizer, trainable_names, path)
    else:
        file = path / "trainable.safetensors"
        try:
            tensors = load_file(str(file))
        except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
        check_trainable_set(file, tensors, trainable_names)
        for name, value in tensors.items():
            if value.shape != params[name].shape:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(value.shape)}, the model "
                                      f"{tuple(params[name].shape)}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        load_optimizer_state(optimizer, read_torch_state(path / "optimizer.pt"), path / "optimizer.pt")
    scheduler.load_state_dict(read_torch_state(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(read_torch_state(path / "scaler.pt"))
    rng = path / f"rng-{accelerator.process_index}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return state


def save_final(accelerator, model, processor, plan: FreezePlan, config: TrainConfig, output_dir: Path) -> Path:
    """final/: delta.safetensors (only the trained tensors, with the base's name and hash) and, unless
    save_merged is false, a merged Hugging Face directory beside it that vanilla transformers loads."""
    final = output_dir / "final"
    fsdp = accelerator.distributed_type.name == "FSDP"
    # ZeRO-3: gathers the shards; FSDP2: gathers the trainable tensors only; a plain state dict otherwise
    state = gather_trainable(model, plan.trainable_names) if fsdp else accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    unwrapped = accelerator.unwrap_model(model)
    lora = config.method == "lora"
    if lora:
        from peft import get_peft_model_state_dict

        if fsdp:  # the gathered trainable tensors (sharded parameters hold a slice), named as PEFT's model names them
            delta = dict(get_peft_model_state_dict(unwrapped, state_dict={f"base_model.model.{n}": t
                                                                          for n, t in state.items()}))
            params = state
        else:
            delta = dict(get_peft_model_state_dict(unwrapped))
            params = dict(unwrapped.get_base_model().named_parameters())
        delta.update({n: params[n] for n in plan.trainable_names if "lora_" not in n})
    else:
        prefix = "module." if any(k.startswith("module.") for k in state) else ""
        delta = {n: state[prefix + n] for n in plan.trainable_names}
    # final/ holds the model in the dtype it was loaded in (the float32 master weights stay in the checkpoint):
    # base + delta then rebuilds exactly the merged model, and a bf16 base gives a bf16 model.
    dtype = DTYPES[config.dtype]
    delta = {n: t.to(dtype) if t.is_floating_point() else t for n, t in delta.items()}
    try:
        with atomic_dir(final) as tmp:
            save_delta(tmp / "delta.safetensors", delta, base_model=config.model, base_hash=base_hash(config.model),
                       method=config.method, trainable=plan.spec.to_dict(),
                       lora_config=lora_config_dict(unwrapped) if lora else None,
                       image_aspect_ratio=image_aspect_ratio(processor))
            if config.save_merged and (zero3_enabled() or fsdp):
                # A sharded model holds only partitions; rebuild base + delta on this process, as train.export
                # does (saving the gathered state through the ZeRO-3-loaded model wrote non-standard key names).
                from transformers.integrations.deepspeed import (
                    unset_hf_deepspeed_config,
                )

                unset_hf_deepspeed_config()
                merged, _ = load_with_delta(config.model, tmp / "delta.safetensors", dtype=config.dtype,
                                            trust_remote_code=config.trust_remote_code, verify_base=False)
                merged.save_pretrained(tmp, safe_serialization=True)
                processor.save_pretrained(tmp)
            elif config.save_merged:
                merged = unwrapped.merge_and_unload().to(dtype) if lora else unwrapped
                merged.save_pretrained(tmp, safe_serialization=True, state_dict=None if lora else {
                    k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
                processor.save_pretrained(tmp)
    except OSError as e:  # atomic_dir has removed its temporary directory; an earlier final/ is untouched
        raise CheckpointSaveError(f"could not write {final}: {e.strerror or e}; nothing half-written was left, and "
                                  f"the last checkpoint holds the trained weights (resume_from=latest writes final/ "
                                  f"again)") from e
    return final
