#!/usr/bin/env python3
"""The prepared GPU check: what midtune's users run (bf16 on CUDA, DeepSpeed, FSDP, lmms-eval), in minutes.

    make gpu-check              # on a machine with a GPU: at most 10 minutes
    make gpu-check SMOKE=1      # the same steps on the CPU with tiny sizes (part of the test suite)

GPU time for this project comes unannounced and short, so this script exists before the GPU does and has been
rehearsed on the CPU (SMOKE). Every step runs midtune's own commands in fresh processes, each under its own time
limit (the whole process group is killed at the limit), so one hang costs that step only; a step that no longer
fits the overall budget is skipped for time. The steps:

1. bench     train.bench on the 1b preset in bf16 on CUDA: full / midtune block / naive block / LoRA; median
             step time, tokens/s, peak CUDA memory (torch.cuda.max_memory_allocated) and the ratios beside the
             analytic ones.
   bench-7b  train.bench at LLaVA-1.5-7B's layer width (preset llava7b-width: hidden 4096, MLP 11008, 32 heads,
             576 image + 160 text tokens a sample) with as many of its 32 layers as full fine-tuning holds on the
             GPU (--layers fit), full and the paper's block (6-16 of 32, rescaled to the same fraction of depth)
             alternating over 3 rounds in bf16: the block/full step ratio with a t interval over the rounds and
             its verdict beside the paper's 0.861, and the peak-memory ratio.
   bench-real  train.bench on the real pretrained LLM (SmolLM2-135M composed into a LLaVA) with the paper's
             LLaVA-7B block (layers 6-16 of 32, as 6-15 of 30) in bf16: full, full with logits everywhere,
             midtune block, naive block, LoRA (skipped in SMOKE: composing the LLM alone takes ~30 s on 2 cores).
2. train     a real training run through `accelerate launch` per backend: plain, DeepSpeed ZeRO-2, ZeRO-3 and
             FSDP2 (ZeRO-3 and FSDP2 on 2 ranks where the machine has 2 GPUs, else 1), bf16 weights with fp32
             masters (not ZeRO-2), on image rows beside text-only rows at batch 2 × accumulation 2: 4 steps with a
             checkpoint at step 2, then a resume from it that must repeat steps 3-4's losses; FSDP2's checkpoint
             must hold each rank's trainable shard only. What only a GPU shows: NCCL collectives with a
             text-only rank (the stand-in image), FSDP2's bf16 policy on CUDA, its shards' save and resume.
3. eval      lmms-eval on CUDA: the midtune plugin and lmms-eval's own llava_hf on the same trained checkpoint
             (the plain run's merged model) must give the same answers and scores on two shapes tasks.
4. analysis  `analysis profile` on CUDA against the same on the CPU (same values), and the exact neighbour
             search (analysis.geometry.knn) on CUDA against the CPU on 10k x 4096: same neighbours, the speed ratio.
5. demo      the three-seed demo, `python -m compare configs/experiments/demo.yaml --set "seeds=[0, 1, 2]"`
             (`make demo SEEDS=3`) on CUDA: its wall time and the report's verdicts with their intervals. It starts
             after the bench (whose timings it would disturb) and runs beside steps 2-4, within the overall budget.

Results: <out>/gpu-check.json (every figure, each step's status: passed / failed with a one-line reason /
skipped for time) and <out>/gpu-check.md, a Markdown section naming the device, driver, torch and CUDA versions,
which is also appended to BENCHMARKS.md (--record; SMOKE records nothing unless asked). Logs of every command
are in <out>/logs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass(frozen=True)
class Sizes:
    """What each step runs at: the GPU's sizes, or tiny ones that keep SMOKE under 4 minutes on 2 cores."""

    device: str
    budget_s: int
    limits: dict  # seconds per step
    bench: list  # train.bench arguments
    bench_real: list | None  # train.bench on the real pretrained LLM (SmolLM2-135M, the paper's block); None: skip
    bench_7b: list | None  # train.bench at LLaVA-7B's width, full and the paper's block; None: skip
    world: list  # midtune.shapes arguments
    tiny: list  # midtune.tiny arguments
    train_steps: int
    eval_limit: int
    knn_points: int
    knn_dim: int
    profile_pairs: int
    demo: list | None  # extra compare arguments; None: the step is skipped (SMOKE: the demo composes the 135M
    # SmolLM2, ~2.5 min alone on 2 cores even shrunk; tests/test_compare.py runs that quick demo on its own)
    demo_min_s: int  # the demo is skipped for time with less than this left
    jobs: int  # training backends run side by side (one GPU holds all four tiny runs)


