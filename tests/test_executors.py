"""compare's executors: stages side by side here (`--jobs`), as jobs through submitit (its local executor runs a
small experiment end to end through the same submission code as Slurm), the Slurm jobs the LLaVA-1.5-7B experiment
would submit (checked with stand-ins for sbatch and sacct), `--status` at each point, and the report as a stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from compare import cluster, executors, jobs
from compare import stages as stage_runner
from compare.__main__ import main as compare_main
from compare.experiment import ExperimentError, read_experiment
from conftest import experiment_file

ROOT = Path(__file__).resolve().parents[1]


STATES = ("not started", "out of date", "done", "queued", "running", "failed")


def _status(path: Path, capsys, *settings: str) -> dict[str, str]:
    """--status's word for each stage."""
    capsys.readouterr()
    assert compare_main([str(path), *settings, "--status"]) == 0
    states = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        text = line.strip()
        state = next(s for s in STATES if text.startswith(s))
        states[text[len(state):].split()[0]] = state
    return states


def test_slurm_settings_are_checked_when_the_file_is_read(tiny_dir, world, tmp_path):
    assert cluster.minutes("4:00:00", "t") == 240 and cluster.minutes("1-12:00:00", "t") == 2160
    assert cluster.minutes(90, "t") == 90 and cluster.minutes("30:30", "t") == 31
    assert cluster.minutes("2-0", "t") == 2880
    for bad in ("soon", 0, True, "0:00:00"):
        with pytest.raises(cluster.ResourceError):
            cluster.minutes(bad, "slurm.train.time")
    model = tiny_dir("llava")
    cases = [({"slurm": {"partiton": "gpu"}}, "unknown key slurm.'partiton'; did you mean 'partition'?"),
             ({"slurm": {"train": {"gpus": 8}}}, "unknown key slurm.train.'gpus'"),
             ({"slurm": {"eval": {"time": "tomorrow"}}}, "slurm.eval.time: 'tomorrow' is not a Slurm time"),
             ({"slurm": {"train": {"gpus_per_node": 8}}}, "launch.with is python: one process"),
             ({"executor": "sge"}, "executor: 'sge' is not one of local, slurm, submitit-local")]
    for change, message in cases:
        with pytest.raises(ExperimentError, match=None) as e:
            read_experiment(experiment_file(tmp_path, model, world, **change))
        assert message in str(e.value)
    exp = read_experiment(experiment_file(tmp_path, model, world, slurm={"partition": "gpu", "eval": {"time": 30}}))
    assert exp.resources["eval"] == {"nodes": 1, "gpus_per_node": 1, "time": 30, "partition": "gpu"}
    assert exp.resources["report"]["gpus_per_node"] == 0 and exp.resources["train"]["time"] == 1440


def test_local_jobs_run_independent_stages_at_once_each_on_its_own_gpu_never_before_their_inputs(
        tiny_dir, world, tmp_path, monkeypatch, capsys):
    """--jobs 2 with two GPUs: the two trainings and the evaluations overlap, each pinned to a GPU of its own; no
    stage starts before the stages it reads have finished; the cost probe runs alone."""
    path = experiment_file(tmp_path, tiny_dir("llava"), world, seeds=[0, 1])
    exp = read_experiment(path)
    by_command = {tuple(s.command[1:]): s.name for s in exp.stages}
    spans: dict[str, tuple[float, float, str]] = {}
    lock = threading.Lock()

    def fake_run(command, env=None, **_):
        name = by_command[tuple(command[1:])]
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            spans[name] = (start, time.monotonic(), env["CUDA_VISIBLE_DEVICES"])
        return 0

    monkeypatch.setattr(stage_runner, "run_command", fake_run)
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1"])
    assert compare_main([str(path), "--jobs", "2"]) == 0
    assert set(spans) == {s.name for s in exp.stages}

    def overlap(a: str, b: str) -> bool:
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    for s in exp.stages:
        for a in s.after:
            assert spans[s.name][0] >= spans[a][1], f"{s.name} started before {a} finished"
    assert overlap("full", "middle") or overlap("full", "full-seed1")
    assert any(overlap(a, b) for a in spans for b in spans if a < b and a.startswith("eval/") and b.startswith("eval/"))
    for a in spans:
        for b in spans:
            if a < b and overlap(a, b):
                assert spans[a][2] != spans[b][2], f"{a} and {b} ran at once on GPU {spans[a][2]}"
                assert "cost/middle" not in (a, b)
    assert spans["report"][2] == "" and spans["eval"][2] == ""  # no GPU for what only reads files
    assert _status(path, capsys) == {s.name: "done" for s in exp.stages}


