"""Faults: signals, crashes and full disks during training, non-finite losses, eval re-runs, and a security audit.

Resumed runs are compared with uninterrupted ones bit for bit (losses, the data order, the trained tensors), as
tests/test_train.py does for a plain resume.
"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.__main__ import main
from train.config import load_config
from train.recipe import train

ROOT = Path(__file__).resolve().parents[1]

# In-process runs build Accelerators; accelerate keeps process-wide singletons (see conftest).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def overrides(world: Path, model: Path, out: Path, **extra) -> list[str]:
    base = dict(model=model, data=world / "train.json", image_folder=world / "images", output_dir=out,
                batch_size=4, max_steps=4, report_to="[]", seed=0, save_merged="false",
                **{"trainable.layers": "middle:0.5", "optim.lr": 1e-3})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(world, model, out, **extra):
    return train(load_config(None, overrides(world, model, out, **extra)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same losses at every step, the same samples in the same order, the same trained tensors."""
    assert [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")] == \
        [m["loss"] for m in read_jsonl(reference / "metrics.jsonl")]
    assert read_jsonl(run_dir / "samples-rank0.jsonl") == read_jsonl(reference / "samples-rank0.jsonl")
    a, b = load_file(run_dir / "final" / "delta.safetensors"), load_file(reference / "final" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start_train(args: list[str], stderr: Path, **env) -> subprocess.Popen:
    """`python -m train` in the background, its stderr to a file (a pipe nobody reads could fill and block it)."""
    with open(stderr, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def wait_for_first_step(metrics: Path, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc is None or proc.poll() is None, "training ended before its first step"
        assert time.monotonic() < deadline, "training did not reach its first step"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------

# A constant learning rate makes the run independent of max_steps: a run started long and stopped by a signal
# after k steps, resumed to k + 3, must equal a run of k + 3 steps from the start.
CONSTANT_LR = {"optim.scheduler": "constant", "optim.warmup_ratio": 0, "record_samples": "true"}


@pytest.mark.slow
def test_sigterm_saves_after_the_step_and_the_printed_command_resumes_identically(world, tiny_dir, tmp_path):
    out = tmp_path / "stopped"
    proc = start_train(overrides(world, tiny_dir("llava"), out, max_steps=1000, **CONSTANT_LR), tmp_path / "stderr")
    wait_for_first_step(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = re.search(r"^stopped by SIGTERM after step (\d+); checkpoint: (.+)$", err, re.M)
    steps = int(stopped.group(1))
    assert 1 <= steps < 1000 and Path(stopped.group(2)) == out / f"checkpoint-{steps}"
    assert (out / f"checkpoint-{steps}" / "trainer_state.json").is_file() and not (out / "final").exists()
    assert len(read_jsonl(out / "metrics.jsonl")) == steps  # the step under way was finished, then it stopped

    words = shlex.split(err.split("resume with:\n", 1)[1].splitlines()[0])
    assert words[:6] == ["cd", str(ROOT), "&&", "python", "-m", "train"] and words[-1] == "resume_from=latest"
    assert main(words[6:] + [f"max_steps={steps + 3}"]) == 0  # the printed command, in-process, 3 steps more
    run(world, tiny_dir("llava"), tmp_path / "reference", max_steps=steps + 3, **CONSTANT_LR)
    assert_same_run(out, tmp_path / "reference")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR2], ids=["ctrl-c", "slurm-usr2"])
def test_ctrl_c_saves_after_the_step_and_restores_the_handler(world, tiny_dir, tmp_path, capsys, signum):
    """Ctrl-C, and the SIGUSR2 Slurm sends before a job's time limit or a preemption (compare --executor slurm
    requeues the job, which resumes from this checkpoint)."""
    out = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    name = signal.Signals(signum).name

    def press_ctrl_c():
        wait_for_first_step(out / "metrics.jsonl", timeout=120)
        os.kill(os.getpid(), signum)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    assert main(overrides(world, tiny_dir("llava"), out, max_steps=1000, **CONSTANT_LR)) == 128 + signum
    err = capsys.readouterr().err
    steps = int(re.search(rf"stopped by {name} after step (\d+)", err).group(1))
    assert f"{name}: finishing this step, then saving a checkpoint" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{steps}"]
    assert signal.getsignal(signum) is handler_before


# ---------------------------------------------------------------------------------------------------------
# Crashes and full disks during a save
# ---------------------------------------------------------------------------------------------------------

SAVES = {"max_steps": 6, "save_steps": 2, "save_total_limit": 0, "record_samples": "true"}


@pytest.mark.slow
def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_latest_resumes_identically(world, tiny_dir, tmp_path):
    out = tmp_path / "crashed"
    args = overrides(world, tiny_dir("llava"), out, **SAVES)
    proc = start_train(args, tmp_path / "stderr", MIDTUNE_FAULT="checkpoint.write@2:kill")  # SIGKILL in 2nd save
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint-4.tmp", "checkpoint-2", "config.yaml",
                                                    "metrics.jsonl", "samples-rank0.jsonl"]
    assert (out / ".checkpoint-4.tmp" / "trainable.safetensors").is_file()  # really cut short half-way
    assert not (out / ".checkpoint-4.tmp" / "trainer_state.json").exists()

    assert main(args + ["resume_from=latest"]) == 0  # picks checkpoint-2, the last complete one
    assert not (out / ".checkpoint-4.tmp").exists()
    assert json.loads((out / "run.json").read_text())["resumed_from"] == str(out / "checkpoint-2")
    run(world, tiny_dir("llava"), tmp_path / "reference", **SAVES)
    assert_same_run(out, tmp_path / "reference")


def test_a_full_disk_during_saves_keeps_the_previous_checkpoint(world, tiny_dir, tmp_path, monkeypatch, capsys):
    from midtune import files as files_module

    real_save = torch.save
    optimizer_saves = []

    def save_on_a_filling_disk(obj, f, *args, **kwargs):
        """torch.save whose second optimizer.pt runs out of space half-way, as a full disk does."""
        if Path(f).name == "optimizer.pt":
            optimizer_saves.append(f)
            if len(optimizer_saves) == 2:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    args = overrides(world, tiny_dir("llava"), out, **SAVES)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_on_a_filling_disk)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error: could not write checkpoint-4 in {out}: No space left on device" in err
    assert f"{out / 'checkpoint-2'} is intact" in err and "resume_from=latest" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.yaml", "metrics.jsonl",
                                                    "samples-rank0.jsonl"]  # no half-written directory

    # the disk fills again while final/ is written (the fault hook raises inside atomic_dir, before its rename)
    monkeypatch.setenv("MIDTUNE_FAULT", "atomic_dir:final:enospc")
    monkeypatch.setattr(files_module, "_fault_visits", files_module.collections.Counter())
    assert main(args + ["resume_from=latest"]) == 1
    assert f"error: could not write {out / 'final'}: No space left on device" in capsys.readouterr().err
    assert not (out / "final").exists() and not list(out.glob(".*"))
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()

    monkeypatch.delenv("MIDTUNE_FAULT")
    assert main(args + ["resume_from=latest", "save_merged=true"]) == 0  # space again: final/ from checkpoint-6
    run(world, tiny_dir("llava"), tmp_path / "reference", **SAVES)
    assert_same_run(out, tmp_path / "reference")
    # weights are safetensors; the only torch files are the checkpoints' optimizer and scheduler states
    assert (out / "final" / "model.safetensors").is_file()
    assert {f.name for f in out.rglob("*") if f.suffix in (".pt", ".bin", ".pkl", ".pth")} == {"optimizer.pt",
                                                                                             "scheduler.pt"}


