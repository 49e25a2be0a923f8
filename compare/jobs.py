"""Where each stage stands: done, queued, running, failed or not started, read from what lives beside the
experiment's outputs (on shared storage under a cluster), so any later `python -m compare` — on the login node,
on another machine, after a crash — sees the same state.

Three files say it, each written atomically by the one who knows:
- the stage's marker (compare/stages.py): the stage is done with these inputs;
- `.compare/jobs/<stage>.json`, written by whoever submitted the stage: the executor, its job id, its log;
- `.compare/jobs/<stage>.state.json`, written by the job itself: waiting for its inputs, running, done or failed.
The scheduler itself (Slurm's sacct; a local job's process) says whether a job that has not finished still lives.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from compare.experiment import Experiment, Stage
from compare.stages import is_done, marker_record
from midtune.files import write_json

QUEUED_STATES = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass
class StageState:
    name: str
    state: str  # done | queued | running | failed | not started | out of date
    job: dict | None = None  # the submitter's record
    detail: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def jobs_dir(exp: Experiment) -> Path:
    return exp.output_dir / ".compare" / "jobs"


def _slug(stage: Stage) -> str:
    return stage.name.replace("/", "--")


def job_file(exp: Experiment, stage: Stage) -> Path:
    return jobs_dir(exp) / f"{_slug(stage)}.json"


def state_file(exp: Experiment, stage: Stage) -> Path:
    return jobs_dir(exp) / f"{_slug(stage)}.state.json"


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def params_key(stage: Stage) -> str:
    """What a job was submitted for: the stage's own parameters (not its inputs' markers, which change as they
    finish)."""
    return json.dumps(stage.params, sort_keys=True)


def write_job(exp: Experiment, stage: Stage, executor: str, job_id: str, log: Path | str, **extra) -> None:
    local = executor in ("local", "submitit-local")
    write_json(job_file(exp, stage), {"executor": executor, "job_id": str(job_id), "log": str(log),
                                      "host": socket.gethostname(), "submitted": time.time(),
                                      "params": params_key(stage),
                                      **({"started_ticks": _start_ticks(int(job_id))} if local else {}), **extra})


def write_state(exp: Experiment, stage: Stage, job_id: str, phase: str, **extra) -> None:
    """The job's own word on where it is: waiting (for its inputs), running, done or failed."""
    write_json(state_file(exp, stage), {"job_id": str(job_id), "phase": phase, "host": socket.gethostname(),
                                        "pid": os.getpid(), "time": time.time(), **extra})


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None: no such process or no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22 of stat: when the process started


def process_alive(pid: int, started_ticks: str | None = None) -> bool:
    """The process still runs: not a zombie (finished, not yet reaped by its parent), and the same process that
    was recorded, not a later one that got its pid."""
    fields = _stat(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (macOS): whether the pid exists at all
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return fields[0] not in ("Z", "X") and (started_ticks is None or fields[19] == started_ticks)


def ask_slurm(job_ids: list[str]) -> None:
    """One sacct call for all these jobs (submitit's watcher caches the answers for scheduler_state)."""
    import submitit

    for job_id in job_ids:
        submitit.SlurmJob.watcher.register_job(str(job_id))
    submitit.SlurmJob.watcher.update()


def scheduler_state(job: dict, asked: bool = False) -> str:
    """queued, running, ended, or unknown (the scheduler cannot be asked from here). asked: sacct was just
    called for this job (ask_slurm)."""
    if job["executor"] in ("local", "submitit-local"):
        if job.get("host") != socket.gethostname():
            return "unknown"
        return "running" if process_alive(int(job["job_id"]), job.get("started_ticks")) else "ended"
    import submitit

    state = submitit.SlurmJob.watcher.get_state(str(job["job_id"]), mode="cache" if asked else "force")
    state = state.split()[0].upper() if state else "UNKNOWN"  # "CANCELLED by 123"
    if state in QUEUED_STATES:
        return "queued"
    if state in RUNNING_STATES:
        return "running"
    return "unknown" if state == "UNKNOWN" else "ended"


def stage_state(exp: Experiment, stage: Stage, asked: bool = False) -> StageState:
    if is_done(stage, exp):
        return StageState(stage.name, "done")
    job = _read(job_file(exp, stage))
    if job is None:
        return StageState(stage.name, "out of date" if marker_record(stage) is not None else "not started")
    own = _read(state_file(exp, stage)) or {}
    own = own if own.get("job_id") == job["job_id"] else {}
    where = f"job {job['job_id']} ({job['executor']})"
    if own.get("phase") == "failed":
        return StageState(stage.name, "failed", job, f"{where}: {own.get('reason') or 'failed'}")
    alive = scheduler_state(job, asked)
    if alive == "unknown":  # no word from the scheduler (just submitted, another host): not to be duplicated
        phase = "running" if own.get("phase") == "running" else "queued"
        return StageState(stage.name, phase, job, f"{where}, state unknown")
    if alive in ("queued", "running"):
        phase = "running" if alive == "running" and own.get("phase") != "waiting" else "queued"
        waiting = " (waiting for its inputs)" if own.get("phase") == "waiting" else ""
        return StageState(stage.name, phase, job, where + waiting)
    if own.get("phase") == "done":  # finished, but an input was redone since
        return StageState(stage.name, "out of date" if marker_record(stage) else "not started")
    return StageState(stage.name, "failed", job, f"{where} stopped without finishing (killed, out of time or memory)")


def stage_states(exp: Experiment, stages: list[Stage]) -> dict[str, StageState]:
    """Every stage's state, with one sacct call for all Slurm jobs among them."""
    slurm = [j["job_id"] for j in (_read(job_file(exp, s)) for s in stages) if j and j["executor"] == "slurm"]
    if slurm:
        ask_slurm(slurm)
    return {s.name: stage_state(exp, s, asked=bool(slurm)) for s in stages}


def status_lines(exp: Experiment) -> list[str]:
    """One line a stage: its state, job and log; then a count of each state."""
    lines, counts = [], {}
    width = max(len(s.name) for s in exp.stages)
    for st in stage_states(exp, exp.stages).values():
        counts[st.state] = counts.get(st.state, 0) + 1
        log = f"  log: {st.job['log']}" if st.job and st.state in ("failed", "running") else ""
        detail = f"  {st.detail}" if st.detail else ""
        lines.append(f"  {st.state:<12} {st.name:<{width}}{detail}{log}")
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    return [f"experiment {exp.name} ({exp.path}) → {exp.output_dir}: {summary}", *lines]
