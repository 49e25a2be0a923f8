"""`make demo`: the paper's experiment in miniature, on the shapes world.

Stages run in order and each is skipped when its output is already complete (`--force` redoes all):
  1. world — the shapes world (images, instruction data, test questions, pairs, corpus)
  2. base  — a tiny LLaVA built from config with a tokenizer trained on the world's text
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from midtune.shapes import generate_world
from midtune.tiny import build_tiny, world_texts

WORLD = dict(seed=0, n_train=4000, n_val=200, n_test=300, image_size=64)
BASE = dict(family="llava", layers=8, hidden=256, vision_layers=4, vision_hidden=192, patch_size=8)


def stage(name: str, out: Path, done_marker: str, force: bool, run) -> Path:
    """Run a stage unless its marker file shows a finished earlier run."""
    marker = out / done_marker
    if marker.exists() and not force:
        print(f"[{name}] reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    print(f"[{name}] building {out} ...", flush=True)
    run(out)
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m midtune.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    args = ap.parse_args(argv)
    root = Path(args.out)

    world = stage("world", root / "world", "world.json", args.force,
                  lambda out: generate_world(out, **WORLD))
    base = stage("base", root / "base", "config.json", args.force,
                 lambda out: build_tiny(BASE["family"], out, world_texts(world),
                                        **{k: v for k, v in BASE.items() if k != "family"}))

    counts = json.loads((world / "world.json").read_text())["counts"]
    config = json.loads((base / "config.json").read_text())
    print("\nmade:")
    print(f"  world  {world}  ({', '.join(f'{k}: {v}' for k, v in counts.items() if not isinstance(v, dict))})")
    print(f"  base   {base}  ({config['architectures'][0]}, {config['text_config']['num_hidden_layers']} LLM layers"
          f" × {config['text_config']['hidden_size']})")


if __name__ == "__main__":
    main()
