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

from pathlib import Path

from midtune import shapes
from midtune.shapes import CANONICAL

TASKS_DIR = Path(__file__).resolve().parent  # pass as include_path to lmms-eval's TaskManager
SHAPES_TASK_DIR = TASKS_DIR / "midtune_shapes"
SHAPES_DATA_DIR = SHAPES_TASK_DIR / "data"

# The canonical world: the same one the demo trains on (`configs/experiments/demo.yaml`); its test split is never
# in train.
CANONICAL_WORLD = dict(CANONICAL)  # the demo's world: its test split is never in training
QTYPES = ("color", "shape", "count", "position", "exists")
GENERATION_TASKS = tuple(f"midtune_shapes_{q}" for q in QTYPES)
MC_TASKS = tuple(f"midtune_shapes_mc_{q}" for q in QTYPES)


ShapesDataError = shapes.ShapesDataError


def shapes_data_problem(data_dir: Path = SHAPES_DATA_DIR) -> str | None:
    """Why `data_dir` (default: the tasks' own) does not hold the canonical world's test data (None when it does)."""
    return shapes.canonical_world_problem(Path(data_dir))


def ensure_shapes_data(data_dir: str | Path = SHAPES_DATA_DIR, progress: bool = True) -> Path:
    """The canonical shapes world in the tasks' data directory, generated when missing or stale."""
    return shapes.ensure_canonical_world(data_dir, progress=progress)
