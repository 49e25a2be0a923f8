"""python -m compare EXPERIMENT.yaml: train a full run and layer blocks from the same start, evaluate, profile and
report them — each stage the command a user would type, run in its own process.

A stage is reused when an earlier invocation finished it with the same inputs (its command, the contents of the
files it names, and the stages it reads), so an interrupted experiment continues where it stopped; a training
cut short resumes from its last checkpoint. Stages run here (`--executor local`, up to `--jobs N` at once) or as
Slurm jobs through submitit (`--executor slurm`), each with the stages it reads as dependencies; `--status` says
where each stands, and running compare again submits only what is missing. The report is a stage too: it runs
once every other stage is done. Schema and examples: docs/compare.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from compare import executors, jobs
from compare.experiment import EXECUTORS, Experiment, ExperimentError, Stage, executable, read_experiment
from compare.stages import StageFailed, is_done, not_done_for_report, run_stage


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
    ap.add_argument("--executor", choices=EXECUTORS,
                    help="local: run the stages here (default, or the file's `executor:`); slurm: submit each as a "
                         "job through submitit, with its inputs as dependencies; submitit-local: the same "
                         "submission on this machine (submitit's local executor)")
    ap.add_argument("--jobs", type=int, metavar="N",
                    help="local: run up to N independent stages at once, each on its own GPUs (default: one per "
                         "visible GPU, else 1)")
    ap.add_argument("--status", action="store_true",
                    help="print where each stage stands (done, queued, running, failed, not started) and run nothing")
    ap.add_argument("--report", action="store_true",
                    help="write the report now (the report stage alone), or say which stages it still waits for")
    args = ap.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be at least 1")
    return args


def select(exp: Experiment, only: list[str] | None) -> list[Stage]:
    """The stages named (a training run brings its eval) and every stage they read, in experiment order."""
    if not only:
        return list(exp.stages)
    return [s for s in exp.stages if s.name in needed(exp, only)]


def with_report(exp: Experiment, stages: list[Stage]) -> list[Stage]:
    """--only runs what it names; the report joins when every other stage is done and stays so: none reads
    (directly or through others) a stage run now."""
    if any(s.kind == "report" for s in stages):
        return stages
    chosen = {s.name for s in stages}
    stale = set(chosen)
    for s in exp.stages:  # in order: a stage's inputs come before it
        if s.kind != "report" and any(a in stale for a in s.after):
            stale.add(s.name)
    others = [s for s in exp.stages if s.kind != "report" and s.name not in chosen]
    if any(s.name in stale or not is_done(s, exp) for s in others):
        return stages
    return [*stages, exp.stage("report")]


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
    first one starts. The checks run at once (each a light process); a stage already done, queued or running
    (checked when it was submitted) is not checked again."""
    todo = [s for s in stages if s.check is not None and not is_done(s, exp)]
    todo = [s for s in todo if not jobs.stage_state(exp, s).active]
    checks = [(s, subprocess.Popen(executable(s.check), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)) for s in todo]
    errors = []
    for s, proc in checks:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            message = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1].removeprefix("error: ")
            errors.append(f"{exp.path}: {s.name}: {message}")
    return errors


def missing_inputs(exp: Experiment, stages: list[Stage]) -> list[str]:
    """The data, image folders and analysis pairs named in the experiment that no stage makes and that are not
    there: found before the first GPU-hour, not after every training and evaluation has run."""
    errors = []
    for s in stages:
        if is_done(s, exp):
            continue
        errors += [f"{exp.path}: {s.name}: {path} does not exist" for path in s.inputs if not Path(path).exists()]
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
        stages = [exp.stage("report")] if args.report else select(exp, args.only)
        forced = named(exp, args.only) if args.force else set()  # --force redoes what is named, not what it reads
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.status:
        print("\n".join(jobs.status_lines(exp)))
        return 0
    if args.report:
        return report_now(exp)
    errors = check_settings(exp, stages)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 2
    if args.print_commands:
        print_commands(exp, stages)
        return 0
    errors = missing_inputs(exp, stages)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 2
    executor = args.executor or exp.executor
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"experiment {exp.name} ({exp.path}) → {exp.output_dir}: {len(stages)} stages ({executor})", flush=True)
    if executor == "local":
        return run_here(exp, with_report(exp, stages), forced, args.jobs)
    if args.jobs is not None:
        print("error: --jobs is for --executor local; a scheduler runs submitted jobs side by side", file=sys.stderr)
        return 2
    try:
        submitted = executors.submit(exp, with_report(exp, stages), forced, executor)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{len(submitted)} jobs submitted ({executor}); the report is the last. Follow them with: "
          f"python -m compare {exp.path} --status", flush=True)
    return 0


def run_here(exp: Experiment, stages: list[Stage], forced: set[str], parallel: int | None) -> int:
    started = time.perf_counter()
    busy = executors.busy_elsewhere(exp, [s for s in stages if not is_done(s, exp)])
    if busy:
        print("error: these stages are queued or running elsewhere; wait for them (--status) or stop them first: "
              + "; ".join(busy), file=sys.stderr)
        return 1
    try:
        failed = executors.run_local(exp, stages, forced, parallel)
    except KeyboardInterrupt:
        print("compare: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"\ncompare: {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        print("compare: " + "\ncompare: ".join(failed), file=sys.stderr)
        return 1
    report = exp.stage("report")
    if not is_done(report, exp):
        print(f"\nno report yet: stages not done: {', '.join(not_done_for_report(exp))}")
        return 0
    print(f"\nreport: {exp.output_dir / 'report.md'}")
    print_summary(exp)
    return 0


def print_summary(exp: Experiment) -> None:
    summary = exp.output_dir / "summary.txt"
    if summary.exists():
        print(summary.read_text())


def report_now(exp: Experiment) -> int:
    """--report: the report stage alone, here; or which stages it still waits for, and where they stand."""
    report = exp.stage("report")
    states = jobs.stage_states(exp, [exp.stage(a) for a in report.after])
    waiting = [f"{st.name} ({st.state}{', ' + st.detail if st.detail else ''})" for st in states.values()
               if st.state != "done"]
    if waiting:
        print("no report yet: it reads stages that are not done:\n  " + "\n  ".join(waiting), file=sys.stderr)
        return 1
    try:
        run_stage(report, exp, force=False)
    except StageFailed as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    print_summary(exp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