def test_stages_side_by_side_on_a_cpu_share_its_cores(tiny_dir, world, tmp_path, monkeypatch):
    """Without GPUs each of the stages that run at once gets its share of the cores (torch would start a thread
    per core in each); a stage alone, and a cost probe (it runs alone), keep them all."""
    exp = read_experiment(experiment_file(tmp_path, tiny_dir("llava"), world))
    monkeypatch.setattr(executors, "cpu_count", lambda: 8)
    two = executors._LocalRun(exp, set(), [], 2)
    assert two.environment(exp.stage("full"), [], 2)["OMP_NUM_THREADS"] == "4"
    assert two.environment(exp.stage("full"), [], 1) is None
    assert two.environment(exp.stage("cost/middle"), [], 2) is None
    assert executors._LocalRun(exp, set(), [], 1).environment(exp.stage("full"), [], 2) is None
    assert executors._LocalRun(exp, set(), ["0", "1"], 2).environment(exp.stage("full"), ["1"], 2) == {
        **os.environ, "CUDA_VISIBLE_DEVICES": "1"}


def test_the_report_is_a_stage_and_says_what_it_still_waits_for(tiny_dir, world, tmp_path, monkeypatch, capsys):
    path = experiment_file(tmp_path, tiny_dir("llava"), world)
    exp = read_experiment(path)
    report = exp.stage("report")
    assert report.after == [s.name for s in exp.stages if s.name != "report"]
    assert report.command[:3] == ["python", "-m", "compare.report"]
    assert compare_main([str(path), "--report"]) == 1
    err = capsys.readouterr().err
    assert "no report yet" in err and "full (not started)" in err and "eval/middle (not started)" in err
    from compare.report import main as report_main

    assert report_main([str(path)]) == 1 and "not done: full, middle" in capsys.readouterr().err


def test_a_job_told_to_stop_stops_its_training_and_requeues_itself_to_resume():
    """submitit calls checkpoint() on Slurm's warning before the time limit or a preemption: the stage's command
    gets SIGTERM (the training saves a checkpoint and stops) and the same stage is resubmitted without --force."""
    job = executors.StageJob()
    job.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    delayed = job.checkpoint("exp.yaml", ["eval.limit=2"], "full", True, "/work", "float32")
    assert job.child.returncode == -signal.SIGTERM
    assert isinstance(delayed.function, executors.StageJob) and delayed.function.child is None
    assert delayed.args == ("exp.yaml", ["eval.limit=2"], "full", False, "/work", "float32")


def test_a_multi_node_training_gets_each_nodes_launch_line(tiny_dir, world, tmp_path):
    accelerate = {"with": "accelerate", "config_file": str(ROOT / "configs/accelerate/cpu_2proc.yaml")}
    path = experiment_file(tmp_path, tiny_dir("llava"), world, launch=accelerate,
                           slurm={"train": {"nodes": 2, "gpus_per_node": 8}}, report={"cost_probe": False})
    exp = read_experiment(path)
    full = exp.stage("full")

    class Env:  # what submitit.JobEnvironment says on the second node of the job
        num_nodes, node, global_rank, hostnames = 2, 1, 1, ["gpu-a", "gpu-b"]

    words = executors.StageJob.launch_words(exp, full, Env)
    command = stage_runner.with_launch(full.command, words)
    at = command.index("accelerate.commands.launch")
    assert command[at + 1:at + 11] == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "gpu-a",
                                       "--main_process_port", "29500", "--num_processes", "16"]
    assert command.count("--num_processes") == 1 and command[command.index("-m", at) + 1] == "train"
    assert executors.StageJob.launch_words(exp, exp.stage("eval/full"), Env) == []


