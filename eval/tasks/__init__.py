"""midtune's own lmms-eval tasks, and the data they read.

The `midtune_shapes*` tasks (YAMLs in `midtune_shapes/`) read the test split of the canonical shapes world, which
is generated on demand — deterministically, in a few seconds — into `midtune_shapes/data/` (gitignored) by
`ensure_shapes_data()`. Nothing in that directory is hand-written. The task YAMLs name their data files relative
to themselves, and lmms-eval only anchors such a path at the YAML when the file exists at load time, so the data
must exist before lmms-eval loads the tasks: `python -m eval` calls `ensure_shapes_data()` first, and so should
anyone who runs these tasks through lmms-eval directly. The data is regenerated when it is missing, was generated
with other arguments, or was written by a different version of `midtune/shapes.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from midtune.shapes import CANONICAL, generator_hash

TASKS_DIR = Path(__file__).resolve().parent  # pass as include_path to lmms-eval's TaskManager
SHAPES_TASK_DIR = TASKS_DIR / "midtune_shapes"
SHAPES_DATA_DIR = SHAPES_TASK_DIR / "data"

# The canonical world: the same one the demo trains on (`configs/experiments/demo.yaml`); its test split is never in train.
CANONICAL_WORLD = dict(CANONICAL)  # the demo's world: its test split is never in training
QTYPES = ("color", "shape", "count", "position", "exists")
GENERATION_TASKS = tuple(f"midtune_shapes_{q}" for q in QTYPES)
MC_TASKS = tuple(f"midtune_shapes_mc_{q}" for q in QTYPES)


class ShapesDataError(RuntimeError):
    pass


GENERATOR_FILE = "generator.sha256"  # hash of midtune/shapes.py that wrote the data: new generator → new data


def shapes_data_problem(data_dir: Path = SHAPES_DATA_DIR) -> str | None:
    """Why `data_dir` does not hold the canonical world's test data (None when it does)."""
    world = data_dir / "world.json"
    if not world.is_file():
        return f"{world} does not exist"
    try:
        args = json.loads(world.read_text())["args"]
    except (ValueError, KeyError) as e:
        return f"{world} is unreadable ({e})"
    if args != CANONICAL_WORLD:
        return f"{world} has arguments {args}, not the canonical {CANONICAL_WORLD}"
    marker = data_dir / GENERATOR_FILE
    if not marker.is_file() or marker.read_text().strip() != generator_hash():
        return "it was written by another version of midtune/shapes.py"
    for qtype in QTYPES:
        path = data_dir / "test" / f"{qtype}.jsonl"
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path} is missing or empty"
    with open(data_dir / "test" / "color.jsonl") as fh:
        first = json.loads(fh.readline())
    if not (data_dir / "images" / first["image"]).is_file():
        return f"image {first['image']} of {data_dir / 'test' / 'color.jsonl'} is missing"
    return None


def ensure_shapes_data(data_dir: str | Path = SHAPES_DATA_DIR, progress: bool = True) -> Path:
    """Make sure `data_dir` holds the canonical shapes world (generating it if missing, incomplete or generated
    with other arguments); returns the directory. Safe to call from concurrent processes."""
    from filelock import FileLock

    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if shapes_data_problem(data_dir) is None:
        return data_dir
    with FileLock(str(data_dir.parent / f".{data_dir.name}.lock")):
        problem = shapes_data_problem(data_dir)  # another process may have generated it meanwhile
        if problem is None:
            return data_dir
        from midtune.shapes import generate_world

        if progress:
            print(f"generating the shapes world's task data in {data_dir} ({problem})", flush=True)
        tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_world(tmp, progress=progress, **CANONICAL_WORLD)
            (tmp / GENERATOR_FILE).write_text(generator_hash() + "\n")
            if data_dir.exists():
                shutil.rmtree(data_dir)
            os.replace(tmp, data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    problem = shapes_data_problem(data_dir)
    if problem is not None:  # pragma: no cover - generate_world itself failed silently
        raise ShapesDataError(f"shapes task data in {data_dir} is still not usable after generating it: {problem}")
    return data_dir
