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

from midtune.shapes import CANONICAL, generate_world
from midtune.tiny import build_tiny, world_texts

WORLD = CANONICAL
# 8 LLM layers so that a "middle half" block is 4 layers; a 16 px patch is one 16 px grid cell of the world.
BASE = dict(family="llava", layers=8, hidden=128, heads=4, kv_heads=2, vision_layers=2, vision_hidden=64,
            vision_heads=4, patch_size=16)


def stage(name: str, out: Path, params: dict, force: bool, run) -> Path:
    """Run a stage unless an earlier run finished it with the same parameters (recorded in a marker file)."""
    marker = out / ".midtune-stage.json"
    record = json.dumps(params, sort_keys=True)
    if not force and marker.exists() and marker.read_text() == record:
        print(f"[{name}] reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    print(f"[{name}] building {out} ...", flush=True)
    run(out)
    marker.write_text(record)  # written last: a stage cut short is redone
    print(f"[{name}] done in {time.perf_counter() - start:.1f}s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m midtune.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--force", action="store_true", help="redo every stage")
    args = ap.parse_args(argv)
    root = Path(args.out)

    world = stage("world", root / "world", WORLD, args.force,
                  lambda out: generate_world(out, **WORLD))
    base = stage("base", root / "base", {**BASE, "world": WORLD}, args.force,
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
