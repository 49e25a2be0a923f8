"""Shared fixtures: a small shapes world and tiny models of every family, built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Tests never touch a hub; fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# What midtune caches between runs (data checks, the canonical world, benchmark models) stays in this session's
# own directory: a test neither reads a cache an earlier session left in ~/.cache nor leaves one there.
os.environ.setdefault("MIDTUNE_CACHE", tempfile.mkdtemp(prefix="midtune-test-cache-"))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test TEST_WORKERS=2` adds `--dist loadgroup`), tests of several gloo ranks share one
    xdist group: ranks that wait in a collective spin on the CPU, so two such tests side by side on 2 cores took 2-4x as
    long each."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("two_ranks"):
            item.add_marker(pytest.mark.xdist_group("two_ranks"))


FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
TINY = dict(layers=4, hidden=64, heads=4, kv_heads=2, vision_layers=2, vision_hidden=32, vision_heads=4)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from midtune.shapes import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, n_train=60, n_val=10, n_test=20, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dir(world, tmp_path_factory):
    """tiny_dir(family) → a saved tiny model directory of that family (built on first use)."""
    from midtune.tiny import build_tiny, world_texts

    built: dict[str, Path] = {}
    texts = world_texts(world)

    def make(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"), texts, **TINY)
        return built[family]

    return make


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and lmms-eval runs in this process each build an Accelerator; accelerate keeps process-wide
    singletons, so reset them around every such test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"trainable": {"layers": "all"}, "batch_size": 2, "max_steps": 2, "seed": 0,
                                    "report_to": [], "optim": {"lr": 1e-3}, "logging_steps": 1}))
    return path


def experiment_file(tmp_path: Path, model: Path, world: Path, **changes) -> Path:
    """A compare experiment on a tiny model: full and middle (layers 1-2), 2 steps each, one shapes task with
    2 questions; `changes` replace top-level keys (None drops one)."""
    doc = {"output_dir": str(tmp_path / "out"), "base": str(model), "config": str(_train_config(tmp_path / "c.yaml")),
           "data": str(world / "train.json"), "image_folder": str(world / "images"),
           "runs": {"full": {}, "middle": {"trainable.layers": "1-2"}},
           "eval": {"tasks": ["midtune_shapes_color"], "limit": 2}}
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep datasets' cache of the task data out of $HOME (and `python -m eval` from setting it process-wide)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets_cache"))


@pytest.fixture(scope="session")
def shapes_data():
    """The shapes tasks' data (eval/tasks/midtune_shapes/data), generated once."""
    from eval.tasks import ensure_shapes_data

    return ensure_shapes_data(progress=False)