# ---------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(world, tiny_dir, tmp_path_factory):
    """A tiny model whose embedding of '~' (a character the world never uses) is NaN, and data with one sample
    holding it: that sample's batch has a NaN loss, every other batch trains normally."""
    import transformers

    root = tmp_path_factory.mktemp("poisoned")
    model_dir = root / "model"
    shutil.copytree(tiny_dir("llava"), model_dir)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir)
    token = transformers.AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("~")
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(model_dir)
    rows = json.loads((world / "train.json").read_text())[:15]
    rows.append({"id": "poison", "image": rows[0]["image"], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the circle? ~"}, {"from": "gpt", "value": "red"}]})
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    return model_dir, data


# 16 rows: 4 batches per epoch, shuffled at random: the data order the step numbers below were read from
# (group_by_length orders batches otherwise; its own resume is exact too, tests/test_train.py)
NAN_RUN = {"save_steps": 1, "save_total_limit": 0, "record_samples": "true", "group_by_length": "false"}


def test_a_nan_loss_stops_naming_the_samples_and_keeps_the_last_good_checkpoint(world, poisoned, tmp_path, capsys):
    model, data = poisoned
    out = tmp_path / "run"
    assert main(overrides(world, model, out, data=data, max_steps=8, **NAN_RUN)) == 3
    err = capsys.readouterr().err
    found = re.search(r"error: non-finite loss in step (\d+), on the batch of samples (.*): stopped", err)
    step = int(found.group(1))
    assert step > 1, "seed 0 puts the poisoned sample in the first batch; this test needs a checkpoint before it"
    assert f"'poison' ({data} row 15)" in found.group(2)
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in err
    assert "resume_from=latest on_nan_loss=skip" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, step)]
    assert not (out / "final").exists()
    assert len(read_jsonl(out / "metrics.jsonl")) == step - 1


