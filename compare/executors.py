"""How the stages run: here, one after another or side by side (`local`, `--jobs N`), or as scheduler jobs through
submitit (`slurm`; `submitit-local` is submitit's local executor: the same submission code on this machine).

Whatever runs a stage calls compare.stages.run_stage, so reuse, pick-up and resumption are the same everywhere,
and records where the stage stands (compare.jobs) for `--status` and for the next `python -m compare`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from compare import cluster, jobs
from compare.devices import cpu_count, visible_gpus
from compare.experiment import Experiment, Stage, read_experiment
from compare.stages import StageFailed, executable, is_done, record, run_stage, started_path, with_launch

POLL_S = 2.0  # how often a job that waits for its inputs looks at their markers


def logs_dir(exp: Experiment) -> Path:
    return exp.output_dir / ".compare" / "logs"


def gpus_needed(exp: Experiment, stage: Stage, available: int) -> int:
    """The GPUs a stage takes: its kind's `slurm:` setting (a training: as many as its launch starts processes),
    at most what the machine has."""
    return min(available, exp.resources[cluster.KIND_OF[stage.kind]]["gpus_per_node"])


def busy_elsewhere(exp: Experiment, stages: list[Stage]) -> list[str]:
    """Stages a job (another compare, a Slurm job) is running or has queued: never to be run twice."""
    return [f"{st.name} ({st.detail})" for st in jobs.stage_states(exp, stages).values() if st.active]


# ---------------------------------------------------------------------------------------------------------
# local: this machine, up to N stages at once
# ---------------------------------------------------------------------------------------------------------


def run_local(exp: Experiment, stages: list[Stage], forced: set[str], parallel: int | None) -> list[str]:
    """Run the stages here, up to `parallel` at once (default: one per visible GPU, else one). A stage starts once
    every stage it reads is done; each is pinned to its own GPUs; cost probes run alone, since they time steps.
    Returns what failed (after a failure nothing new starts; what runs finishes)."""
    gpus = visible_gpus()
    return _LocalRun(exp, forced, gpus, parallel or max(1, len(gpus))).run(stages)


class _LocalRun:
    def __init__(self, exp: Experiment, forced: set[str], gpus: list[str], parallel: int):
        self.exp, self.forced, self.gpus, self.parallel = exp, forced, gpus, parallel
        self.free = list(gpus)
        self.running: dict = {}  # future → (stage, its devices)
        self.failed: list[str] = []

    def run(self, stages: list[Stage]) -> list[str]:
        pending = list(stages)
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            while pending or self.running:
                if not self.failed:
                    self.start_what_can(pending, pool)
                if not self.running:
                    break  # what is left reads a stage that failed
                finished, _ = wait(self.running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stage, devices = self.running.pop(future)
                    self.free += devices
                    if future.exception() is not None:
                        self.failed.append(f"{stage.name}: {future.exception()}")
        return self.failed + [f"{s.name}: not run, it reads a stage that failed" for s in pending]

    def start_what_can(self, pending: list[Stage], pool: ThreadPoolExecutor) -> None:
        ready = [s for s in pending if all(is_done(self.exp.stage(a), self.exp) for a in s.after)]
        sharing = min(self.parallel, len(self.running) + len(ready))  # the stages that will run side by side now
        for stage in ready:
            if len(self.running) >= self.parallel or any(s.kind == "cost" for s, _ in self.running.values()):
                return
            need = gpus_needed(self.exp, stage, len(self.gpus))
            if (stage.kind == "cost" and self.running) or need > len(self.free):
                return  # wait for room rather than let later stages overtake it
            devices, self.free = self.free[:need], self.free[need:]
            env = self.environment(stage, devices, sharing)
            future = pool.submit(_run_here, self.exp, stage, stage.name in self.forced, env, self.parallel > 1)
            self.running[future] = (stage, devices)
            pending.remove(stage)

    def environment(self, stage: Stage, devices: list[str], sharing: int) -> dict | None:
        """The stage's GPUs; on a machine without any, its share of the CPU cores: torch in each process would
        otherwise start a thread per core, and two trainings on 2 cores took 2.2× as long side by side as one
        after the other (the demo's full and middle, 375 s against 172 s). A stage alone keeps every core."""
        if self.gpus:
            return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(devices)}
        if self.parallel == 1 or stage.kind == "cost" or sharing <= 1:
            return None
        threads = str(max(1, cpu_count() // sharing))
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _run_here(exp: Experiment, stage: Stage, force: bool, env: dict | None, to_log: bool) -> str:
    """One stage in this process's care: its job record (the command's pid) for --status, its devices, its log."""
    log = logs_dir(exp) / f"{stage.name.replace('/', '--')}.log" if to_log else None
    shown = log or "this terminal"

    def started(proc: subprocess.Popen, command: list[str]) -> None:
        jobs.write_job(exp, stage, "local", str(proc.pid), shown)
        jobs.write_state(exp, stage, str(proc.pid), "running", command=command)

    try:
        result = run_stage(stage, exp, force, env=env, log=log, on_start=started)
    except StageFailed as e:
        record_ = jobs._read(jobs.job_file(exp, stage))
        if record_:
            jobs.write_state(exp, stage, record_["job_id"], "failed", reason=f"exit {e.code}")
        if log is not None:
            print(f"[{stage.name}] failed; the end of {log}:\n" + _tail(log), file=sys.stderr, flush=True)
        raise
    record_ = jobs._read(jobs.job_file(exp, stage))
    if record_:
        jobs.write_state(exp, stage, record_["job_id"], "done")
    return result


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


# ---------------------------------------------------------------------------------------------------------
# slurm / submitit-local: every stage a job, submitted through submitit
# ---------------------------------------------------------------------------------------------------------


def make_executor(exp: Experiment, kind: str):
    import submitit

    folder = exp.output_dir / ".compare" / "submitit"
    if kind == "slurm":
        return submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    return submitit.LocalExecutor(folder=folder, max_num_timeout=3)


def job_name(exp: Experiment, stage: Stage) -> str:
    """Named by experiment, run and seed (the stage's name holds the run and seed: middle-seed1, eval/middle)."""
    return f"{exp.name}/{stage.name}"


def submit(exp: Experiment, stages: list[Stage], forced: set[str], kind: str) -> dict[str, str]:
    """Submit every stage that is not done (or reads one submitted now), each depending on the jobs of the stages
    it reads; a stage already queued or running keeps its job. Returns stage → job id of what was submitted."""
    executor = make_executor(exp, kind)
    states = jobs.stage_states(exp, stages)
    ids: dict[str, str] = {}  # stages with a live job: submitted now, or earlier and still queued or running
    submitted: dict[str, str] = {}
    for stage in stages:
        st = states[stage.name]
        if st.active:
            if stage.name in forced:
                raise StageFailed(f"--force {stage.name}: it is {st.state} as {st.detail}; cancel that job first")
            ids[stage.name] = st.job["job_id"]
            print(f"[{stage.name}] {st.state}: {st.detail}", flush=True)
            continue
        if st.state == "done" and stage.name not in forced and not any(a in submitted for a in stage.after):
            continue
        deps = [ids[a] for a in stage.after if a in ids]
        settings = exp.resources[cluster.KIND_OF[stage.kind]]
        if kind == "slurm":
            executor.update_parameters(**cluster.slurm_parameters(settings, job_name(exp, stage), deps))
        else:
            executor.update_parameters(**cluster.local_parameters(settings))
        jobs.state_file(exp, stage).unlink(missing_ok=True)  # an earlier job's word must not pass for this one's
        job = executor.submit(StageJob(), str(exp.path), exp.settings, stage.name, stage.name in forced,
                              os.getcwd(), exp.fast_dtype)
        jobs.write_job(exp, stage, kind, job.job_id, cluster.log_path(executor.folder, job.job_id),
                       folder=str(executor.folder), after=deps)
        ids[stage.name] = submitted[stage.name] = job.job_id
        after = f" after {', '.join(deps)}" if deps else ""
        print(f"[{stage.name}] submitted as job {job.job_id}{after}", flush=True)
    return submitted


class StageJob:
    """What a submitted job runs: read the experiment as the submitter did, wait until the stage's inputs are
    done, run the stage. On Slurm's warning before the time limit or a preemption (submitit calls `checkpoint`),
    the training is told to save and stop, and the job is requeued: the next run resumes from that checkpoint."""

    def __init__(self):
        self.child: subprocess.Popen | None = None

    def __call__(self, experiment: str, settings: list[str], name: str, force: bool, cwd: str,
                 fast_dtype: str) -> str:
        import submitit

        os.chdir(cwd)
        os.environ["MIDTUNE_FAST_DTYPE"] = fast_dtype  # {fast_dtype} as the submitter read it
        exp = read_experiment(experiment, settings)
        stage = exp.stage(name)
        env = submitit.JobEnvironment()
        job_id = str(env.job_id)
        launch = self.launch_words(exp, stage, env)
        if env.global_rank != 0:
            return self.follow(exp, stage, job_id, launch)
        jobs.write_state(exp, stage, job_id, "waiting")
        try:
            wait_for_inputs(exp, stage)

            def started(proc: subprocess.Popen, command: list[str]) -> None:
                self.child = proc
                jobs.write_state(exp, stage, job_id, "running", command=command)

            result = run_stage(stage, exp, force, launch=launch, on_start=started)
        except StageFailed as e:
            jobs.write_state(exp, stage, job_id, "failed", reason=str(e).split(";")[0])
            raise
        jobs.write_state(exp, stage, job_id, "done")
        return result

    @staticmethod
    def launch_words(exp: Experiment, stage: Stage, env) -> list[str]:
        """A training launched with accelerate gets the job's nodes × GPUs (compare.cluster.node_launch)."""
        if stage.kind != "train" or "accelerate.commands.launch" not in stage.command:
            return []
        hosts = list(env.hostnames) or [socket.gethostname()]
        gpus = exp.resources["train"]["gpus_per_node"]
        return cluster.node_launch(env.num_nodes, env.node, hosts[0], gpus)

    def follow(self, exp: Experiment, stage: Stage, job_id: str, launch: list[str]) -> str:
        """Another node of a multi-node training: start this node's launcher once the first node has prepared
        the stage, with the same resume decision."""
        rec = record(stage, exp)
        while True:
            state = jobs._read(jobs.state_file(exp, stage)) or {}
            started = started_path(stage)
            if (state.get("job_id") == job_id and state.get("phase") == "running" and started.exists()
                    and started.read_text() == rec):
                break
            if state.get("job_id") == job_id and state.get("phase") == "failed":
                raise StageFailed(f"stage {stage.name!r}: the first node failed")
            time.sleep(POLL_S)
        resume = ["resume_from=latest"] if state.get("command", [""])[-1] == "resume_from=latest" else []
        code = subprocess.call(with_launch(executable(stage.command), launch) + resume)
        if code != 0:
            raise StageFailed(f"stage {stage.name!r} failed on node {launch[launch.index('--machine_rank') + 1]}")
        return "followed"

    def checkpoint(self, experiment, settings, name, force, cwd, fast_dtype):
        """Called by submitit before a timeout or on preemption: the training saves a checkpoint and stops
        (SIGTERM, as on Ctrl-C), and the same stage is requeued without --force so that it resumes."""
        import submitit

        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(timeout=80)  # submitit warns 90 s before the limit
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(StageJob(), experiment, settings, name, False, cwd, fast_dtype)


def wait_for_inputs(exp: Experiment, stage: Stage) -> None:
    """Slurm starts a job only after its dependencies succeeded; submitit's local executor starts it at once, so
    the job itself waits. Fails when an input is neither done nor queued or running (it failed, or nobody runs
    it), naming it."""
    inputs = [exp.stage(a) for a in stage.after]
    while True:
        states = jobs.stage_states(exp, inputs)
        if all(st.state == "done" for st in states.values()):
            return
        dead = [f"{st.name} ({st.state}{': ' + st.detail if st.detail else ''})" for st in states.values()
                if st.state != "done" and not st.active]
        if dead:
            raise StageFailed(f"stage {stage.name!r}: its inputs will not be done: {'; '.join(dead)}")
        time.sleep(POLL_S)
