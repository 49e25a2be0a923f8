"""Data-parallel evaluation: one process per GPU (or N CPU processes over gloo), each with its share of every
task's documents, the way lmms-eval's own models run under `accelerate launch -m lmms_eval`.

lmms-eval does the splitting and the gathering. Rank r of W gets documents r, r + W, r + 2W, ... of each task
(after --limit); the ranks with fewer requests run copies of their last one so that every rank runs as many
batches (the copies' answers are dropped); the logged samples and per-document scores are gathered to rank 0,
which aggregates them, while `simple_evaluate` returns None on the other ranks. A model only has to report its
`rank` and `world_size`, sit on its own GPU and hold an `accelerator` (eval.lmms_plugin.Midtune does).

This module starts the processes (`python -m eval --num-processes N`, or `auto`: one per visible GPU) and gives
`python -m eval` the little it needs beyond lmms-eval: whether this process is rank 0 (the only one that prints
and writes files), a barrier, and rank 0's decisions sent to the others.
"""

from __future__ import annotations

import logging
import os
import sys

# What a process of a failed rank exits with when it has printed its own one-line error (EvalError's codes and an
# interrupt); any other status (a signal, a crash) gets a line from the launching process.
OWN_ERROR_CODES = (1, 2, 130)


class LaunchError(Exception):
    """A launch that cannot work (too many processes, a launcher that formed no group); printed as one line."""

    code = 2


def launched_world_size(env=os.environ) -> int:
    """How many processes a launcher (torchrun, accelerate launch) started this one among; 1 without one."""
    return int(env.get("WORLD_SIZE", "1") or 1)


def rank(env=os.environ) -> int:
    return int(env.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def processes_to_start(requested: str, device: str) -> tuple[int, bool]:
    """How many processes `python -m eval` starts itself, and whether they run on the CPU. Under a launcher none
    (it started them): 1. Otherwise --num-processes: `auto` is one per visible GPU when the device is auto or cuda
    (without an index), else 1; a number N is N processes, each on its own GPU, or on the CPU (over gloo) when the
    device is the CPU or auto on a machine without a GPU."""
    world = launched_world_size()
    if world > 1:
        if requested != "auto" and int(requested) != world:
            raise LaunchError(f"--num-processes {requested}, but the launcher started {world} processes: give one "
                              f"number (or leave --num-processes at auto under a launcher)")
        return 1, False
    gpus = visible_gpu_count() if device in ("auto", "cuda") else 0
    if requested == "auto":
        return max(1, gpus), False
    n = int(requested)
    if n == 1:
        return 1, False
    if device == "cpu" or (device == "auto" and gpus == 0):
        return n, True
    if device not in ("auto", "cuda"):
        raise LaunchError(f"--num-processes {n} with --device {device}: each process takes a GPU of its own "
                          f"(--device auto or cuda; CUDA_VISIBLE_DEVICES chooses which) or runs on the CPU "
                          f"(--device cpu)")
    if n > gpus:
        raise LaunchError(f"--num-processes {n}, but {gpus} GPU(s) are visible: one process per GPU at most "
                          f"(--device cpu for processes on the CPU)")
    return n, False


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_processes(argv: list[str], n: int, cpu: bool) -> int:
    """Run `python -m eval ARGV` as `n` processes under torchrun and return the exit status: 0 when every process
    succeeded, else the first failed rank's own status (it printed its error). torchrun's standalone mode takes a
    free port for each launch, so evaluations started side by side (compare --jobs) do not collide."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if cpu:
        # without it accelerate, on a machine without GPUs, forms no process group and each process would
        # evaluate everything alone (docs/training.md, "Launching")
        os.environ["ACCELERATE_USE_CPU"] = "true"
    # torchrun would give each process 1 thread; its share of the cores keeps image preprocessing fast
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpu_count() // n)))
    # every rank prints its own one-line error; torchrun's report of the same failure is a page of traceback
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "eval", *argv])
    try:
        run(launch)
    except ChildFailedError as e:
        statuses = {r: failure.exitcode for r, failure in sorted(e.failures.items())}
        own = [status for status in statuses.values() if status in OWN_ERROR_CODES]
        if own:
            return own[0]
        died = ", ".join(f"rank {r}: exit status {status}" for r, status in statuses.items())
        print(f"error: an evaluation process ended without an error of its own ({died}): killed, out of memory "
              f"or crashed", file=sys.stderr)
        return 1
    except SignalException as e:
        print(f"error: interrupted ({e.sigval.name})", file=sys.stderr)
        return 130
    return 0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def join_processes(cpu: bool) -> None:
    """Form the launcher's processes into one group (accelerate's, which the plugin's Accelerator then reuses):
    gloo on the CPU, NCCL on GPUs. Raises LaunchError when accelerate formed none."""
    from accelerate import PartialState

    world = launched_world_size()
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise LaunchError(no_group_message(world, state.num_processes))


def no_group_message(world: int, formed: int) -> str:
    return (f"launched as {world} processes (WORLD_SIZE={world}) but accelerate formed a group of {formed}, so each "
            f"process would evaluate every document alone and write the same files. Start the processes with "
            f"`accelerate launch`, `torchrun` or `python -m eval --num-processes N`, which set RANK, LOCAL_RANK and "
            f"MASTER_ADDR for every process; with GPUs, check that CUDA is visible to every process")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_main(value):
    """Rank 0's `value` on every rank (the others pass anything): one decision, taken once, for all of them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn):
    """fn() on rank 0, then on the other ranks: what fills a shared directory or cache (the shapes task data,
    datasets' cache of the task data) is made once, not raced for."""
    if not is_main():
        barrier()
    try:
        return fn()
    finally:
        if is_main():
            barrier()


def leave() -> None:
    """End the process group, so that the process exits without NCCL's warning about an undestroyed group."""
    if "torch.distributed" not in sys.modules:  # never joined one (and importing torch costs seconds)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
