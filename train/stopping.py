"""Why and how a run stops before its last step: the errors main() turns into exit codes, SIGTERM/SIGINT
(finish the step, checkpoint, exit), and non-finite losses (drop the step or stop, naming the samples)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from train.checkpoints import checkpoint_dirs
from train.config import TrainConfig

log = logging.getLogger("midtune.train")


class UserError(Exception):
    """A problem with the user's input: printed as one clear message, exit code 2."""


class TrainingStopped(Exception):
    """Training stopped before its last step; the message says why. `code` is the exit status."""

    code = 1


class Interrupted(TrainingStopped):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")


class NonFiniteLoss(TrainingStopped):
    code = 3

    def __init__(self, message: str, skip_available: bool = True):
        super().__init__(message)
        self.skip_available = skip_available  # on_nan_loss=skip runs under this backend (not DeepSpeed)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR2 while training only set `received`: the loop finishes its step, saves a
    checkpoint and stops. A second signal gets the previous handler (Ctrl-C twice stops at once; saves are atomic
    either way). SIGUSR2 is what Slurm sends before a job's time limit or preemption in jobs submitit writes
    (`--signal=USR2@90`); its default action would kill the run without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self, announce: bool):
        self.announce = announce
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
        if self.announce:
            name = signal.Signals(signum).name
            print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again stops at once)",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
        self.previous = {}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the main process, which still needs them to finish the step."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def nonfinite_skip(accelerator, config: TrainConfig, dataset, window, step: int, output_dir: Path,
                   skipped_steps: list[dict]) -> dict:
    """The record of a dropped optimizer step, or NonFiniteLoss under on_nan_loss=error or past max_nan_skips."""
    if config.on_nan_loss == "error" or len(skipped_steps) >= config.max_nan_skips:
        raise nonfinite_error(accelerator, config, dataset, window, step, output_dir, skipped_steps)
    ids, what = offending_samples(accelerator, window)
    log.warning(f"non-finite {what} in step {step + 1}: dropped the step (no update), samples "
                f"{describe_samples(dataset, ids)} ({len(skipped_steps) + 1} of at most {config.max_nan_skips})")
    return {"after_step": step, "samples": ids}


def nonfinite_error(accelerator, config: TrainConfig, dataset, window, step: int, output_dir: Path,
                    skipped_steps: list[dict]) -> NonFiniteLoss:
    ids, what = offending_samples(accelerator, window)
    checkpoints = checkpoint_dirs(output_dir)
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint had been saved yet"
    # DeepSpeed's engine updates inside backward, so no step can be dropped there: 'skip' is refused under it
    skip_available = accelerator.distributed_type.name != "DEEPSPEED"
    if config.on_nan_loss == "skip":
        why = f"already dropped {len(skipped_steps)} step(s), max_nan_skips={config.max_nan_skips}"
    elif skip_available:
        why = "on_nan_loss=error; 'skip' drops such steps"
    else:
        why = ("on_nan_loss=error, the only choice under DeepSpeed; leave these samples out, or lower the learning "
               "rate, before resuming")
    return NonFiniteLoss(f"non-finite {what} in step {step + 1}, on the batch of samples "
                         f"{describe_samples(dataset, ids)}: stopped before updating the weights ({why}); "
                         f"nothing was saved from this step and {kept}", skip_available=skip_available)


def offending_samples(accelerator, window) -> tuple[list[str], str]:
    """Sample ids of the micro-batches whose loss is not finite, from every rank; ('loss' or 'gradient norm')."""
    from accelerate.utils import gather_object

    local = [i for ids, loss in window if not torch.isfinite(loss) for i in ids]
    if accelerator.num_processes > 1:
        local = gather_object(local)
    if local:
        return local, "loss"
    everything = [i for ids, _ in window for i in ids]  # finite losses, non-finite gradients: the whole step
    return gather_object(everything) if accelerator.num_processes > 1 else everything, "gradient norm"


def describe_samples(dataset, ids: list[str], limit: int = 8) -> str:
    where = dataset.samples.locations()
    shown = [f"{i!r} ({where[i]})" if i in where else repr(i) for i in ids[:limit]]
    return ", ".join(shown) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