# ---------------------------------------------------------------------------------------------------------
# Slurm, without a cluster: stand-ins for sbatch, srun and sacct
# ---------------------------------------------------------------------------------------------------------


def _fake_slurm(bin_dir: Path, monkeypatch) -> Path:
    """sbatch numbers its jobs from 1001 and keeps each script; sacct answers from states.json (job id → state)."""
    bin_dir.mkdir()
    states = bin_dir / "states.json"
    states.write_text("{}")
    (bin_dir / "sbatch").write_text(
        "#!/usr/bin/env python3\nimport json, pathlib, shutil, sys\nd = pathlib.Path(__file__).parent\n"
        "n = 1001 + len(list(d.glob('job-*.sh')))\nshutil.copy(sys.argv[-1], d / f'job-{n}.sh')\n"
        "s = json.loads((d / 'states.json').read_text()); s[str(n)] = 'PENDING'\n"
        "(d / 'states.json').write_text(json.dumps(s))\nprint(f'Submitted batch job {n}')\n")
    (bin_dir / "sacct").write_text(
        "#!/usr/bin/env python3\nimport json, pathlib, sys\nd = pathlib.Path(__file__).parent\n"
        "s = json.loads((d / 'states.json').read_text())\nprint('JobID|State|NodeList')\n"
        "ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == '-j']\n"
        "[print(f'{j}|{s[j]}|gpu-a') for j in ids if j in s]\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "sacct", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return states


def _sbatch_options(script: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in script.splitlines()
                if line.startswith("#SBATCH --"))


def _stand_in_inputs(path: Path, where: Path, monkeypatch) -> None:
    """Run from `where`, holding the experiment's configs and empty stand-ins of the data, image folders and
    pairs it names (relative paths): compare refuses to submit anything while one of those is missing."""
    where.mkdir()
    (where / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(where)
    for stage in read_experiment(path).stages:
        for name in stage.inputs:
            target = where / name
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)


def test_the_llava_experiment_submits_each_stage_as_a_slurm_job_with_the_resources_it_asks(tmp_path, monkeypatch,
                                                                                          capsys):
    """The shipped LLaVA-1.5-7B experiment on Slurm: every stage a job named by experiment, run and seed, with the
    file's partition, nodes, GPUs and time, and the stages it reads as afterok dependencies; --status reads
    sacct; a second compare submits nothing while those jobs are queued or running."""
    states = _fake_slurm(tmp_path / "bin", monkeypatch)
    path = ROOT / "configs/experiments/llava-1.5-7b.yaml"
    settings = ["--set", f"output_dir={tmp_path / 'out'}"]
    _stand_in_inputs(path, tmp_path / "cluster", monkeypatch)
    assert compare_main([str(path), *settings, "--executor", "slurm"]) == 0
    assert "submitted (slurm)" in capsys.readouterr().out
    exp = read_experiment(path, [f"output_dir={tmp_path / 'out'}"])
    file = yaml.safe_load(path.read_text())["slurm"]
    scripts = {}
    for script in sorted((tmp_path / "bin").glob("job-*.sh")):
        options = _sbatch_options(script.read_text())
        scripts[options["job-name"].removeprefix("llava-1.5-7b/")] = (script.stem.removeprefix("job-"), options)
    assert set(scripts) == {s.name for s in exp.stages}
    ids = {name: job_id for name, (job_id, _) in scripts.items()}
    for stage in exp.stages:
        options = scripts[stage.name][1]
        kind = cluster.KIND_OF[stage.kind]
        want = {**cluster.DEFAULTS[kind], **{k: v for k, v in file.items() if k in cluster.KEYS},
                **file.get(kind, {})}
        assert options["partition"] == want["partition"] and options["nodes"] == str(want["nodes"])
        assert options["time"] == str(cluster.minutes(want["time"], kind))
        assert options.get("gpus-per-node") == (str(want["gpus_per_node"]) if want["gpus_per_node"] else None)
        deps = [ids[a] for a in stage.after]
        assert options.get("dependency") == ("afterok:" + ":".join(deps) if deps else None)
        assert options["kill-on-invalid-dep"] == "yes" and options["ntasks-per-node"] == "1"
    assert scripts["full"][1]["gpus-per-node"] == "8" and scripts["eval/full"][1]["gpus-per-node"] == "1"
    assert "gpus-per-node" not in scripts["report"][1]

    s = json.loads(states.read_text())
    s[ids["composed"]] = "RUNNING"
    states.write_text(json.dumps(s))
    status = _status(path, capsys, *settings)
    assert exp.stages[0].name == "composed" and status["composed"] == "running"
    assert {status[s.name] for s in exp.stages[1:]} == {"queued"}
    assert compare_main([str(path), *settings, "--status"]) == 0
    out = capsys.readouterr().out
    assert f"job {ids['composed']} (slurm)" in out and f"job {ids['align']} (slurm)" in out
    assert compare_main([str(path), *settings, "--executor", "slurm"]) == 0
    assert "0 jobs submitted" in capsys.readouterr().out
    assert len(list((tmp_path / "bin").glob("job-*.sh"))) == len(exp.stages)  # nothing submitted twice
    s[ids["composed"]] = "FAILED"
    states.write_text(json.dumps(s))
    assert compare_main([str(path), *settings, "--executor", "slurm", "--only", "composed"]) == 0
    assert "[composed] submitted as job" in capsys.readouterr().out  # a failed job is submitted again


# ---------------------------------------------------------------------------------------------------------
# submitit's local executor: the real engine, end to end
# ---------------------------------------------------------------------------------------------------------


def _settle(exp, timeout: float = 600) -> dict[str, str]:
    """Wait until no stage is queued or running; each stage's state then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = jobs.stage_states(exp, exp.stages)
        if not any(st.active for st in states.values()):
            return {name: st.state for name, st in states.items()}
        time.sleep(1.0)
    raise AssertionError(f"jobs still running after {timeout} s: {states}")


def _kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.kill()


@pytest.mark.slow
def test_submitit_local_runs_an_experiment_end_to_end_and_picks_up_a_killed_job(tiny_dir, world, tmp_path, capsys):
    """Two runs, each stage a job of its own. (One seed: a seed's stages are stages like any other here, and
    test_compare.py's seed tests cover the axis; a second seed doubled this test's time.)"""
    path = experiment_file(tmp_path, tiny_dir("llava"), world, report={"cost_probe": False})
    exp = read_experiment(path)
    names = [s.name for s in exp.stages]
    assert names == ["full", "middle", "eval/base", "eval/full", "eval/middle", "eval", "report"]
    assert set(_status(path, capsys).values()) == {"not started"}
    assert compare_main([str(path), "--executor", "submitit-local"]) == 0
    assert "7 jobs submitted" in capsys.readouterr().out
    assert {"queued", "running"} >= set(_status(path, capsys).values())

    full = exp.stage("full")  # killed (job and command) once its training runs
    deadline = time.monotonic() + 120
    while (jobs._read(jobs.state_file(exp, full)) or {}).get("phase") != "running":
        assert time.monotonic() < deadline, "the full training never started"
        time.sleep(0.2)
    _kill_tree(int(jobs._read(jobs.job_file(exp, full))["job_id"]))
    first = _settle(exp)
    assert first["full"] == "failed" and first["middle"] == "done" and first["eval/middle"] == "done"
    assert first["eval/full"] == first["eval"] == first["report"] == "failed"  # they read what was killed
    assert _status(path, capsys) == first
    assert compare_main([str(path), "--status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.split()[:2] == ["failed", "full"])
    assert "stopped without finishing" in line and "log: " in line and Path(line.split("log: ")[1]).exists()

    assert compare_main([str(path), "--executor", "submitit-local"]) == 0  # picks up only what is missing
    out = capsys.readouterr().out
    resubmitted = sorted(x.split("]")[0][1:] for x in out.splitlines() if "] submitted as job" in x)
    assert resubmitted == ["eval", "eval/full", "full", "report"]
    assert set(_settle(exp).values()) == {"done"}
    assert set(_status(path, capsys).values()) == {"done"}
    assert (exp.output_dir / "report.md").exists()
    for stage in exp.stages:  # nothing started before what it reads had finished
        started = stage_runner.started_path(stage).stat().st_mtime
        for a in stage.after:
            assert started >= json.loads(exp.stage(a).marker.read_text())["finished"] - 0.01, (stage.name, a)
