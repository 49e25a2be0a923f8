"""`make demo`: the paper's experiment in miniature, on the shapes world.

Stages run in order; each is skipped when an earlier run finished it with the same inputs (`--force` redoes all):
  world    the shapes world (images, instruction data, test questions, pairs, corpus)
  base     a tiny LLaVA built from config, with a tokenizer trained on the world's text
  stage_a  text-only language pretraining of the LLM            configs/demo/stage_a_text.yaml
  stage_b  alignment: vision tower + projector learn to caption  configs/demo/stage_b_align.yaml
  stage_c_full    instruction tuning of the whole LLM            configs/demo/stage_c_full.yaml
  stage_c_middle  the same, training only the LLM's middle half  configs/demo/stage_c_middle.yaml
  eval     base (= stage B), full and middle on the shapes tasks through lmms-eval (python -m eval)
  analysis per-layer geometry of the three (python -m analysis profile)
  report   runs/demo/report.md + PNGs: accuracy, cost, geometry, and verdicts computed from them

Training, eval and analysis run as the same commands a user types (printed before each runs), in their own
processes, so the step times and peak memory in the report are those of a normal run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from midtune.shapes import CANONICAL, generate_world, generator_hash
from midtune.tiny import build_tiny, world_texts

WORLD = CANONICAL
# 8 LLM layers so that the "middle half" block is 4 layers (2-5). The vision tower sees the world's images at
# their own size, so a 16 px patch is exactly one 16 px grid cell (resized to another size, patches straddle cells).
BASE = dict(family="llava", layers=8, hidden=128, heads=4, kv_heads=2, vision_layers=2, vision_hidden=64,
            vision_heads=4, patch_size=16, image_size=WORLD["image_size"])
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"
EVAL_TASKS = "midtune_shapes"
# --quick (the test suite's check of the wiring): a small world, a few steps per stage, a few questions per task.
QUICK = dict(world=dict(n_train=200, n_val=10, n_test=60), train=["max_steps=3", "batch_size=8"],
             eval=["--limit", "6"])


def stage(name: str, out: Path, params: dict, force: bool, run) -> Path:
    """Run a stage unless an earlier run finished it with the same parameters (recorded in a marker file)."""
    marker = out / ".midtune-stage.json"
    record = json.dumps(params, sort_keys=True)
    if not force and marker.exists() and marker.read_text() == record:
        print(f"[{name}] reusing {out}", flush=True)
        return out
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    print(f"\n[{name}] building {out} ...", flush=True)
    run(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(record)  # written last: a stage cut short is redone
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s", flush=True)
    return out


def fingerprint(*paths: Path) -> str:
    """What a later stage depends on: the stage markers / config files it reads."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def command(args: list[str]) -> None:
    """Run one of midtune's own commands in a fresh process, showing it and its progress."""
    print("$ " + " ".join(shlex.quote(a) for a in ["python", *args[1:]]), flush=True)
    done = subprocess.run(args)
    if done.returncode != 0:
        sys.exit(f"demo: the command above failed (exit {done.returncode})")


def train_stage(name: str, root: Path, config: str, model: Path, data: list[Path], after: list[Path],
                force: bool, extra: list[str]) -> Path:
    config_path = CONFIGS / config
    out = root / name
    overrides = [f"model={model}", "data=[" + ",".join(str(d) for d in data) + "]",
                 f"image_folder={root / 'world' / 'images'}", f"output_dir={out}", "overwrite=true", *extra]
    params = {"config": fingerprint(config_path), "overrides": overrides,
              "after": fingerprint(*(p / ".midtune-stage.json" for p in after))}
    return stage(name, out, params, force,
                 lambda _: command([sys.executable, "-m", "train", "--config", str(config_path), *overrides]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m midtune.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # wiring check for the tests
    args = ap.parse_args(argv)
    root = Path(args.out)
    started = time.perf_counter()
    world_args = {**WORLD, **QUICK["world"]} if args.quick else WORLD
    train_extra = QUICK["train"] if args.quick else []
    eval_extra = QUICK["eval"] if args.quick else []

    # The world is redone when its generator changes (new files, new questions), and everything after it with it.
    world = stage("world", root / "world", {**world_args, "generator": generator_hash()},
                  args.force, lambda out: generate_world(out, **world_args))
    base = stage("base", root / "base", {**BASE, "world": fingerprint(world / ".midtune-stage.json")}, args.force,
                 lambda out: build_tiny(BASE["family"], out, world_texts(world),
                                        **{k: v for k, v in BASE.items() if k != "family"}))

    text_data = [world / "scenes_in_words.json", world / "questions_in_words.json"]
    a = train_stage("stage_a", root, "stage_a_text.yaml", base, text_data, [base], args.force, train_extra)
    b = train_stage("stage_b", root, "stage_b_align.yaml", a / "final", [world / "captions_train.json"], [a],
                    args.force, train_extra)
    full = train_stage("stage_c_full", root, "stage_c_full.yaml", b / "final", [world / "train.json"], [b],
                       args.force, train_extra)
    middle = train_stage("stage_c_middle", root, "stage_c_middle.yaml", b / "final", [world / "train.json"], [b],
                         args.force, train_extra)
    finals = {"base": b / "final", "full": full / "final", "middle": middle / "final"}

    model_args = [f"--model={name}={path}" for name, path in finals.items()]
    models_done = fingerprint(*(p / ".midtune-stage.json" for p in (b, full, middle)))
    evaluated = stage("eval", root / "eval", {"tasks": EVAL_TASKS, "extra": eval_extra, "after": models_done},
                      args.force,
        lambda out: command([sys.executable, "-m", "eval", *model_args, "--tasks", EVAL_TASKS,
                             "--batch-size", "64", "--output_dir", str(out), *eval_extra]))
    analysed = stage("analysis", root / "analysis", {"after": models_done}, args.force,
        lambda out: command([sys.executable, "-m", "analysis", "profile", *model_args,
                             "--pairs", str(world / "pairs.jsonl"),
                             "--batch-size", "64", "--out", str(out)]))

    from midtune.report import write_report
    report = write_report(root, world, {"base": b, "full": full, "middle": middle}, evaluated, analysed,
                          stage_a=a, total_time_s=time.perf_counter() - started)
    print(f"\nreport: {report}")
    print((root / "summary.txt").read_text())


if __name__ == "__main__":
    main()
