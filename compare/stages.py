"""Running one stage: is it done, run its command, mark it finished. Every executor goes through `run_stage`,
so reuse, pick-up and resumption are the same whether the stage runs here, beside others (`--jobs`), or in a
Slurm job.

A stage is done when its marker holds the stage's current record: its own parameters and the markers of the
stages it reads. The marker is written last, so a stage cut short is redone, or resumed from its checkpoint.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from compare.experiment import Experiment, Stage, executable
from midtune.files import write_text


class StageFailed(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def record(stage: Stage, exp: Experiment) -> str:
    """What the stage's result depends on: its own parameters and the markers of the stages it reads. A marker
    holds its stage's record and when it finished, so a stage redone (even with the same inputs, --force) makes
    every stage that reads it out of date."""
    by_name = {s.name: s for s in exp.stages}
    upstream = {a: by_name[a].marker.read_text() if by_name[a].marker.exists() else None for a in stage.after}
    return json.dumps({**stage.params, "after": upstream}, sort_keys=True)


def read_marker(stage: Stage) -> dict | None:
    try:
        marker = json.loads(stage.marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def marker_record(stage: Stage) -> str | None:
    """The record a stage's marker holds (None: no marker, or one from another version of compare)."""
    return (read_marker(stage) or {}).get("record")


def finish(stage: Stage, rec: str, seconds: float | None = None) -> None:
    """The marker: the record, when it finished and how long its command ran (None: finished outside compare)."""
    write_text(stage.marker, json.dumps({"record": rec, "finished": time.time(), "seconds": seconds}))


def started_path(stage: Stage) -> Path:
    return stage.out / (stage.marker_name + ".started")


def is_done(stage: Stage, exp: Experiment) -> bool:
    return marker_record(stage) == record(stage, exp)


def not_done_for_report(exp: Experiment) -> list[str]:
    """The stages the report reads (every other one) that are not done yet, by name."""
    return [s.name for s in exp.stages if s.kind != "report" and not is_done(s, exp)]


def run_stage(stage: Stage, exp: Experiment, force: bool, env: dict | None = None, log: Path | None = None,
              launch: list[str] = (), on_start: Callable | None = None) -> str:
    """Run one stage unless it is done; returns what happened: reused, picked up, resumed or ran.

    env: the command's environment (devices it is pinned to); log: a file for its output instead of this
    terminal; launch: words for a multi-node training's launcher (after `accelerate.commands.launch`);
    on_start: called with the command's process and words once it runs (an executor's record of it)."""
    rec = record(stage, exp)
    if not force and marker_record(stage) == rec:
        print(f"[{stage.name}] reusing {stage.out}", flush=True)
        return "reused"
    started = started_path(stage)
    started_same = started.exists() and started.read_text() == rec
    if (not force and not stage.marker.exists() and stage.done and (started_same or not started.exists())
            and all((stage.out / f).exists() for f in stage.done)):
        # Finished by a job outside compare (--print-commands) or cut short between its command and its marker.
        finish(stage, rec)
        print(f"[{stage.name}] picked up the finished output in {stage.out}", flush=True)
        return "picked up"
    resume = (stage.kind == "train" and not force and started_same and any(stage.out.glob("checkpoint-*")))
    prepare_output(stage, resume)
    write_text(started, rec)
    command = with_launch(executable(stage.command), launch) + (["resume_from=latest"] if resume else [])
    shown = shlex.join(["python", *command[1:]] if command[0] == sys.executable else command)
    where = f" (output: {log})" if log else ""
    print(f"\n[{stage.name}] {'resuming' if resume else 'building'} {stage.out}{where} ...", flush=True)
    print("$ " + shown, flush=True)
    start = time.perf_counter()
    code = run_command(command, env=env, log=log, on_start=on_start)
    if code != 0:
        raise StageFailed(f"stage {stage.name!r} failed (exit {code}); its command is above"
                          f"{f' and its output in {log}' if log else ''}. Run the same compare command again to "
                          f"continue: finished stages are reused.", code)
    seconds = time.perf_counter() - start
    finish(stage, rec, seconds)  # written last: a stage cut short is redone (or resumed)
    print(f"[{stage.name}] done in {seconds:.1f}s", flush=True)
    return "resumed" if resume else "ran"


def prepare_output(stage: Stage, resume: bool) -> None:
    """Empty the stage's directory before it runs (kept ones lose only the files that mark a result)."""
    if stage.marker.exists():
        stage.marker.unlink()
    if not resume and stage.clear and stage.out.exists():
        shutil.rmtree(stage.out)
    if not stage.clear:  # what a kept directory holds from an earlier run must not pass for this run's result
        for f in stage.done:
            (stage.out / f).unlink(missing_ok=True)
    stage.out.mkdir(parents=True, exist_ok=True)


def with_launch(command: list[str], launch: list[str]) -> list[str]:
    """A training command with a multi-node launcher's words right after `accelerate.commands.launch` (they
    replace the command's own --num_processes: the job's nodes × GPUs decide it)."""
    if not launch:
        return list(command)
    at = command.index("accelerate.commands.launch") + 1
    rest = list(command[at:])
    if "--num_processes" in rest[:rest.index("-m")]:
        i = rest.index("--num_processes")
        del rest[i:i + 2]
    return [*command[:at], *launch, *rest]


def run_command(command: list[str], env: dict | None = None, log: Path | None = None,
                on_start: Callable | None = None) -> int:
    """Run a stage's command; on Ctrl-C (which the command receives too) wait for it to stop on its own, so that a
    training saves its checkpoint instead of being killed mid-step."""
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("a")
    try:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        if on_start is not None:
            on_start(proc, command)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            print(f"\ncompare: interrupted; waiting for the stage to stop (pid {proc.pid}) ...", file=sys.stderr,
                  flush=True)
            proc.wait()
            raise
    finally:
        if out is not None:
            out.close()