def test_skipped_nan_steps_are_dropped_counted_and_resume_exactly(world, poisoned, tmp_path, capsys):
    model, data = poisoned
    out = tmp_path / "run"
    skipping = {"data": data, "max_steps": 6, "on_nan_loss": "skip", "max_nan_skips": 2, **NAN_RUN}
    result = train(load_config(None, overrides(world, model, out, **skipping)))
    skipped = result.summary["skipped_steps"]  # one per epoch: 2 epochs of 3 good batches and the poisoned one
    assert len(skipped) == 2 and all("poison" in s["samples"] for s in skipped)
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(t).all() for t in load_file(out / "final" / "delta.safetensors").values())
    used = [s for line in read_jsonl(out / "samples-rank0.jsonl")[:-1] for s in line["samples"]]
    assert "poison" not in used and len(used) == 6 * 4  # the dropped batches are in no step

    # resumed between the two dropped steps, the run continues from the right place in the data
    after = skipped[0]["after_step"] + 1
    assert after <= skipped[1]["after_step"]  # the second one comes after the resume
    (tmp_path / "resumed").mkdir()
    shutil.copytree(out / f"checkpoint-{after}", tmp_path / "resumed" / f"checkpoint-{after}")
    train(load_config(None, overrides(world, model, tmp_path / "resumed", resume_from="latest", **skipping)))
    assert [m["loss"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == \
        [m["loss"] for m in read_jsonl(out / "metrics.jsonl")][after:]
    a = load_file(out / "final" / "delta.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "delta.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # past max_nan_skips it stops
    assert main(overrides(world, model, tmp_path / "strict", **{**skipping, "max_nan_skips": 1})) == 3
    err = capsys.readouterr().err
    assert "non-finite loss in step 4" in err and "already dropped 1 step(s), max_nan_skips=1" in err


# ---------------------------------------------------------------------------------------------------------
# Eval: a failing task keeps what finished; re-runs evaluate only what is missing
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def shapes_data(tmp_path_factory, monkeypatch):
    from eval.tasks import ensure_shapes_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets_cache"))
    return ensure_shapes_data(progress=False)


def test_eval_keeps_finished_tasks_and_reruns_only_the_missing_ones(tiny_dir, tmp_path, shapes_data, monkeypatch,
                                                                     capsys):
    from lmms_eval import evaluator

    from eval.__main__ import main as eval_main

    evaluated: list[str] = []
    real_evaluate = evaluator.simple_evaluate

    def evaluate(*args, tasks, **kwargs):
        evaluated.extend(tasks)
        if os.environ.get("FAIL_TASK") in tasks:
            raise RuntimeError("the evaluation server went away")
        return real_evaluate(*args, tasks=tasks, **kwargs)

    monkeypatch.setattr(evaluator, "simple_evaluate", evaluate)
    out = tmp_path / "out"
    tasks = ["midtune_shapes_count", "midtune_shapes_color"]
    common = ["--model", f"a={tiny_dir('llava')}", "--tasks", ",".join(tasks), "--limit", "2", "--device", "cpu",
              "--output_dir", str(out)]

    monkeypatch.setenv("FAIL_TASK", "midtune_shapes_color")
    assert eval_main(common) == 1
    assert "error: model a: task midtune_shapes_color: evaluation failed" in capsys.readouterr().err
    results = json.loads((out / "a" / "results.json").read_text())
    assert list(results["results"]) == ["midtune_shapes_count"]  # the finished task is kept
    assert (out / "a" / "samples_midtune_shapes_count.jsonl").is_file() and (out / "comparison.md").is_file()

    monkeypatch.delenv("FAIL_TASK")
    evaluated.clear()
    assert eval_main(common) == 0
    assert evaluated == ["midtune_shapes_color"]  # only what was missing
    assert "a: " in (printed := capsys.readouterr().out) and "; reusing midtune_shapes_count (--redo" in printed
    assert set(json.loads((out / "a" / "results.json").read_text())["results"]) == set(tasks)

    evaluated.clear()
    assert eval_main(common) == 0 and evaluated == []
    assert eval_main(common + ["--redo"]) == 0 and evaluated == tasks


# ---------------------------------------------------------------------------------------------------------
# Security audit of midtune's own code
# ---------------------------------------------------------------------------------------------------------

PACKAGES = ("midtune", "train", "eval", "analysis")


def calls(match) -> list[tuple[str, int, ast.Call]]:
    """(file, line, call) of every call in midtune's packages whose function, as written, satisfies `match`."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and match(ast.unparse(node.func)):
                    found.append((str(path.relative_to(ROOT)), node.lineno, node))
    return found


def keyword(node: ast.Call, name: str) -> str | None:
    return next((ast.unparse(k.value) for k in node.keywords if k.arg == name), None)


def test_security_audit():
    # torch files are only ever read with the restricted unpickler (tensors and plain containers)
    assert [(f, n) for f, n, c in calls(lambda fn: fn == "torch.load") if keyword(c, "weights_only") != "True"] == []
    # no pickle, no YAML loader that builds Python objects, no eval/exec of strings
    banned = {"pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec"}
    assert [(f, n) for f, n, _ in calls(lambda fn: fn in banned)] == []
    # trust_remote_code is never switched on by midtune itself, only passed through from the user's setting
    assert [(f, n) for f, n, c in calls(lambda fn: fn.endswith("from_pretrained"))
            if keyword(c, "trust_remote_code") not in (None, "trust_remote_code", "args.trust_remote_code",
                                                        "config.trust_remote_code")] == []
    assert [(f, n) for f, n, c in calls(lambda fn: True) if keyword(c, "trust_remote_code") == "True"] == []
    # the only torch.save calls write a checkpoint's optimizer (also an FSDP2 rank's local shard of it), scheduler
    # and fp16 loss-scaler state (read back with weights_only);
    # every weight file is safetensors (transformers 5 saves nothing else)
    assert sorted(ast.unparse(c.args[0]) for _, _, c in calls(lambda fn: fn == "torch.save")) == \
        ["accelerator.scaler.state_dict()", "local_optimizer_state", "optimizer.state_dict()",
         "scheduler.state_dict()"]
