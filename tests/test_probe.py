"""The interleaved cost probe (train/probe.py): ABBA order, the same batches as `train`, nothing written under the
configs' output_dir, and the refusals that come before any model is built."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from train.config import load_config
from train.probe import alternating_order, main
from train.recipe import train

# Each probe run builds Accelerators in this process; accelerate keeps process-wide singletons (see conftest).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train_args(world: Path, model: Path, out: Path, **extra) -> list[str]:
    base = dict(model=model, data=world / "train.json", image_folder=world / "images", output_dir=out,
                batch_size=2, report_to="[]", seed=0, **{"optim.lr": 1e-3})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_arg(world: Path, model: Path, out: Path, **extra) -> str:
    """One --run ARGS string, as a user would type it."""
    return shlex.join(train_args(world, model, out, **extra))


def probe(out: Path, runs: dict[str, str], warmup: int = 1, steps: int = 3) -> int:
    argv = ["--out", str(out), "--warmup", str(warmup), "--steps", str(steps)]
    for name, args in runs.items():
        argv += ["--run", name, args]
    return main(argv)


def test_alternating_order_is_abba():
    assert alternating_order(["a", "b"], 3) == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    # more runs: forward, backward, forward: every run's mean position is the same
    order = alternating_order(["a", "b", "c"], 4)
    positions = {n: [i % 3 for i, (name, _) in enumerate(order) if name == n] for n in "abc"}
    assert {sum(p) for p in positions.values()} == {4}


def test_two_configurations_alternate_and_nothing_is_saved(world, tiny_dir, tmp_path, capsys):
    model = tiny_dir("llava")
    runs = {"full": run_arg(world, model, tmp_path / "full", **{"trainable.layers": "all"}),
            "block": run_arg(world, model, tmp_path / "block", **{"trainable.layers": "1-2", "save_steps": 1})}
    assert probe(tmp_path / "probe", runs, warmup=1, steps=3) == 0
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    full, block = result["runs"]["full"], result["runs"]["block"]
    for r in (full, block):
        assert len(r["step_times"]) == 3 and len(r["warmup_times"]) == 1
        assert all(t > 0 for t in r["step_times"] + r["warmup_times"])
    assert result["order"] == [["full", 1], ["block", 1], ["block", 2], ["full", 2],
                               ["full", 3], ["block", 3], ["block", 4], ["full", 4]]
    assert block["trainable"] < full["trainable"]
    assert block["trainable_layers"] == [1, 2] and full["trainable_layers"] == [0, 1, 2, 3]
    assert full["command"] == runs["full"] and block["command"] == runs["block"]
    expected = {"warmup": 1, "steps": 3, "batch_size": 2, "grad_accum": 1, "world_size": 1, "device": "cpu"}
    assert {k: result["settings"][k] for k in expected} == expected
    assert result["machine"]["cores"] and result["date"].endswith("+00:00")
    # no run directory, checkpoint (save_steps was overridden) or log under either config's output_dir
    assert not (tmp_path / "full").exists() and not (tmp_path / "block").exists()
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == ["probe.json"]
    out = capsys.readouterr().out
    assert "ratio vs full" in out and "[8/8] full step 4/4 (timed)" in out


def test_every_configuration_trains_on_the_batches_its_own_train_run_would(world, tiny_dir, tmp_path):
    """Both runs consume the same sample ids step by step, and they are the ids (and, for the block, the losses)
    of a plain `train` run of that config: the probe builds and steps each configuration exactly as train does.
    Six rows, 4 samples a step: the steps cross epochs, each in its own order."""
    model = tiny_dir("llava")
    rows = tmp_path / "six.json"
    rows.write_text(json.dumps(json.loads((world / "train.json").read_text())[:6]))
    common = {"grad_accum": 2, "optim.scheduler": "constant", "data": rows}
    runs = {"full": run_arg(world, model, tmp_path / "full", **{"trainable.layers": "all"}, **common),
            "block": run_arg(world, model, tmp_path / "block", **{"trainable.layers": "1-2"}, **common)}
    assert probe(tmp_path / "probe", runs, warmup=1, steps=2) == 0
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    full, block = result["runs"]["full"], result["runs"]["block"]
    assert len(block["sample_ids"]) == 3 and all(len(ids) == 4 for ids in block["sample_ids"])  # 2 × grad_accum 2
    assert full["sample_ids"] == block["sample_ids"] and result["settings"]["same_batches"]
    ids = [i for step in block["sample_ids"] for i in step]
    assert len(set(ids[:6])) == 6 and sorted(ids[:6]) == sorted(ids[6:]) and ids[:6] != ids[6:]  # two epochs
    assert full["losses"][0] == block["losses"][0]  # the same start model on the same first batch
    assert full["losses"][1:] != block["losses"][1:]  # then different updates

    alone = tmp_path / "alone"
    train(load_config(None, train_args(world, model, alone, max_steps=3, record_samples="true",
                                       **{"trainable.layers": "1-2"}, **common)))
    recorded = [json.loads(line) for line in (alone / "samples-rank0.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in recorded if "step" in r] == block["sample_ids"]
    metrics = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == block["losses"]  # bit for bit: same weights, batches, order of ops


def test_runs_with_different_batches_are_refused_before_anything_is_built(world, tiny_dir, tmp_path, capsys):
    model = tiny_dir("llava")
    runs = {"a": run_arg(world, model, tmp_path / "a", batch_size=2),
            "b": run_arg(world, model, tmp_path / "b", batch_size=4)}
    assert probe(tmp_path / "probe", runs) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "batch_size" in err and "2 vs 4" in err and "'a'" in err and "'b'" in err
    assert not any(tmp_path.iterdir())  # no probe directory, no output_dir


def test_bad_config_and_launches_the_probe_cannot_serve_are_refused(world, tiny_dir, tmp_path, capsys,
                                                                    monkeypatch):
    model = tiny_dir("llava")
    good = run_arg(world, model, tmp_path / "a")
    assert probe(tmp_path / "probe", {"a": good, "b": good + " batch_sise=2"}) == 2
    err = capsys.readouterr().err
    assert "run 'b'" in err and "batch_sise" in err and "'batch_size'" in err  # load_config's message, passed on
    assert probe(tmp_path / "probe", {"a": "--config=missing.yaml", "b": good}) == 2  # ARGS with a leading dash
    assert "run 'a': config file 'missing.yaml' does not exist" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert probe(tmp_path / "probe", {"a": good, "b": good}) == 2
    assert "one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert probe(tmp_path / "probe", {"a": good, "b": good}) == 2
    assert "DeepSpeed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