GPU = Sizes(
    device="cuda", budget_s=600,
    limits={"setup": 60, "bench": 170, "bench-7b": 200, "bench-real": 90, "demo-start": 5, "analysis": 75,
            "train": 150, "eval": 90, "demo": 600},
    bench=["--preset", "1b", "--device", "cuda", "--dtype", "bf16", "--configs", "full,midtune,naive,lora",
           "--rounds", "2", "--steps", "10", "--warmup", "3", "--threads", "4"],  # ~17 s per worker, mostly start-up
    bench_real=["--preset", "smollm2-llava", "--device", "cuda", "--dtype", "bf16", "--configs",
                "full,full-all-logits,midtune,naive,lora", "--rounds", "1", "--steps", "10", "--warmup", "3",
                "--threads", "4"],
    bench_7b=["--preset", "llava7b-width", "--layers", "fit", "--device", "cuda", "--dtype", "bf16", "--configs",
              "full,midtune", "--threads", "4"],  # 6 workers of ~25 s (start-up, build, 2 + 5 steps)
    world=["--n-train", "200", "--n-val", "10", "--n-test", "40"],
    tiny=["--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vision-layers", "2",
          "--vision-hidden", "32", "--vision-heads", "4"],
    train_steps=4, eval_limit=40, knn_points=10_000, knn_dim=4096, profile_pairs=200,
    demo=["--set", "seeds=[0, 1, 2]"], demo_min_s=90, jobs=4,
)
SMOKE = Sizes(
    device="cpu", budget_s=240,
    limits={"setup": 40, "bench": 60, "bench-7b": 5, "bench-real": 5, "demo-start": 5, "analysis": 60,
            "train": 150, "eval": 60, "demo": 240},
    bench=["--preset", "smoke", "--device", "cpu", "--dtype", "fp32", "--configs", "full,midtune,naive,lora",
           "--rounds", "1", "--threads", "1", "--in-process"],  # one process: the step's wiring, not a measurement
    bench_real=None,  # composing SmolLM2 alone takes ~30 s on 2 cores; tests/test_bench.py runs the preset
    bench_7b=None,  # a 4096-wide model's AdamW state alone is GBs; tests/test_bench.py checks the preset's sizes
    world=["--n-train", "40", "--n-val", "4", "--n-test", "12"],
    tiny=["--layers", "4", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vision-layers", "1",
          "--vision-hidden", "16", "--vision-heads", "2"],
    train_steps=4, eval_limit=6, knn_points=1500, knn_dim=256, profile_pairs=40,
    demo=None, demo_min_s=20, jobs=2,
)

BACKENDS = ("plain", "zero2", "zero3", "fsdp2")


# -------------------------------------------------------------------------------------------------------------
# Running commands under a limit
# -------------------------------------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step's failure, with the one-line reason that goes into the report."""


class TimedOut(StepFailed):
    """A command killed at its limit: a failure (it hung or was too slow), unlike OutOfTime."""


class OutOfTime(Exception):
    """Not enough of the budget left to start: the step or backend is skipped for time."""


class Skipped(Exception):
    """A step or backend that cannot run here, with the reason."""


