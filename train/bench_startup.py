"""Time to the first training step on a large LLaVA-format data set, and its padding (a benchmark, not a test).

    python -m train.bench_startup                     # 100k rows, ~10 min on 2 cores; appends to BENCHMARKS.md
    python -m train.bench_startup --rows 2000 --no-record

It writes a LLaVA-format JSON of `--rows` rows (1-3 question/answer turns of varied length, 20 % text-only)
over `--images` small PNGs on disk, composes the real LLM (SmolLM2-135M, the tokenizer users' data meets) with a
small CLIP tower, and times `train` from launch to its first logged step (`max_steps=1`):

* cold: the data-check cache emptied, so every row is checked (structure, image header, tokenised length);
* warm: the same command again: the checks are read back from $MIDTUNE_CACHE/data-checks;

with 1 process and with 2 (torchrun, gloo on the CPU: each checks half the rows). It also reports the padding
fraction of batches of `--batch-size` cut at random and by `group_by_length`, on this set and on the shapes
world's training data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

WORDS = ("red green blue yellow purple circle square triangle star left right top bottom middle shape colour "
         "count how many is there a the of in on image picture which what where").split()


def write_dataset(root: Path, rows: int, images: int, seed: int = 0) -> Path:
    """`rows` LLaVA rows over `images` 32 px PNGs in root/images; returns the JSON file."""
    from PIL import Image

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            root / "images" / f"{i:06d}.png")
    data = []
    for i in range(rows):
        turns = []
        for _ in range(rng.randint(1, 3)):
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 40))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 60))) + "."
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        row = {"id": f"row{i:07d}", "conversations": turns}
        if rng.random() < 0.8:
            row["image"] = f"{i % images:06d}.png"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        data.append(row)
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


def time_to_first_step(command: list[str], out: Path, env: dict, timeout: float = 3600) -> tuple[float, float]:
    """Seconds from launching `command` to (the training loop's start: its progress bar appears, every input
    checked and the model loaded; the first line of out/metrics.jsonl, written after step 1)."""
    import re
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = {"loop": None, "tail": b""}

    def watch_stderr():  # the progress bar `train:   0%|` is drawn when the loop starts
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            if seen["loop"] is None and re.search(rb"train:\s+0%", seen["tail"][-64:] + chunk):
                seen["loop"] = time.perf_counter() - start
            seen["tail"] = (seen["tail"] + chunk)[-4000:]

    reader = threading.Thread(target=watch_stderr, daemon=True)
    reader.start()
    metrics = out / "metrics.jsonl"
    first = None
    while proc.poll() is None and time.perf_counter() - start < timeout:
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - start
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n"
                           f"{seen['tail'].decode(errors='replace')}")
    end = time.perf_counter() - start
    return seen["loop"] or end, first or end


def padding(dataset, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """(random batches, group_by_length batches): the padding fraction of one epoch."""
    import torch

    from midtune.data import LengthGroupedSampler, padding_fraction

    shuffled = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = list(LengthGroupedSampler(dataset.lengths, dataset.has_images, batch_size,
                                        seed=seed))
    return (padding_fraction(dataset.lengths, shuffled, batch_size),
            padding_fraction(dataset.lengths, grouped, batch_size))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench_startup", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts (default: %(default)s)")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    from midtune.machine import machine_info
    from midtune.shapes import generate_world
    from train.bench import PRESETS, ensure_composed

    work = Path(args.work or tempfile.mkdtemp(prefix="midtune-startup-"))
    env = {**os.environ, "MIDTUNE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    os.environ["MIDTUNE_CACHE"] = env["MIDTUNE_CACHE"]
    t0 = time.perf_counter()
    data = write_dataset(work / "set", args.rows, args.images)
    print(f"{args.rows} rows over {args.images} images written in {time.perf_counter() - t0:.0f} s", flush=True)
    model = ensure_composed(PRESETS["smollm2-llava"])
    times: dict[tuple[int, str], tuple[float, float]] = {}
    for n in [int(p) for p in args.processes.split(",")]:
        for state in ("cold", "warm"):
            if state == "cold":
                shutil.rmtree(work / "cache" / "data-checks", ignore_errors=True)
            out = work / f"run-{n}-{state}"
            # torchrun; accelerate forms a CPU process group (gloo) only when told the run is on the CPU
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)] if n > 1 else \
                [sys.executable]
            run_env = {**env, "ACCELERATE_USE_CPU": "true"} if n > 1 else env
            command = [*launcher, "-m", "train", f"model={model}", f"data={data}",
                       f"image_folder={work / 'set' / 'images'}", f"output_dir={out}", "max_steps=1",
                       f"batch_size={args.batch_size}", "report_to=[]", "save_merged=false", "overwrite=true",
                       "trainable.layers=6-15"]
            times[n, state] = time_to_first_step(command, out, run_env)
            print(f"{n} process(es), {state}: training starts after {times[n, state][0]:.1f} s, first step done "
                  f"after {times[n, state][1]:.1f} s", flush=True)

    from transformers import AutoProcessor

    from midtune.data import SupervisedDataset

    processor = AutoProcessor.from_pretrained(model)
    big = SupervisedDataset(data, processor, image_folder=work / "set" / "images",
                            cache_dir=work / "cache" / "data-checks")  # warm: read back
    world = work / "world"
    generate_world(world, seed=0, n_train=1000, n_val=10, n_test=10, progress=False)
    shapes = SupervisedDataset(world / "train.json", processor, image_folder=world / "images")
    pads = {"this set": padding(big, args.batch_size), "shapes world train.json": padding(shapes, args.batch_size)}
    for name, (plain, grouped) in pads.items():
        print(f"padding, {name}: random {plain:.1%}, group_by_length {grouped:.1%}", flush=True)

    import torch

    info = machine_info(torch_threads=torch.get_num_threads())
    machine = (f"{info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, load average at start "
               f"{info['load_average']}; python {info['python']}, torch {info['torch']}")
    warm = {n: t[0] for (n, state), t in times.items() if state == "warm"}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(f"| {n} | {times[n, 'cold'][0]:.1f} | {times[n, 'warm'][0]:.1f} | {times[n, 'cold'][1]:.1f} | "
                     f"{times[n, 'warm'][1]:.1f} |" for n in sorted({n for n, _ in times}))
    pad_rows = "\n".join(f"| {name} | {plain:.1%} | {grouped:.1%} | {grouped / plain:.2f} |"
                         for name, (plain, grouped) in pads.items())
    section = f"""
