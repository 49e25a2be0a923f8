"""Interleaved cost probe: step times of two or more training configurations, taken alternately in one process.

    python -m train.probe --out DIR [--warmup 2] [--steps 10] \\
        --run full   "--config configs/demo/stage_c_full.yaml" \\
        --run middle "--config configs/demo/stage_c_full.yaml trainable.layers=middle:0.5"

Each `--run NAME ARGS` is what `python -m train ARGS` would train (a `--config` file and `key=value` overrides,
read by train/config.py's `load_config`). The probe writes DIR/probe.json (per run the step times, what trains,
the sample ids of every step; the order the steps were taken; the settings and the machine) and prints the median
step of each run and their ratio to the first run, for information: the paired statistics are `compare`'s.

Why this design. `compare` needs the ratio of two configurations' step times, and on a shared machine a single
timing drifts by ±5-25 % while it runs, so two runs timed one after the other measure the machine as much as the
configurations. So:

* One process. Every configuration is built here, each exactly as `train` builds it (the recipe's own
  setup_accelerator → setup_model → setup_data → setup_optimizer, each starting from its own `set_seed`, so each
  model, data order and optimizer is the one its own `train` run would have), and each keeps its model copy,
  optimizer and loader. Steps of different configurations then run seconds apart on the same warm process,
  allocator and caches, with no start-up in between. What a probe never builds: the run directory, resume and the
  analysis hook; nothing is written under any config's output_dir.
* ABBA alternation. Steps are taken A1 B1 B2 A2 A3 B3 ...: within each step index every run is adjacent in time
  to the others, so a drift of the machine hits each pair's members almost equally and cancels in their ratio;
  the order inside a pair reverses each time, so no run is always first (the one after a switch pays for cold
  caches, the one before for whatever the switch left running). With more than two runs the order is forward,
  backward, forward ...: every run's average position is the same.
* The same batches. All runs must share the keys that decide the batches (data, batch size, accumulation, length,
  seed, ...; `BATCH_KEYS`) and the recipe's sampler is seeded by `seed`, so step i of every run trains on the
  same samples, padded to the same shape: a step-time ratio between different batches would mix the cost of the
  configuration with the cost of the data. probe.json records every step's sample ids per run to show it.

A step is what the recipe times (`Recipe.close_step`): fetching and running all micro-batches of one optimizer
step (micro_step ... optimizer_step) and the schedule, then `torch.cuda.synchronize()` where CUDA is available,
by time.perf_counter. It leaves out what only `train` does between steps (the metrics log, the progress bar,
checkpoints). The first `--warmup` steps of each run are taken in the same alternation but not timed.

One process means no DeepSpeed (two engines in one process are not supported) and no data parallelism: the
probe refuses both. Every configuration is in memory at once: on a GPU the two models and their optimizer states
must fit together. Exit codes: 0 done; 2 bad input (a config, a layer spec, data, a model; a key the runs do not
share; a launch in several processes or under DeepSpeed); 3 a non-finite loss (as `train`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from midtune.adapters import UnsupportedModelError
from midtune.checkpoint import CheckpointError
from midtune.data import DataError
from midtune.files import write_json
from midtune.machine import machine_info
from midtune.spec import SpecError
from train.config import ConfigError, TrainConfig, load_config, to_dict
from train.recipe import Recipe
from train.stopping import TrainingStopped, UserError

# Keys every run must share: what decides which samples form each batch and its shape and precision. The first
# seven shape the step itself; the rest decide the samples (and so the padded lengths) a step trains on.
BATCH_KEYS = ("batch_size", "grad_accum", "max_length", "dtype", "mixed_precision", "attn_implementation", "data",
              "model", "image_folder", "split", "seed", "group_by_length", "on_bad_sample", "on_image_truncation",
              "min_pixels", "max_pixels")
BUILD_ERRORS = (ConfigError, SpecError, DataError, CheckpointError, UnsupportedModelError, UserError)


class ProbeError(Exception):
    """Input the probe refuses: one line, exit code 2."""


@dataclass
class ProbeRun:
    name: str
    command: str  # the ARGS string, as given
    config: TrainConfig
    recipe: Recipe | None = None
    batches: Iterator[dict] | None = None
    sample_ids: list[list[str]] = field(default_factory=list)  # per optimizer step, warmup included


# -- command line and checks (nothing is built or written before they pass) --------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for probe.json")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each run first (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each run (default 10)")
    ap.add_argument("--run", nargs=2, action="append", metavar=("NAME", "ARGS"), default=[],
                    help='a configuration (repeat it): NAME and one string of `train` arguments, '
                         '"--config FILE key=value ..."')
    rest, runs = take_runs(sys.argv[1:] if argv is None else list(argv))
    args = ap.parse_args(rest)
    args.run = runs + [tuple(run) for run in args.run]
    names = [name for name, _ in args.run]
    if len(names) < 2:
        ap.error("give at least two --run NAME ARGS: a ratio needs two configurations")
    if len(set(names)) < len(names):
        ap.error(f"--run names must be unique, got {', '.join(names)}")
    if args.warmup < 0 or args.steps < 2:
        ap.error("--warmup must be ≥ 0 and --steps ≥ 2 (a paired ratio needs at least two timed steps)")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a directory")
    return args


def take_runs(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Take each `--run NAME ARGS` out of argv verbatim: argparse would read an ARGS such as "--config=x.yaml" (a
    leading dash, no space) as an option of the probe's own."""
    rest, runs = [], []
    i = 0
    while i < len(argv):
        if argv[i] == "--run" and i + 2 < len(argv):  # too few words after it: argparse says so
            runs.append((argv[i + 1], argv[i + 2]))
            i += 3
        else:
            rest.append(argv[i])
            i += 1
    return rest, runs