def one_line(text: str, limit: int = 240) -> str:
    """The line of a log that says what went wrong: the last error-looking line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    markers = ("Error", "error:", "Exception", "Traceback", "refused", "failed", "not supported", "No module")
    pick = next((line for line in reversed(lines)
                 if any(m in line for m in markers) and not line.startswith("Traceback")),
                lines[-1] if lines else "no output")
    return pick if len(pick) <= limit else pick[: limit - 1] + "…"


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    """Start `cmd` in its own process group (so that a limit kills accelerate's workers too), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                                start_new_session=True)
    proc.log, proc.started = log, time.monotonic()  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for a started command; its output is returned. Past `timeout` the whole group is killed and TimedOut
    raised; a non-zero exit raises StepFailed with the log's telling line."""
    log = proc.log  # type: ignore[attr-defined]
    try:
        proc.wait(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimedOut(f"{log.stem}: still running after {time.monotonic() - proc.started:.0f} s (killed); "
                        f"log {log.name}") from None
    finally:
        try:  # workers a launcher left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise StepFailed(f"{log.stem}: exit {proc.returncode} after {time.monotonic() - proc.started:.0f} s: "
                         f"{one_line(text)}")
    return text


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> str:
    """Run `cmd` to the end within `timeout` seconds (see `finish`)."""
    if timeout < 1:
        raise OutOfTime(f"no time left for {log.stem}")
    return finish(start(cmd, log, env), timeout)


def last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed("no JSON result in the output")


# -------------------------------------------------------------------------------------------------------------
# The steps
# -------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    out: Path
    clock: Clock
    step_limit: float = 0.0
    step_start: float = 0.0
    setup: dict = field(default_factory=dict)  # world, model: paths made by the setup step
    trained: Path | None = None  # a merged checkpoint (the plain backend's final/)
    demo: subprocess.Popen | None = None  # the demo, running in the background

    def left(self) -> float:
        """Seconds left to the running step: its own limit or the overall budget, whichever ends first."""
        return min(self.step_limit - (time.monotonic() - self.step_start), self.clock.left())

    def need(self, key: str) -> Path:
        if key not in self.setup:
            raise StepFailed(f"needs the setup step's {key}, which failed")
        return self.setup[key]


def step_setup(ctx: Context) -> dict:
    """A shapes world and a tiny random-init LLaVA that steps 2-4 train, evaluate and profile."""
    world, model = ctx.out / "world", ctx.out / "tiny-llava"
    for path in (world, model):
        shutil.rmtree(path, ignore_errors=True)
    run([PY, "-m", "midtune.shapes", "--out", str(world), "--no-progress", *ctx.sizes.world],
        ctx.out / "logs" / "setup-world.log", ctx.left())
    ctx.setup["world"] = world
    run([PY, "-m", "midtune.tiny", "--family", "llava", "--data", str(world), "--out", str(model), *ctx.sizes.tiny],
        ctx.out / "logs" / "setup-model.log", ctx.left())
    ctx.setup["model"] = model
    return {"world": str(world), "model": str(model)}


def step_bench(ctx: Context, name: str = "bench", args: list | None = None) -> dict:
    result = ctx.out / f"{name}.json"
    result.unlink(missing_ok=True)
    run([PY, "-m", "train.bench", *(args or ctx.sizes.bench), "--no-record", "--json", str(result)],
        ctx.out / "logs" / f"{name}.log", ctx.left())
    data = json.loads(result.read_text())
    preset = data["preset"]
    tokens = preset["batch"] * preset["seq_len"]
    rows = []
    for r in data["rows"]:
        rows.append({
            "setup": r["setup"], "median_step_s": r["median_s"], "tokens_per_s": tokens / r["median_s"],
            "peak_training_mib": r["peak_training_mib"], "peak_total_mib": r["peak_total_mib"],
            "trainable": r["trainable"], "vs_full": r.get("vs_full"), "analytic_vs_full": r.get("analytic_vs_full"),
            "vs_naive": r.get("vs_naive"), "analytic_vs_naive": r.get("analytic_vs_naive"),
            "mem_vs_full": r.get("mem_vs_full"), "round_medians": r["round_medians"],
        })
    return {"preset": preset["name"], "dtype": preset["dtype"], "device": preset["device"],
            "layers": preset["layers"], "block": preset["block"], "tokens_per_step": tokens,
            "rounds": preset["rounds"], "rows": rows, "goals": data["goals"]}


def step_bench_real(ctx: Context) -> dict:
    """train.bench on the real pretrained LLM with the paper's LLaVA-7B block (layers 6-16 of 32 → 6-15 of 30),
    logits at labels against logits everywhere too."""
    if ctx.sizes.bench_real is None:
        raise Skipped("composing the real LLM does not fit the CPU rehearsal's budget (tests/test_bench.py runs "
                      "the preset)")
    return step_bench(ctx, "bench-real", ctx.sizes.bench_real)


def step_bench_7b(ctx: Context) -> dict:
    """The paper's ratio at the paper's width: block / full step time over alternated rounds, with its interval."""
    if ctx.sizes.bench_7b is None:
        raise Skipped("LLaVA-7B's width does not fit the CPU rehearsal (tests/test_bench.py checks the preset)")
    figures = step_bench(ctx, "bench-7b", ctx.sizes.bench_7b)
    figures.update(block_vs_full(figures["rows"], paper=0.861))
    return figures


def block_vs_full(rows: list[dict], paper: float) -> dict:
    """midtune / full from the rounds' medians (each round runs both, in alternating order): the geometric mean
    of the per-round ratios with a t interval, its cost verdict, and where the interval sits against the paper's
    ratio. Peak memory is close to deterministic: its ratio per round, not an interval."""
    sys.path.insert(0, str(ROOT))
    from compare.stats import cost_verdict, step_ratio

    by = {r["setup"]: r for r in rows}
    full, block = by["full"], by["midtune"]
    ratio = step_ratio(block["round_medians"], full["round_medians"])
    lo, hi = ratio.ci
    paper_word = "below" if hi < paper else "above" if lo > paper else "inconclusive (the interval holds it)"
    return {"step_ratio": ratio.estimate, "step_ratio_ci": [lo, hi], "step_ratio_rounds": ratio.n_pairs,
            "step_verdict": cost_verdict(ratio.ci, margin=0.05), "paper_ratio": paper,
            "vs_paper": paper_word, "memory_ratio": block.get("mem_vs_full")}


def accelerate_config(ctx: Context, backend: str, port: int, ranks: int = 1) -> Path:
    """`ranks` processes of the shipped accelerate config for `backend` (bf16 on the GPU; fp32 on the CPU)."""
    import yaml

    shipped = {"plain": "single_gpu", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "fsdp2": "fsdp"}
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{shipped[backend]}.yaml").read_text())
    config.update(num_processes=ranks, main_process_port=port)
    if "deepspeed_config" in config:  # the JSON's path is relative to the repository root
        ds = config["deepspeed_config"]
        ds["deepspeed_config_file"] = str(ROOT / ds["deepspeed_config_file"])
    if "deepspeed_config" not in config:  # DeepSpeed takes precision from its JSON ("auto": train's bf16 on GPU)
        config["mixed_precision"] = "no" if ctx.sizes.device == "cpu" else "bf16"
    path = ctx.out / "train" / f"accelerate-{backend}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


EXPECTED_TYPE = {"plain": "NO", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
SHARDED = ("zero3", "fsdp2")  # every rank gathers the frozen tower too: 2 ranks where the machine has 2 GPUs


def gpu_count(ctx: Context) -> int:
    if ctx.sizes.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def mixed_rows(ctx: Context) -> Path:
    """What users train on: the world's image rows and text-only rows of uneven length, shuffled together."""
    import random

    path = ctx.out / "train" / "mixed.json"
    if not path.exists():
        rows = json.loads((ctx.need("world") / "train.json").read_text())
        rows += [{"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "Name a colour. " * (1 + 5 * (i % 4))},
            {"from": "gpt", "value": " ".join(["red", "green", "blue"] * (1 + 3 * (i % 3)))}]}
            for i in range(max(4, len(rows) // 8))]
        random.Random(0).shuffle(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return path


def train_backend(ctx: Context, backend: str, port: int) -> dict:
    if backend == "fsdp2" and ctx.sizes.device == "cpu":
        # with use_cpu accelerate runs FSDP configs as plain MULTI_CPU data parallelism: nothing of FSDP is tried
        raise Skipped("accelerate does not enable FSDP on the CPU (it would run MULTI_CPU instead); "
                      "tests/test_multirank.py runs FSDP2 on 2 CPU ranks through tests/fsdp_on_cpu.py")
    world, model = ctx.need("world"), ctx.need("model")
    ranks = min(2, gpu_count(ctx)) if backend in SHARDED else 1
    config = accelerate_config(ctx, backend, port, max(1, ranks))
    first, resumed = ctx.out / "train" / backend / "a", ctx.out / "train" / backend / "b"
    shutil.rmtree(first.parent, ignore_errors=True)
    save_at = ctx.sizes.train_steps // 2
    overrides = [f"model={model}", f"data={mixed_rows(ctx)}", f"image_folder={world / 'images'}",
                 f"max_steps={ctx.sizes.train_steps}", f"save_steps={save_at}", "save_total_limit=0",
                 "batch_size=2", "grad_accum=2", "seed=0", "optim.lr=1e-3", "report_to=[]",
                 "trainable.layers=1-2", "gradient_checkpointing=true"]
    if ctx.sizes.device != "cpu" and backend in ("plain", "zero3", "fsdp2"):
        overrides.append("dtype=bfloat16")  # the 7B recipe: bf16 weights, fp32 master weights of what trains
    # `accelerate launch` itself, minus the CLI's other subcommands: its `estimate-memory` imports timm and
    # torchvision's models, 7 of the CLI's 11 s start-up on this project's CPU machine
    launch = [PY, "-m", "accelerate.commands.launch", "--config_file", str(config), "train"]
    # No use_cpu on the CPU: with it accelerate runs DeepSpeed configs as MULTI_CPU; without a GPU it runs on the CPU
    env = {"OMP_NUM_THREADS": "1"} if ctx.sizes.device == "cpu" else {}
    started = time.monotonic()
    run([*launch, *overrides, f"output_dir={first}"], ctx.out / "logs" / f"train-{backend}.log", ctx.left(), env)
    first_wall = time.monotonic() - started
    resumed.mkdir(parents=True)
    shutil.copytree(first / f"checkpoint-{save_at}", resumed / f"checkpoint-{save_at}")
    run([*launch, *overrides, f"output_dir={resumed}", "resume_from=latest"],
        ctx.out / "logs" / f"train-{backend}-resume.log", ctx.left(), env)
    losses = [m["loss"] for m in read_jsonl(first / "metrics.jsonl")]
    again = [m["loss"] for m in read_jsonl(resumed / "metrics.jsonl")]
    info = json.loads((first / "run.json").read_text())
    figures = {
        "losses": losses, "resumed_losses": again, "wall_s": round(first_wall, 1),
        "distributed_type": info.get("distributed_type"), "mixed_precision": info.get("mixed_precision"),
        "median_step_s": info.get("median_step_time_s", info.get("median_step_s")),
        "peak_training_memory_mb": info.get("peak_training_memory_mb"),
        "trainable": info.get("parameters", {}).get("trainable"), "final": str(first / "final"),
        "precision": info.get("precision", {}).get("line"), "ranks": info.get("world_size"),
    }
    if not figures["trainable"]:  # ZeRO-3's partitioned stand-ins once counted as 0
        raise StepFailed(f"run.json counts {figures['trainable']} trainable parameters")
    if figures["distributed_type"] != EXPECTED_TYPE[backend]:
        raise StepFailed(f"accelerate ran {figures['distributed_type']}, not {EXPECTED_TYPE[backend]}")
    if backend == "fsdp2":  # only the trainable tensors' shards, never the frozen base
        saved = sorted(p.name for p in (first / f"checkpoint-{save_at}").iterdir())
        figures["checkpoint_files"] = saved
        if not any(n.startswith("trainable-rank") for n in saved) or any("pytorch_model" in n for n in saved):
            raise StepFailed(f"the FSDP2 checkpoint holds {saved}, not each rank's trainable shard")
    expected = losses[save_at:]
    if len(again) != len(expected) or not again:
        raise StepFailed(f"the resume logged {len(again)} losses, expected {len(expected)}")
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(again, expected))
    figures["resume_max_rel_diff"] = diff
    figures["resume_exact"] = again == expected
    if diff > 1e-5:
        raise StepFailed(f"the resume does not repeat the losses: {again} vs {expected} (rel. diff {diff:.2e})")
    return figures


def step_train(ctx: Context) -> dict:
    sys.path.insert(0, str(ROOT))
    from midtune.machine import free_port

    results: dict[str, dict] = {}

    def one(backend):
        t0 = time.monotonic()
        try:
            figures = train_backend(ctx, backend, free_port())
            results[backend] = {"status": "passed", **figures}
        except (Skipped, OutOfTime) as e:
            results[backend] = {"status": "skipped", "reason": str(e)}
        except StepFailed as e:
            results[backend] = {"status": "failed", "reason": str(e.args[0])}
        except Exception as e:  # noqa: BLE001 - one backend's surprise must not hide the others' results
            results[backend] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        results[backend]["seconds"] = round(time.monotonic() - t0, 1)

    with ThreadPoolExecutor(max_workers=ctx.sizes.jobs) as pool:
        list(pool.map(one, BACKENDS))
    plain = results.get("plain", {})
    if plain.get("status") == "passed":
        ctx.trained = Path(plain["final"])
    ordered = {b: results[b] for b in BACKENDS}
    failed = [b for b, r in ordered.items() if r["status"] == "failed"]
    if not any(r["status"] == "passed" for r in ordered.values()):
        raise StepFailed("no backend trained: " + "; ".join(f"{b}: {ordered[b]['reason']}" for b in failed),
                         ordered)
    summary = {"backends": ordered}
    if failed:
        raise StepFailed(f"{', '.join(failed)} failed ({len(BACKENDS) - len(failed)} of {len(BACKENDS)} "
                         f"backends passed or were skipped)", summary)
    return summary


EVAL_PROGRAM = r"""
import json, sys
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager
from eval.lmms_plugin import cut_at_stops
from eval.tasks import TASKS_DIR, ensure_shapes_data

checkpoint, device, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
ensure_shapes_data()
tasks = ["midtune_shapes_color", "midtune_shapes_count"]
out = {}
for model, batch_size in (("llava_hf", 1), ("midtune", 8)):
    args = f"pretrained={checkpoint},dtype=float32" + (f",device_map={device}" if model == "llava_hf" else "")
    results = evaluator.simple_evaluate(model=model, model_args=args, tasks=tasks, limit=limit, device=device,
                                        batch_size=batch_size, log_samples=True, bootstrap_iters=0,
                                        task_manager=TaskManager("WARNING", include_path=str(TASKS_DIR),
                                                                 include_defaults=False))
    out[model] = {
        "scores": {t: results["results"][t]["accuracy,none"] for t in tasks},
        "answers": {t: [cut_at_stops(s["filtered_resps"][0], ["\n\n"]).strip() for s in results["samples"][t]]
                    for t in tasks},
    }
print(json.dumps(out))
"""


def step_eval(ctx: Context) -> dict:
    if ctx.trained is None:
        raise StepFailed("needs the plain backend's trained checkpoint, which the train step did not produce")
    text = run([PY, "-c", EVAL_PROGRAM, str(ctx.trained), ctx.sizes.device, str(ctx.sizes.eval_limit)],
               ctx.out / "logs" / "eval.log", ctx.left(), {"HF_DATASETS_CACHE": str(ctx.out / "hf_datasets")})
    result = last_json(text)
    mine, theirs = result["midtune"], result["llava_hf"]
    same_answers = {t: sum(a == b for a, b in zip(mine["answers"][t], theirs["answers"][t]))
                    for t in mine["answers"]}
    figures = {"checkpoint": str(ctx.trained), "limit": ctx.sizes.eval_limit, "dtype": "float32",
               "midtune_scores": mine["scores"], "llava_hf_scores": theirs["scores"],
               "same_answers": same_answers, "answers_per_task": {t: len(a) for t, a in mine["answers"].items()}}
    if mine["scores"] != theirs["scores"] or mine["answers"] != theirs["answers"]:
        raise StepFailed(f"midtune and llava_hf differ: scores {mine['scores']} vs {theirs['scores']}, "
                         f"same answers {same_answers}", figures)
    return figures


KNN_PROGRAM = r"""
import json, sys, time
import numpy as np, torch
from analysis.bench import make_data
from analysis.geometry import knn, neighborhood_overlap, twonn

n, dim, k, device = int(sys.argv[1]), int(sys.argv[2]), 30, sys.argv[3]
a, b = make_data(n, dim, seed=0)

def timed(dev):
    knn(a[:256], k, device=dev)  # warm-up: CUDA context, kernels
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    nb_a, nb_b = knn(a, k, device=dev), knn(b, k, device=dev)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, nb_a, nb_b

gpu_s, ga, gb = timed(device)
cpu_s, ca, cb = timed("cpu")
same = float((np.sort(ga.indices, 1) == np.sort(ca.indices, 1)).all(1).mean())
print(json.dumps({"points": n, "dim": dim, "k": k, "device": device, "device_s": gpu_s, "cpu_s": cpu_s,
                  "cpu_threads": torch.get_num_threads(), "speedup": cpu_s / gpu_s,
                  "rows_with_same_neighbours": same,
                  "max_distance_diff": float(np.abs(ga.distances - ca.distances).max()),
                  "twonn": [twonn(ga), twonn(ca)], "overlap": [neighborhood_overlap(ga, gb, k=k),
                                                             neighborhood_overlap(ca, cb, k=k)]}))
"""


def flat_numbers(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from flat_numbers(v, f"{prefix}{i}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix.rstrip("."), float(obj)


def step_analysis(ctx: Context) -> dict:
    world, model = ctx.need("world"), ctx.need("model")
    profiles, seconds = {}, {}
    started = {}
    for where in (ctx.sizes.device, "cpu") if ctx.sizes.device != "cpu" else ("cpu", "cpu-again"):
        out = ctx.out / "analysis" / where
        shutil.rmtree(out, ignore_errors=True)
        env = {"CUDA_VISIBLE_DEVICES": ""} if where.startswith("cpu") else {}  # the neighbour search too
        started[where] = (out, start(
            [PY, "-m", "analysis", "profile", "--model", f"tiny={model}", "--pairs", str(world / "pairs.jsonl"),
             "--max-pairs", str(ctx.sizes.profile_pairs), "--k", "10", "--no-idcorr", "--no-progress",
             "--device", "cpu" if where.startswith("cpu") else where, "--out", str(out)],
            ctx.out / "logs" / f"analysis-profile-{where}.log", env))
    for where, (out, proc) in started.items():  # both run side by side; each is waited for within the limit
        finish(proc, ctx.left())
        seconds[where] = round(time.monotonic() - proc.started, 1)
        profiles[where] = dict(flat_numbers(json.loads(next(out.rglob("profiles.json")).read_text())))
    (one, one_values), (two, two_values) = profiles.items()
    # Relative: the forward passes differ in float32 rounding between devices, and estimators of intrinsic
    # dimension and overlap move with the neighbour distances (the first H200 run: 0.0018 apart on one ID)
    shared = [k for k in one_values if k in two_values and all(map(math.isfinite, (one_values[k], two_values[k])))]

    def rel(k):
        return abs(one_values[k] - two_values[k]) / max(abs(one_values[k]), abs(two_values[k]), 1e-12)

    worst = max(shared, key=rel, default=None)
    max_diff = rel(worst) if worst else float("nan")
    text = run([PY, "-c", KNN_PROGRAM, str(ctx.sizes.knn_points), str(ctx.sizes.knn_dim), ctx.sizes.device],
               ctx.out / "logs" / "analysis-knn.log", ctx.left())
    figures = {"profile_seconds": seconds, "profile_values_compared": len(shared), "profile_max_rel_diff": max_diff,
               "profile_worst_value": worst,
               "profile_worst_values": {one: one_values.get(worst), two: two_values.get(worst)} if worst else {},
               "knn": last_json(text)}
    if not shared:
        raise StepFailed("the two profiles share no finite values", figures)
    if max_diff > 1e-3:
        raise StepFailed(f"profiles differ between {one} and {two}: {worst} {figures['profile_worst_values']} "
                         f"(relative {max_diff:.2g})", figures)
    if figures["knn"]["rows_with_same_neighbours"] < 0.999:
        raise StepFailed(f"neighbours differ on {1 - figures['knn']['rows_with_same_neighbours']:.2%} of rows", figures)
    return figures


def step_demo_start(ctx: Context) -> dict:
    """The demo starts here, after the bench (whose timings it would disturb), and runs beside the analysis, train
    and eval steps: on the H200 the earlier, tiny demo needed about 5 minutes, which would not fit after them (the
    first GPU check killed it in its last stage; the demo on SmolLM2 has not run on a GPU yet). `step_demo` waits
    for it with whatever is left of the budget."""
    if ctx.sizes.demo is None:
        raise Skipped("the demo on the pretrained SmolLM2 does not fit the CPU rehearsal's budget "
                      "(tests/test_compare.py runs a shrunk version on its own)")
    if ctx.clock.left() < ctx.sizes.demo_min_s:
        raise OutOfTime(f"no time left for the demo ({ctx.clock.left():.0f} s, it needs {ctx.sizes.demo_min_s} s)")
    out = ctx.out / "demo"
    shutil.rmtree(out, ignore_errors=True)
    ctx.demo = start([PY, "-m", "compare", str(ROOT / "configs" / "experiments" / "demo.yaml"), "--set",
                      f"output_dir={out}", "--force", *ctx.sizes.demo],
                     ctx.out / "logs" / "demo.log")
    return {}


def step_demo(ctx: Context) -> dict:
    if ctx.demo is None:
        raise StepFailed("the demo was not started")
    proc, ctx.demo = ctx.demo, None
    try:
        finish(proc, ctx.left())
    except TimedOut:
        stages = [line for line in proc.log.read_text(errors="replace").splitlines() if line.startswith("[")]
        raise OutOfTime(f"the demo did not finish within the budget (last: "
                        f"{stages[-1] if stages else 'no stage done'}); killed") from None
    out = ctx.out / "demo"
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return {"wall_s": round(time.monotonic() - proc.started, 1), "summary": summary,
            "ran_beside": "analysis, train, eval"}


# In the order they run; the report lists them in the order of the module docstring (REPORT_ORDER).
STEPS = [("setup", step_setup), ("bench", step_bench), ("bench-7b", step_bench_7b),
         ("bench-real", step_bench_real), ("demo-start", step_demo_start), ("analysis", step_analysis),
         ("train", step_train), ("eval", step_eval), ("demo", step_demo)]
REPORT_ORDER = ("setup", "bench", "bench-7b", "bench-real", "train", "eval", "analysis", "demo")


# -------------------------------------------------------------------------------------------------------------
# The machine, the report
# -------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    for name in ("transformers", "accelerate", "deepspeed", "peft", "lmms_eval"):
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing package is itself a finding
            info[name] = "not installed"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["device"] = f"CPU only ({platform.processor() or platform.machine()})"
    return info


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    when = report["started"][:16].replace("T", " ")
    title = "GPU check (SMOKE, CPU rehearsal)" if report["smoke"] else "GPU check"
    lines = [f"## {title} — {when} UTC — {m['device']}", "",
             f"`{report['command']}`; {report['wall_s']:.0f} s of a {report['budget_s']} s budget. "
             f"Driver {m.get('driver', '–')}, torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}, "
             f"transformers {m['transformers']}, accelerate {m['accelerate']}, deepspeed {m['deepspeed']}, "
             f"peft {m['peft']}, lmms-eval {m['lmms_eval']}, {m['cpu_count']} CPU cores.", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in report["steps"]:
        note = s.get("reason") or s.get("figures", {}).get("partial", "")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {note} |")
    steps = {s["name"]: s for s in report["steps"]}
    for bench in (steps.get(name, {}).get("figures") for name in ("bench", "bench-7b", "bench-real")):
        if not bench:
            continue
        lines += ["", f"train.bench, preset {bench['preset']}, {bench.get('layers', '?')} layers, block "
                  f"{bench.get('block', '?')}, {bench['dtype']} on {bench['device']}, "
                  f"{bench['tokens_per_step']} tokens per step, {bench['rounds']} round(s):", "",
                  "| setup | median step (s) | tokens/s | peak training memory (MiB) | peak total (MiB) | "
                  "vs full (analytic) | vs naive (analytic) | memory vs full |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in bench["rows"]:
            lines.append(f"| {r['setup']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{fmt(r['peak_training_mib'], '.0f')} | {fmt(r['peak_total_mib'], '.0f')} | "
                         f"{fmt(r['vs_full'])} ({fmt(r['analytic_vs_full'])}) | "
                         f"{fmt(r['vs_naive'])} ({fmt(r['analytic_vs_naive'])}) | {fmt(r['mem_vs_full'])} |")
        if "step_ratio" in bench:
            lo, hi = bench["step_ratio_ci"]
            lines += ["", f"Block / full step time {bench['step_ratio']:.3f} [{lo:.3f}, {hi:.3f}] (95 % t interval "
                      f"over {bench['step_ratio_rounds']} alternated rounds): {bench['step_verdict']}; against the "
                      f"paper's {bench['paper_ratio']:.3f}: {bench['vs_paper']}. Peak training memory block / full "
                      f"{fmt(bench['memory_ratio'])}."]
    train = steps.get("train", {}).get("figures", {}).get("backends")
    if train:
        lines += ["", "Training through `accelerate launch` per backend (ZeRO-3 and FSDP2 on 2 ranks where the "
                  "machine has 2 GPUs, else 1; the column says), tiny LLaVA on image rows beside text-only rows, "
                  "batch 2 × accumulation 2, layers 1-2 trained, a checkpoint at step 2 and a resume from it (the "
                  "backends run side by side, beside the demo: their step times are not timings):", "",
                  "| backend | ranks | status | distributed type | precision | median step (s) | losses | resumed | "
                  "note |", "|---|---:|---|---|---|---:|---|---|---|"]
        for b, r in train.items():
            losses = ", ".join(f"{x:.4f}" for x in r.get("losses", []))
            resumed = ", ".join(f"{x:.4f}" for x in r.get("resumed_losses", []))
            if r["status"] == "passed":
                resumed += " (exact)" if r.get("resume_exact") else f" (rel. diff {r['resume_max_rel_diff']:.1e})"
            lines.append(f"| {b} | {r.get('ranks', '–')} | {r['status']} | {r.get('distributed_type', '–')} | "
                         f"{r.get('precision') or r.get('mixed_precision', '–')} | {fmt(r.get('median_step_s'))} | "
                         f"{losses or '–'} | "
                         f"{resumed or '–'} | {r.get('reason', '')} |")
    ev = steps.get("eval", {}).get("figures")
    if ev:
        lines += ["", f"lmms-eval, {ev['limit']} questions per task, {ev['dtype']}: midtune plugin "
                  f"{ev['midtune_scores']}, llava_hf {ev['llava_hf_scores']}, same answers {ev['same_answers']} "
                  f"of {ev['answers_per_task']}."]
    an = steps.get("analysis", {}).get("figures")
    if an:
        knn = an["knn"]
        lines += ["", f"analysis profile, {an['profile_values_compared']} values compared, largest relative "
                  f"difference {an['profile_max_rel_diff']:.2g} ({an['profile_worst_value']}: "
                  f"{an['profile_worst_values']}); seconds {an['profile_seconds']}. "
                  f"Neighbour search on {knn['points']} × {knn['dim']} (k = {knn['k']}, two representations, "
                  f"beside the demo): "
                  f"{knn['device']} {knn['device_s']:.2f} s, CPU ({knn['cpu_threads']} threads) {knn['cpu_s']:.2f} s, "
                  f"{knn['speedup']:.1f}×; same neighbours on {knn['rows_with_same_neighbours']:.2%} of rows, "
                  f"largest distance difference {knn['max_distance_diff']:.2g}."]
    demo = steps.get("demo", {}).get("figures")
    if demo:
        lines += ["", f"Demo: {demo['wall_s']:.0f} s.", ""]
        if demo.get("summary"):
            lines += ["```", demo["summary"].strip(), "```"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny sizes (< 4 min)")
    ap.add_argument("--out", help="results and logs (default runs/gpu-check, runs/gpu-check-smoke)")
    ap.add_argument("--budget", type=int, help="seconds for all steps (default 600 on the GPU, 240 for SMOKE)")
    ap.add_argument("--steps", help=f"comma-separated subset of {','.join(REPORT_ORDER)}")
    ap.add_argument("--record", help="append the Markdown section here (default BENCHMARKS.md; SMOKE: nowhere)")
    args = ap.parse_args(argv)

    sizes = SMOKE if args.smoke else GPU
    if args.budget:
        sizes = Sizes(**{**sizes.__dict__, "budget_s": args.budget})
    out = Path(args.out or ROOT / "runs" / ("gpu-check-smoke" if args.smoke else "gpu-check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.steps.split(",")) if args.steps else set(REPORT_ORDER)
    unknown = wanted - set(REPORT_ORDER)
    if unknown:
        ap.error(f"unknown step(s) {sorted(unknown)}")

    info = machine()
    if not args.smoke and "CPU only" in info["device"]:
        print("gpu-check: no CUDA device here; `make gpu-check SMOKE=1` rehearses the steps on the CPU",
              file=sys.stderr)
        return 2
    clock = Clock(sizes.budget_s)
    ctx = Context(sizes, out, clock)
    report = {"smoke": args.smoke, "command": "make gpu-check" + (" SMOKE=1" if args.smoke else ""),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": sizes.budget_s,
              "machine": info, "steps": []}
    print(f"gpu-check on {info['device']}: torch {info['torch']}, CUDA {info['cuda']}, budget {sizes.budget_s} s",
          flush=True)
    entries: dict[str, dict] = {}
    try:
        for name, fn in STEPS:
            reported = "demo" if name == "demo-start" else name
            entry = {"name": reported}
            t0 = time.monotonic()
            ctx.step_start, ctx.step_limit = t0, sizes.limits[name]
            if reported not in wanted:
                entry.update(status="skipped", reason="not asked for (--steps)")
            elif name == "demo" and entries.get("demo", {}).get("status") != "passed":
                continue  # the demo never started: its entry says why
            elif name != "demo" and clock.left() < 5:
                entry.update(status="skipped", reason=f"for time: {clock.left():.0f} s of the budget left")
            else:
                try:
                    entry.update(status="passed", figures=fn(ctx))
                except Skipped as e:
                    entry.update(status="skipped", reason=str(e))
                except OutOfTime as e:
                    entry.update(status="skipped", reason=f"for time: {e}")
                except StepFailed as e:
                    entry.update(status="failed", reason=str(e.args[0]))
                    if len(e.args) > 1:
                        entry["figures"] = e.args[1]
                except Exception as e:  # noqa: BLE001 - a surprise in one step must not cost the others
                    entry.update(status="failed", reason=f"{type(e).__name__}: {one_line(str(e))}")
            entry["seconds"] = round(entry.get("figures", {}).get("wall_s", time.monotonic() - t0), 1)
            entries[reported] = entry
            if name != "demo-start":
                print(f"[{reported}] {entry['status']} in {entry['seconds']:.0f} s" +
                      (f": {entry['reason']}" if entry.get("reason") else ""), flush=True)
    finally:
        if ctx.demo is not None:  # interrupted: the background demo goes too
            try:
                os.killpg(ctx.demo.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    report["steps"] = [entries[n] for n in REPORT_ORDER]
    report["wall_s"] = round(time.monotonic() - clock.start, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    section = markdown(report)
    (out / "gpu-check.md").write_text(section)
    record = args.record if args.record is not None else (None if args.smoke else str(ROOT / "BENCHMARKS.md"))
    if record:
        with open(record, "a") as f:
            f.write("\n" + section)
    print("\n" + section)
    print(f"results: {out / 'gpu-check.json'}" + (f"; section appended to {record}" if record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
