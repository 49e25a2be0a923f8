"""python -m compare EXPERIMENT.yaml: train a full run and layer blocks from the same start, evaluate, profile and
report them — each stage the command a user would type, run in its own process.

A stage is reused when an earlier invocation finished it with the same inputs (its command, the contents of the
files it names, and the stages it reads), so an interrupted experiment continues where it stopped; a training
cut short resumes from its last checkpoint. `--print-commands` writes every stage's command in order for a
scheduler (SLURM, a job array, ...); afterwards `python -m compare EXPERIMENT.yaml` picks up what those jobs
finished and writes the report. Schema and examples: docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compare.experiment import Experiment, ExperimentError, Stage, executable, read_experiment
from midtune.files import write_text


class StageFailed(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="experiment YAML file (see configs/experiments/)")
    ap.add_argument("--force", action="store_true", help="redo every (selected) stage")
    ap.add_argument("--only", nargs="+", metavar="STAGE",
                    help="run only these stages (a run's name also selects its eval) and what they need")
    ap.add_argument("--print-commands", action="store_true",
                    help="write each stage's command in order (for a scheduler) and run nothing")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the experiment file, e.g. --set eval.limit=20 (repeatable)")
    return ap.parse_args(argv)


def record(stage: Stage, exp: Experiment) -> str:
    """What the stage's result depends on: its own parameters and the markers of the stages it reads. A marker
    holds its stage's record and when it finished, so a stage redone (even with the same inputs, --force) makes
    every stage that reads it out of date."""
    by_name = {s.name: s for s in exp.stages}
    upstream = {a: by_name[a].marker.read_text() if by_name[a].marker.exists() else None for a in stage.after}
    return json.dumps({**stage.params, "after": upstream}, sort_keys=True)


def marker_record(stage: Stage) -> str | None:
    """The record a stage's marker holds (None: no marker, or one from another version of compare)."""
    try:
        return json.loads(stage.marker.read_text())["record"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def finish(stage: Stage, rec: str) -> None:
    write_text(stage.marker, json.dumps({"record": rec, "finished": time.time()}))


def started_path(stage: Stage) -> Path:
    return stage.out / (stage.marker_name + ".started")


def is_done(stage: Stage, exp: Experiment) -> bool:
    return marker_record(stage) == record(stage, exp)


def run_stage(stage: Stage, exp: Experiment, force: bool) -> str:
    """Run one stage unless it is done; returns what happened: reused, picked up, resumed or ran."""
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
    if stage.marker.exists():
        stage.marker.unlink()
    if not resume and stage.clear and stage.out.exists():
        shutil.rmtree(stage.out)
    if not stage.clear:  # what a kept directory holds from an earlier run must not pass for this run's result
        for f in stage.done:
            (stage.out / f).unlink(missing_ok=True)
    stage.out.mkdir(parents=True, exist_ok=True)
    write_text(started, rec)
    command = executable(stage.command) + (["resume_from=latest"] if resume else [])
    print(f"\n[{stage.name}] {'resuming' if resume else 'building'} {stage.out} ...", flush=True)
    print("$ " + shlex.join(["python", *command[1:]] if command[0] == sys.executable else command), flush=True)
    start = time.perf_counter()
    code = run_command(command)
    if code != 0:
        raise StageFailed(f"stage {stage.name!r} failed (exit {code}); its command is above. Run the same compare "
                          f"command again to continue: finished stages are reused.")
    finish(stage, rec)  # written last: a stage cut short is redone (or resumed)
    print(f"[{stage.name}] done in {time.perf_counter() - start:.1f}s", flush=True)
    return "resumed" if resume else "ran"


def run_command(command: list[str]) -> int:
    """Run a stage's command; on Ctrl-C (which the command receives too) wait for it to stop on its own, so that a
    training saves its checkpoint instead of being killed mid-step."""
    proc = subprocess.Popen(command)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print(f"\ncompare: interrupted; waiting for the stage to stop (pid {proc.pid}) ...", file=sys.stderr,
              flush=True)
        proc.wait()
        raise


def select(exp: Experiment, only: list[str] | None) -> list[Stage]:
    """The stages named (a training run brings its eval) and every stage they read, in experiment order."""
    if not only:
        return list(exp.stages)
    return [s for s in exp.stages if s.name in needed(exp, only)]


def named(exp: Experiment, only: list[str] | None) -> set[str]:
    """The stages --only names (a training run brings its eval); all of them without --only."""
    if not only:
        return {s.name for s in exp.stages}
    by_name = {s.name: s for s in exp.stages}
    wanted: set[str] = set()
    for name in only:
        # a run's name selects the training of each of its seeds
        seeds = list((exp.trainings.get(name) or {}).get("seeds", {}).values())
        if name not in by_name and not seeds:
            import difflib

            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (stages: {', '.join(by_name)})"
            raise ExperimentError(f"--only: no stage {name!r}{hint}")
        for stage in {name, *seeds} & set(by_name):
            wanted.add(stage)
            if f"eval/{stage}" in by_name:
                wanted.add(f"eval/{stage}")
    return wanted


def needed(exp: Experiment, only: list[str]) -> set[str]:
    """The named stages and every stage they read."""
    by_name = {s.name: s for s in exp.stages}
    wanted = named(exp, only)
    todo = list(wanted)
    while todo:
        for a in by_name[todo.pop()].after:
            if a not in wanted:
                wanted.add(a)
                todo.append(a)
    return wanted


def check_settings(exp: Experiment, stages: list[Stage]) -> list[str]:
    """Every training that will run checks its train config and overrides first (`python -m train.config`: keys
    and values as train reads them; no model, data or torch loaded), so a typo in the last run fails before the
    first one starts."""
    errors = []
    for s in stages:
        if s.check is None or is_done(s, exp):
            continue
        done = subprocess.run(executable(s.check), capture_output=True, text=True)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].removeprefix("error: ")
            errors.append(f"{exp.path}: {s.name}: {message}")
    return errors


def print_commands(exp: Experiment, stages: list[Stage]) -> None:
    print(f"# {exp.name}: {len(stages)} stages, in order; each waits for the ones it reads (after: ...)")
    for s in stages:
        state = "done" if is_done(s, exp) else "to run"
        after = f"; after: {', '.join(s.after)}" if s.after else ""
        print(f"# [{s.name}] {state}{after}")
        print(shlex.join(executable(s.command)))
    print("# then, to pick up the results and write the report:")
    print(shlex.join([sys.executable, "-m", "compare", str(exp.path)]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        exp = read_experiment(args.experiment, args.set)
        stages = select(exp, args.only)
        forced = named(exp, args.only) if args.force else set()  # --force redoes what is named, not what it reads
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = check_settings(exp, stages)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 2
    if args.print_commands:
        print_commands(exp, stages)
        return 0
    started = time.perf_counter()
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"experiment {exp.name} ({exp.path}) → {exp.output_dir}: {len(stages)} stages", flush=True)
    try:
        for s in stages:
            run_stage(s, exp, s.name in forced)
    except StageFailed as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    missing = [s.name for s in exp.stages if not is_done(s, exp)]
    if missing:
        print(f"\nno report yet: stages not done: {', '.join(missing)}")
        return 0
    from compare.report import write_report

    report = write_report(exp, total_time_s=time.perf_counter() - started)
    print(f"\nreport: {report}")
    print((exp.output_dir / "summary.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