## train: time to the first step and padding, {args.rows // 1000}k-row LLaVA-format set, {when}

- data: {args.rows} rows (1-3 turns, 80 % with an image) over {args.images} 32 px PNGs on disk; model: SmolLM2-135M
  composed with a 4-layer CLIP tower (64 image tokens); `python -m train ... max_steps=1` (layers 6-15), timed
  from launch to the training loop's start (its progress bar: imports, model load, data checks) and to the
  first line of metrics.jsonl (+ the first step: batch {args.batch_size}, on the CPU several seconds by itself);
  2 processes: torchrun, gloo
- cold: data-check cache empty (every row checked once, split across the processes); warm: the same command
  again, the checks read back from $MIDTUNE_CACHE/data-checks
- machine: {machine}

| processes | to training start, cold s | warm s | to first step done, cold s | warm s |
| ---: | ---: | ---: | ---: | ---: |
{rows}

| data (batch {args.batch_size}) | padding, random batches | padding, group_by_length | ratio |
| --- | ---: | ---: | ---: |
{pad_rows}

Goals: warm time to the training loop ≤ 10 s ({', '.join(f"{n} process{'es' if n > 1 else ''}: "
                                                        f"{'PASS' if t <= 10 else 'MISS'}" for n, t in warm.items())});
padding with grouping ≤ half of random batches ({', '.join(f"{name}: {'PASS' if g <= 0.5 * p else 'MISS'}"
                                                          for name, (p, g) in pads.items())}).
"""
    print(section)
    if not args.no_record:
        with open(args.output, "a") as fh:
            fh.write(section)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