class _TrainArgs(argparse.ArgumentParser):
    """`train`'s own command line (--config FILE, then key=value overrides); a mistake is a ConfigError."""

    def error(self, message: str):
        raise ConfigError(message)


def load_run(name: str, command: str, total_steps: int) -> ProbeRun:
    """The run's config as `python -m train` would read it, with what a probe must not do switched off: the
    schedule spans the probe's steps, and there is no resume, tracker or checkpoint."""
    ap = _TrainArgs(prog=name, add_help=False)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    try:
        words = shlex.split(command)
    except ValueError as e:  # unbalanced quotes
        raise ProbeError(f"run {name!r}: cannot split its ARGS {command!r}: {e}") from None
    try:
        args = ap.parse_args(words)
        probe_only = [f"max_steps={total_steps}", "resume_from=null", "report_to=[]", "save_steps=0"]
        config = load_config(args.config, [*args.overrides, *probe_only])
    except ConfigError as e:
        raise ProbeError(f"run {name!r}: {e}") from None
    return ProbeRun(name, command, config)


def check_same_batches(runs: list[ProbeRun]) -> None:
    """Step times compare configurations only on the same batches: refuse runs that differ in a BATCH_KEYS key."""
    first = to_dict(runs[0].config)
    for run in runs[1:]:
        other = to_dict(run.config)
        for key in BATCH_KEYS:
            if other[key] != first[key]:
                raise ProbeError(
                    f"runs {runs[0].name!r} and {run.name!r} differ in {key}: {first[key]!r} vs {other[key]!r}; "
                    f"a step-time ratio is only meaningful on the same batches, so every run needs the same {key}")


def check_one_plain_process(env=os.environ) -> None:
    """Before anything is built: the launcher's environment says whether this is one of several processes or a
    DeepSpeed launch (accelerate launch and torchrun set these)."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ProbeError(f"the probe runs every configuration in one process, but this is one of {world} "
                         f"(WORLD_SIZE={world}); run it as `python -m train.probe`, not under accelerate launch or "
                         "torchrun")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes", "y", "on"):  # accelerate's
        raise ProbeError("the probe cannot run under DeepSpeed: it keeps every configuration in one process, and two "
                         "DeepSpeed engines in one process are not supported; run it as `python -m train.probe`")


def check_accelerator(run: ProbeRun) -> None:
    """The same refusal from the accelerator itself (an accelerate config can choose DeepSpeed or several
    processes without the environment saying so)."""
    acc = run.recipe.accelerator
    if acc.num_processes > 1 or acc.distributed_type.name == "DEEPSPEED":
        raise ProbeError(f"run {run.name!r}: the probe needs one plain process, but accelerate set up "
                         f"{acc.num_processes} process(es) with {acc.distributed_type.name}; two DeepSpeed engines "
                         "or several processes cannot share one probe. Run it as `python -m train.probe`")


# -- building and stepping ---------------------------------------------------------------------------------------


def build(run: ProbeRun) -> None:
    """The recipe's setup pieces in train's order, without the run directory, resume or the analysis hook.
    setup_accelerator calls set_seed(seed) first, so this model and its data order are those of its own run."""
    recipe = Recipe(run.config)
    run.recipe = recipe
    recipe.setup_accelerator()  # a second Accelerator in one process shares accelerate's state: same precision
    check_accelerator(run)
    recipe.setup_model()
    recipe.setup_data()
    recipe.setup_optimizer()
    skip = recipe.start_loop()
    assert skip == 0, "a probe never resumes"
    run.batches = recipe.micro_batches()  # train's batches, epoch after epoch


def take_step(run: ProbeRun) -> float:
    """One optimizer step of `run`, timed as the recipe times it; returns the seconds."""
    recipe = run.recipe
    # The recipe's clock runs from its previous step's end; here other runs' steps came between, so restart it.
    recipe.step_start = time.perf_counter()
    while True:
        update = recipe.take_step(run.batches)
        if not update.finite and not update.overflow:  # as train: drop it (on_nan_loss=skip) or NonFiniteLoss
            recipe.drop_step()
            continue
        _, _, _, sample_ids = recipe.close_step(update)
        run.sample_ids.append(sample_ids)
        return recipe.state.step_times[-1]


def alternating_order(names: list[str], total_steps: int) -> list[tuple[str, int]]:
    """ABBA: step 1 in the given order, step 2 in reverse, step 3 in order again ... (steps count from 1)."""
    order = []
    for step in range(1, total_steps + 1):
        order += [(name, step) for name in (names if step % 2 else names[::-1])]
    return order


def interleave(runs: list[ProbeRun], warmup: int) -> list[tuple[str, int]]:
    """Take every run's steps in ABBA order; returns the order taken."""
    by_name = {run.name: run for run in runs}
    total = runs[0].recipe.total_steps
    order = alternating_order(list(by_name), total)
    for k, (name, step) in enumerate(order, 1):
        seconds = take_step(by_name[name])
        phase = "warmup" if step <= warmup else "timed"
        loss = by_name[name].recipe.state.losses[-1]
        print(f"[{k}/{len(order)}] {name} step {step}/{total} ({phase}): {seconds:.3f} s, loss {loss:.4f}",
              flush=True)
    return order


# -- the result ---------------------------------------------------------------------------------------------------


def run_record(run: ProbeRun, warmup: int) -> dict:
    s, plan = run.recipe.state, run.recipe.plan
    return {"step_times": s.step_times[warmup:], "warmup_times": s.step_times[:warmup],
            "trainable": plan.num_trainable, "trainable_layers": plan.to_dict()["trainable_layers"],
            "command": run.command,
            "losses": s.losses,  # every step, warmup included: shows each configuration trained
            "skipped_steps": len(s.skipped_steps),  # non-finite steps dropped (on_nan_loss=skip)
            "sample_ids": run.sample_ids}  # per step, warmup included: the same in every run


def probe_result(runs: list[ProbeRun], order: list[tuple[str, int]], warmup: int, steps: int) -> dict:
    c, acc = runs[0].config, runs[0].recipe.accelerator
    same_batches = all(run.sample_ids == runs[0].sample_ids for run in runs)
    settings = {"warmup": warmup, "steps": steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "max_length": c.max_length, "dtype": c.dtype, "mixed_precision": acc.mixed_precision,
                "world_size": acc.num_processes, "distributed_type": acc.distributed_type.name,
                "device": str(acc.device), "seed": c.seed, "same_batches": same_batches}
    return {"runs": {run.name: run_record(run, warmup) for run in runs},
            "order": [[name, step] for name, step in order],
            "settings": settings,
            "machine": machine_info(threads=torch.get_num_threads(), device=str(acc.device)),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def print_summary(result: dict, path: Path) -> None:
    """Median step per run and the ratio of medians to the first run: information only (compare pairs steps)."""
    runs = result["runs"]
    reference = statistics.median(next(iter(runs.values()))["step_times"])
    width = max(len("run"), *map(len, runs))
    first = next(iter(runs))
    print(f"\n{'run':<{width}}  {'trainable':>12}  {'median step':>11}  ratio vs {first}")
    for name, r in runs.items():
        median = statistics.median(r["step_times"])
        print(f"{name:<{width}}  {r['trainable']:>12,}  {median:>9.4f} s  {median / reference:.3f}")
    if not result["settings"]["same_batches"]:
        print("warning: the runs did not consume the same samples (see sample_ids); the ratio mixes data and cost")
    print(f"→ {path}")


def run_probe(args: argparse.Namespace) -> Path:
    total = args.warmup + args.steps
    runs = [load_run(name, command, total) for name, command in args.run]
    check_same_batches(runs)
    check_one_plain_process()
    for k, run in enumerate(runs, 1):  # one after the other, each complete: its own set_seed, then its model
        print(f"building run {run.name!r} ({k}/{len(runs)}): {run.command}", flush=True)
        try:
            build(run)
        except BUILD_ERRORS as e:
            raise ProbeError(f"run {run.name!r}: {e}") from None
    print(f"{len(runs)} runs × {total} steps ({args.warmup} warmup, {args.steps} timed), alternating ABBA", flush=True)
    try:
        order = interleave(runs, args.warmup)
    finally:
        for run in runs:  # stop the loaders' iterators (and their worker processes, with num_workers > 0)
            if run.batches is not None:
                run.batches.close()
    path = args.out / "probe.json"
    result = probe_result(runs, order, args.warmup, args.steps)
    write_json(path, result)  # atomic; creates --out
    print_summary(result, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_probe(args)
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a non-finite loss under on_nan_loss=error (exit 3, as train)
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
