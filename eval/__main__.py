"""midtune eval app: lmms-eval benchmarks for one or more models, side by side.

    python -m eval --model base=runs/demo/align/final --model middle=runs/demo/middle/final \\
                   --tasks midtune_shapes [--limit N] [--output_dir runs/eval]

`--model NAME=PATH` (repeatable; the first model is the reference the differences are taken from). PATH is a
merged/Hugging Face model directory, a hub id, or a midtune delta (`RUN/final/delta.safetensors`, evaluated on
the base named in its metadata; `NAME=DELTA@BASE` names the base). `--tasks` takes midtune's tasks
(`midtune_shapes`, `midtune_shapes_<qtype>`, `midtune_shapes_mc`, ...), any lmms-eval task or group (mme, pope,
gqa, ...) and tasks found under `--include_path` directories, comma-separated.

lmms-eval runs through its Python API, so every error is an error here: a one-line message and a non-zero exit
(2 for bad input found before any model runs, 1 for a failure while evaluating). Each model's results
(lmms-eval's results JSON + the logged samples) are written to `output_dir/<NAME>/` task by task, as soon as each
(model, task) is done, so a failure loses only the task it happened in. A re-run reuses every finished (model, task)
result with the same weights, limit and dtype and evaluates only the rest; `--redo` evaluates everything again.
At the end the models are compared in `comparison.md`, `comparison.csv` and `comparison.png` (each score with
lmms-eval's standard error, each task's headline metric first), and the table is printed.

Data parallel: `--num-processes auto` (the default) starts one process per visible GPU, each evaluating its share
of every task's documents (lmms-eval splits them and gathers the results on rank 0, which alone writes and
prints); `--num-processes N --device cpu` starts N CPU processes (gloo). Under `accelerate launch` or `torchrun`
the launcher's processes are used as they are.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from eval import parallel
from midtune.files import save_figure, write_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
RESULTS_FILE = "results.json"
SAMPLES_GLOB = "samples_*.jsonl"
TASK_RESULTS_DIR = "tasks"  # <NAME>/tasks/<task>.json: one finished (model, task) result and its settings


class EvalError(Exception):
    """A problem the user can fix; printed as one line. `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class ModelSpec:
    name: str
    path: str  # what the user wrote
    source: object  # eval.lmms_plugin.ModelSource


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from midtune.checkpoint import ATTN_IMPLEMENTATIONS

    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a model to evaluate (repeatable): NAME=DIR, NAME=HUB_ID, NAME=DELTA or NAME=DELTA@BASE; "
                         "the first is the reference for the differences")
    ap.add_argument("--tasks", default="midtune_shapes",
                    help="comma-separated lmms-eval tasks/groups (default: midtune_shapes)")
    ap.add_argument("--include_path", "--include-path", action="append", default=[], metavar="DIR",
                    help="a directory of extra lmms-eval task YAMLs (repeatable)")
    ap.add_argument("--limit", type=_limit, default=None,
                    help="documents per task (a fraction if < 1); for quick checks, not for reported numbers")
    ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive, default=1,
                    help="requests per forward pass (default 1, as lmms-eval's llava_hf; more is faster, and can "
                         "change low-precision answers: docs/evaluation.md)")
    ap.add_argument("--num-processes", "--num_processes", dest="num_processes", type=_processes, default="auto",
                    help="data-parallel processes, each with its share of every task's documents: auto (default: "
                         "one per visible GPU, 1 on the CPU) or N (with --device cpu: N CPU processes, gloo); under "
                         "accelerate launch or torchrun, the launcher's")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="auto",
                    help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--attn-implementation", "--attn_implementation", dest="attn_implementation", default="sdpa",
                    choices=ATTN_IMPLEMENTATIONS, help="attention kernel (default sdpa, as in training)")
    ap.add_argument("--min-pixels", "--min_pixels", dest="min_pixels", type=int, default=None,
                    help="Qwen2-VL/2.5-VL: pixel budget per image (default: the model's processor's)")
    ap.add_argument("--max-pixels", "--max_pixels", dest="max_pixels", type=int, default=None)
    ap.add_argument("--output_dir", "--output-dir", dest="output_dir", default="runs/eval")
    ap.add_argument("--redo", action="store_true",
                    help="evaluate every (model, task) again; by default finished results in --output_dir with the "
                         "same weights, limit and dtype are reused and only the missing ones run")
    ap.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true")
    ap.add_argument("--verbosity", default="WARNING", help="lmms-eval log level (default WARNING)")
    ap.add_argument("--check-tasks-only", "--check_tasks_only", dest="check_tasks_only", action="store_true",
                    help="find every task by name and exit: no model loaded, no task data read (what compare runs "
                         "before anything trains)")
    return ap.parse_args(argv)


def _limit(value: str) -> float | int:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {value}")
    return int(number) if number >= 1 and number.is_integer() else number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _processes(value: str) -> str:
    if value != "auto":
        _positive(value)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        n, cpu = (1, False) if args.check_tasks_only else parallel.processes_to_start(args.num_processes, args.device)
        if n > 1:
            return parallel.start_processes(argv, n, cpu)
        run(args)
    except (EvalError, parallel.LaunchError) as e:
        report_error(e)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        parallel.leave()
    return 0


def report_error(e: EvalError | parallel.LaunchError) -> None:
    """One line on stderr. With several processes, bad input (exit 2, found alike by every rank before any model
    ran) is reported by rank 0 alone; a failure while evaluating by each rank it happened in, naming the rank."""
    world = parallel.launched_world_size()
    if world == 1 or parallel.is_main():
        print(f"error: {e}", file=sys.stderr)
    elif e.code != 2:
        print(f"error: (rank {parallel.rank()} of {world}) {e}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Evaluate every model on every task; returns {name: results} (on rank 0; {} on the other ranks of a
    data-parallel run). Raises EvalError."""
    # the models are not read when only the task names are checked: compare checks before any of them exists;
    # a delta's base is hashed (all its weights read) by rank 0 alone
    specs = [] if args.check_tasks_only else parse_models(args.model, verify_bases=parallel.is_main())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks is empty")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise EvalError(f"--include_path {path!r} is not a directory")
    output_dir = Path(args.output_dir)

    if args.check_tasks_only:
        check_task_names(tasks, args.include_path, args.verbosity)
        print(f"tasks found: {', '.join(tasks)}")
        return {}
    if parallel.launched_world_size() > 1:
        from midtune.sources import resolve_device

        try:
            parallel.join_processes(cpu=resolve_device(args.device) == "cpu")
        except ValueError as e:
            raise EvalError(f"--device {args.device}: {e}") from None
    say("loading lmms-eval and indexing tasks ...")
    task_manager, local_only = build_task_manager(tasks, args.include_path, args.verbosity)
    if uses_shapes_tasks(tasks):
        parallel.main_first(make_shapes_data)  # generated once, by rank 0
    if local_only and not os.environ.get("HF_DATASETS_CACHE"):
        # Only local task data: keep datasets' conversion cache beside the results, out of $HOME. Hub benchmarks
        # use the user's cache (that is where their downloads are), so it is left alone then.
        os.environ["HF_DATASETS_CACHE"] = str((output_dir / ".hf_datasets_cache").resolve())
    parallel.main_first(lambda: check_tasks(tasks, task_manager))  # datasets' cache is filled once

    all_results, failure = evaluate_models(specs, tasks, task_manager, args, output_dir)
    if all_results:
        table = write_comparison(all_results, output_dir)
        print()
        print(table)
        print(f"results in {output_dir}/ (per model: <NAME>/{RESULTS_FILE}, samples_<task>.jsonl; "
              f"comparison.md, comparison.csv, comparison.png)")
    if failure is not None:
        raise failure
    return all_results


def evaluate_models(specs: list[ModelSpec], tasks: list[str], task_manager, args,
                    output_dir: Path) -> tuple[dict, EvalError | None]:
    """Each model in turn on the tasks it has no reusable result for, until one fails. Returns {name: its merged
    results} (on rank 0; {} elsewhere), what finished included, and the failure or None."""
    all_results: dict[str, dict] = {}
    failure: EvalError | None = None
    for k, spec in enumerate(specs, 1):
        settings = eval_settings(spec, args)
        model_dir = output_dir / spec.name
        # rank 0 decides what is left to do, so every rank runs the same tasks (their collectives must match)
        done = list(finished_tasks(model_dir, tasks, settings)) if not args.redo and parallel.is_main() else []
        done = parallel.from_main(done)
        todo = [t for t in tasks if t not in done]
        if not todo:
            say(f"[{k}/{len(specs)}] {spec.name}: reusing {model_dir}/ (--redo to re-evaluate)")
        else:
            reused = f"; reusing {', '.join(done)} (--redo to re-evaluate)" if done else ""
            say(f"[{k}/{len(specs)}] {spec.name}: {spec.source.describe()}{reused}")
            try:
                evaluate_model(spec, todo, task_manager, args, settings, model_dir)
            except EvalError as e:
                failure = e
        if parallel.is_main():
            finished = finished_tasks(model_dir, tasks, settings)  # what is on disk now, this run's tasks included
            if finished:
                all_results[spec.name] = write_model_results(model_dir, spec,
                                                             [finished[t] for t in tasks if t in finished])
        if failure is not None:
            break
    return all_results, failure


def eval_settings(spec: ModelSpec, args) -> dict:
    """What a finished (model, task) result was computed with; a result is reused only under the same settings.
    The batch size is one of them (a document's batch mates and padding can change a low-precision answer). The
    process count is not: at batch 1 a document's request is the same whichever rank answers it (a test), and at
    batch N it only changes the batch mates, as reordering would."""
    from eval.lmms_plugin import DEFAULT_MAX_NEW_TOKENS

    return {"source": spec.source.to_dict(), "weights": fingerprint(spec.source), "limit": args.limit,
            "dtype": args.dtype, "batch_size": args.batch_size,
            # the budget of a task that sets none; results from before it was llava_hf's 1024 are not reused
            "default_max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            **({"attn_implementation": args.attn_implementation} if args.attn_implementation != "sdpa" else {}),
            **{k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}}


def make_shapes_data() -> None:
    from eval.tasks import ShapesDataError, ensure_shapes_data

    try:
        ensure_shapes_data(progress=parallel.is_main())
    except (OSError, ShapesDataError) as e:
        raise EvalError(f"midtune_shapes task data: {one_line(e)}") from None


def say(text: str) -> None:
    """Progress on stdout, from rank 0 only (every rank runs the same steps)."""
    if parallel.is_main():
        print(text, flush=True)


def parse_models(values: list[str], verify_bases: bool = True) -> list[ModelSpec]:
    from midtune.checkpoint import CheckpointError, check_base, load_delta
    from midtune.sources import resolve_source

    specs: list[ModelSpec] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = default_name(value), value
        name, path = name.strip(), path.strip()
        if not NAME_RE.match(name):
            raise EvalError(f"--model {value!r}: the name {name!r} must be letters, digits, '.', '_', '+', '-'")
        if any(s.name == name for s in specs):
            raise EvalError(f"--model {value!r}: the name {name!r} is used twice")
        if not path:
            raise EvalError(f"--model {value!r}: no path after '='")
        pretrained, delta = path, None
        head, at, tail = path.rpartition("@")
        if at and (head.endswith(".safetensors") or Path(head).is_file()):
            pretrained, delta = tail, head  # DELTA@BASE
        try:
            source = resolve_source(pretrained, delta) if delta else resolve_source(pretrained)
            if source.delta and verify_bases:  # refuse a base with other weights now, not after other models ran
                _, metadata = load_delta(source.delta)
                check_base(metadata, source.pretrained, source.delta)
        except CheckpointError as e:
            raise EvalError(f"model {name}: {e}") from None
        specs.append(ModelSpec(name, path, source))
    return specs


def default_name(path: str) -> str:
    p = Path(path.split("@")[0])
    if p.suffix == ".safetensors":
        p = p.parent
    if p.name == "final":
        p = p.parent
    return re.sub(r"[^A-Za-z0-9._+-]", "_", p.name or "model")


def build_task_manager(tasks: list[str], include_path: list[str], verbosity: str):
    """A TaskManager that knows every requested task. lmms-eval's own ~2,000 tasks are indexed only when a
    requested task is not one of ours (or the user's): that indexing is most of lmms-eval's start-up time.
    Returns (task_manager, every task is local)."""
    from lmms_eval.tasks import TaskManager

    from eval.tasks import TASKS_DIR

    configure_logging(verbosity)
    paths = [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in include_path]

    def index(defaults: bool):
        try:
            return TaskManager(verbosity, include_path=paths, include_defaults=defaults, model_name="midtune")
        except Exception as e:  # noqa: BLE001 - a broken task YAML can raise anything
            raise EvalError(f"could not index the task YAMLs ({', '.join(paths)}): {one_line(e)}") from None

    manager = index(False)
    if not missing_tasks(tasks, manager):
        return manager, True
    manager = index(True)
    missing = missing_tasks(tasks, manager)
    if missing:
        import difflib

        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(f"unknown task{'s' if len(missing) > 1 else ''}: {', '.join(hints)} — not among midtune's "
                        f"tasks, lmms-eval's tasks or the --include_path directories")
    return manager, False


def check_task_names(tasks: list[str], include_path: list[str], verbosity: str) -> None:
    """EvalError unless every task is found by name. A success is remembered in the cache, keyed by the names,
    the task YAMLs (paths, sizes, modification times) and lmms-eval's version: the check imports lmms-eval
    (about 10 s here), and compare runs it before every experiment, most of them with the same tasks."""
    from importlib.metadata import version

    from eval.tasks import TASKS_DIR
    from midtune.files import cache_dir, write_json

    yamls = sorted(f for d in [TASKS_DIR, *map(Path, include_path)] for f in Path(d).resolve().rglob("*.yaml"))
    key = hashlib.sha256(json.dumps([sorted(tasks), version("lmms_eval"),
                                     [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in yamls]])
                         .encode()).hexdigest()[:32]
    remembered = cache_dir("task-checks") / f"{key}.json"
    if remembered.is_file():
        return
    build_task_manager(tasks, include_path, verbosity)
    write_json(remembered, {"tasks": tasks})


def configure_logging(level: str) -> None:
    """lmms-eval's log lines go to stderr at `level` (lmms-eval itself installs a WARNING handler on stdout)."""
    import lmms_eval.models  # noqa: F401  (importing it installs lmms-eval's own handler, replaced here)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level.upper(), format="lmms-eval {level}: {message}")


def missing_tasks(tasks: list[str], manager) -> list[str]:
    matched = set(manager.match_tasks(tasks))
    return [t for t in tasks if t not in matched and "*" not in t and not Path(t).is_file()]


def uses_shapes_tasks(tasks: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch("midtune_shapes", t) or t.startswith("midtune_shapes") for t in tasks)


def check_tasks(tasks: list[str], manager) -> None:
    """Load every requested task once before any model runs: an unreachable dataset (offline), broken task data
    or an empty task fails here, naming the task, not after the first model has been evaluated."""
    from lmms_eval.evaluator_utils import get_task_list
    from lmms_eval.tasks import get_task_dict

    check_local_data(tasks, manager)
    try:
        task_dict = get_task_dict(tasks, manager)
    except Exception as e:  # noqa: BLE001 - lmms-eval/datasets raise many kinds
        raise EvalError(f"could not load task(s) {', '.join(tasks)}: {one_line(e)}") from None
    for output in get_task_list(task_dict):
        task = output.task
        if task is None:
            continue
        try:
            n = len(task.eval_docs)
        except Exception as e:  # noqa: BLE001 - reported as the task's error
            raise EvalError(f"task {output.task_name}: no test or validation documents ({one_line(e)})") from None
        if n == 0:
            files = (task.config.dataset_kwargs or {}).get("data_files") if task.config.dataset_kwargs else None
            where = f" (data: {files})" if files else f" (dataset: {task.config.dataset_path})"
            raise EvalError(f"task {output.task_name} has no documents{where}")


def check_local_data(tasks: list[str], manager) -> None:
    """Local task data (`dataset_path: json|csv|parquet|...` + `data_files`) must exist and not be empty; datasets'
    own errors for these cases do not name the file (an empty JSON file raises a bare StopIteration)."""
    from lmms_eval.utils import load_yaml_config

    local_builders = {"csv", "json", "parquet", "text", "pandas", "arrow"}

    def leaf_configs(names, seen: set[str]):
        for name in manager.match_tasks(list(names)) if names else []:
            info = manager.task_index.get(name)
            if info is None or name in seen:
                continue
            seen.add(name)
            if info["type"] == "tag":
                yield from leaf_configs(info["task"], seen)
                continue
            if info["yaml_path"] == -1:
                continue
            config = load_yaml_config(info["yaml_path"], mode="simple")
            if info["type"] == "group":
                subtasks = config.get("task") or []
                yield from leaf_configs([t for t in subtasks if isinstance(t, str)], seen)
                for inline in (t for t in subtasks if isinstance(t, dict)):
                    yield inline.get("task", name), inline, Path(info["yaml_path"]).parent
            elif info["type"] == "task":
                yield name, config, Path(info["yaml_path"]).parent

    for name, config, yaml_dir in leaf_configs(tasks, set()):
        if config.get("dataset_path") not in local_builders:
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        values = files.values() if isinstance(files, dict) else [files]
        for value in values:
            for entry in value if isinstance(value, list) else [value]:
                if not isinstance(entry, str) or "://" in entry or any(c in entry for c in "*?["):
                    continue
                path = Path(entry) if Path(entry).is_absolute() else yaml_dir / entry
                if not path.is_file():
                    raise EvalError(f"task {name}: data file {path} does not exist")
                if path.stat().st_size == 0 or (path.stat().st_size < 4096 and not path.read_bytes().strip()):
                    raise EvalError(f"task {name}: data file {path} is empty")


def one_line(e: BaseException) -> str:
    """The most useful one-line description of an exception (tenacity retries and chains unwrapped)."""
    while True:
        last = getattr(e, "last_attempt", None)  # tenacity.RetryError
        if last is not None and last.exception() is not None:
            e = last.exception()
            continue
        break
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > 400:
        text = text[:400] + " …"
    return f"{type(e).__name__}: {text}"


def fingerprint(source) -> dict[str, list[int]]:
    """Size and modification time of the local files a model is loaded from, so that results of a model that
    has since been retrained in place are not reused. Hub models have none."""
    files: list[Path] = []
    for path in (source.pretrained, source.delta):
        if path and Path(path).is_dir():
            files += sorted(f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".json"))
        elif path and Path(path).is_file():
            files.append(Path(path))
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def task_results_path(model_dir: Path, task: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task)
    if safe != task:  # a glob or a YAML path: keep distinct requests in distinct files
        safe += "-" + hashlib.sha256(task.encode()).hexdigest()[:8]
    return model_dir / TASK_RESULTS_DIR / f"{safe}.json"


def finished_tasks(model_dir: Path, tasks: list[str], settings: dict) -> dict[str, dict]:
    """{task: its lmms-eval results} of the requested tasks already evaluated with these settings."""
    wanted = json.loads(json.dumps(settings))
    done = {}
    for task in tasks:
        try:
            part = json.loads(task_results_path(model_dir, task).read_text())
        except (OSError, ValueError):
            continue
        if part.get("midtune", {}).get("task") == task and part["midtune"].get("settings") == wanted:
            done[task] = part
    return done


def evaluate_model(spec: ModelSpec, tasks: list[str], manager, args, settings: dict, model_dir: Path) -> None:
    """Load one model and run lmms-eval on it one task at a time, writing each task's results as it finishes;
    raises EvalError naming the model (and the task)."""
    import torch
    from lmms_eval import evaluator

    from eval.lmms_plugin import Midtune

    started = time.time()
    try:
        lm = Midtune(pretrained=spec.source.pretrained, delta=spec.source.delta, device=args.device,
                     dtype=args.dtype, batch_size=args.batch_size, trust_remote_code=args.trust_remote_code,
                     verify_base=False,  # the base hash was checked before any model ran
                     attn_implementation=args.attn_implementation, min_pixels=args.min_pixels,
                     max_pixels=args.max_pixels)
    except Exception as e:  # noqa: BLE001 - any loading failure names the model
        raise EvalError(f"model {spec.name}: cannot load {spec.source.describe()!r}: {one_line(e)}", code=1) from None
    loaded = time.time() - started
    # lmms-eval's simple_evaluate ends with lm.clean(), which deletes the model's modules; they are handed back
    # before each task so that one loaded model serves them all.
    modules = {name: value for name, value in vars(lm).items() if isinstance(value, torch.nn.Module)}
    try:
        for task in tasks:
            task_started = time.time()
            for name, value in modules.items():
                setattr(lm, name, value)
            try:
                results = evaluator.simple_evaluate(
                    model=lm, tasks=[task], limit=args.limit, batch_size=args.batch_size, device=str(lm.device),
                    log_samples=True, task_manager=manager, verbosity=args.verbosity, bootstrap_iters=1000,
                )
            except Exception as e:  # noqa: BLE001 - any evaluation failure names the model and task
                raise EvalError(f"model {spec.name}: task {task}: evaluation failed: {one_line(e)}", code=1) from None
            if results is None:  # a non-zero rank under torchrun/accelerate: rank 0 writes
                continue
            samples = results.pop("samples", {})
            results["config"]["model"] = "midtune"
            results["config"]["model_args"] = spec.source.to_dict()
            results["midtune"] = {"name": spec.name, "model": spec.path, "task": task, "settings": settings,
                                  "processes": lm.world_size,  # how many shared the documents
                                  "load_time_s": round(loaded, 2), "wall_time_s": round(time.time() - task_started, 2)}
            write_task_results(model_dir, task, results, samples)
            print(f"    {task}: done in {time.time() - task_started:.1f}s → {model_dir}/", flush=True)
    finally:
        del lm, modules
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def write_task_results(model_dir: Path, task: str, results: dict, samples: dict) -> None:
    """The task's samples_<subtask>.jsonl files, then `tasks/<task>.json`, each written whole or not at all; the
    task counts as finished once its JSON is there."""
    from midtune.files import atomic_file, write_json

    for name, rows in (samples or {}).items():
        with atomic_file(model_dir / f"samples_{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n"
                          for row in in_document_order(rows))
    write_json(task_results_path(model_dir, task), results, indent=2, default=_json_default, ensure_ascii=False)


def in_document_order(rows: list[dict]) -> list[dict]:
    """Logged samples by doc_id: a data-parallel run gathers them rank after rank (docs 0, 2, 4, ..., then 1, 3,
    ...), and the same documents give the same file whatever the process count."""
    if all(isinstance(row.get("doc_id"), int) for row in rows):
        return sorted(rows, key=lambda row: row["doc_id"])
    return list(rows)


MERGED_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def write_model_results(model_dir: Path, spec: ModelSpec, parts: list[dict]) -> dict:
    """`<NAME>/results.json`: the finished tasks' lmms-eval results as one (per-task tables merged; the rest from
    the latest task). Returns it."""
    from midtune.files import write_json

    merged = json.loads(json.dumps(parts[-1], default=_json_default))
    for key in MERGED_KEYS:
        merged[key] = {name: value for part in parts for name, value in (part.get(key) or {}).items()}
    merged["midtune"] = {"name": spec.name, "model": spec.path, "settings": parts[-1]["midtune"]["settings"],
                         "tasks": {p["midtune"]["task"]: {"wall_time_s": p["midtune"]["wall_time_s"],
                                                          "processes": p["midtune"].get("processes", 1)}
                                   for p in parts}}
    write_json(model_dir / RESULTS_FILE, merged, indent=2, default=_json_default, ensure_ascii=False)
    return merged


def _json_default(obj):
    from lmms_eval.utils import handle_non_serializable

    return handle_non_serializable(obj)


# ---------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------


# A task's headline metric, where lmms-eval's task lists another one first: the score its paper (and the
# leaderboards that follow it) report. The comparison table gives it first among the task's rows, and compare's
# report, which takes a task's first metric when it knows no better, follows. Other tasks keep lmms-eval's order.
HEADLINE_METRICS = {
    # Tong et al., "Eyes Wide Shut?" (CVPR 2024): a pair of images with one question counts only when both are
    # answered right; lmms-eval 0.7.3 lists the per-question mmvp_accuracy first.
    "mmvp": "mmvp_pair_accuracy",
    # MMStar (Chen et al., 2024) reports the average over its six categories, which lmms-eval lists last.
    "mmstar": "average",
}


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of one lmms-eval result: each group, then its subtasks, then the other tasks;
    within a task its headline metric (HEADLINE_METRICS) first. The stderr is lmms-eval's `<metric>_stderr` (None
    where it has none, "N/A"); its _clt and _clustered variants stay in results.json."""
    groups = results.get("groups") or {}
    tasks = results.get("results") or {}
    order: list[str] = []
    for group in groups:
        order += [group, *(results.get("group_subtasks") or {}).get(group, [])]
    order += list(tasks)
    rows = []
    for task in dict.fromkeys(order):
        scores = {**tasks.get(task, {}), **groups.get(task, {})}
        task_rows: dict[str, tuple] = {}
        for key, value in scores.items():
            if key == "alias" or "_stderr" in key or not _is_number(value):
                continue
            metric, _, filt = key.partition(",")
            label = metric if filt in ("", "none") else f"{metric} ({filt})"
            stderr = scores.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            task_rows.setdefault(label, (task, label, float(value), float(stderr) if _is_number(stderr) else None))
        headline = HEADLINE_METRICS.get(task)
        rows += sorted(task_rows.values(), key=lambda row: row[1].partition(" (")[0] != headline)  # stable
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def comparison_table(all_results: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Header and rows: task, metric, n, one column per model, the difference of each later model from the first,
    then each model's stderr (after the others, so the columns before keep their places). Missing values are
    None. The differences carry no stderr: the models answered the same questions, so the two stderrs do not
    combine into one (compare's report gives paired intervals)."""
    names = list(all_results)
    values: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}
    order: list[tuple[str, str]] = []
    n_docs: dict[str, int] = {}
    for name, results in all_results.items():
        for task, metric, value, stderr in metric_rows(results):
            if (task, metric) not in values:
                values[(task, metric)] = {}
                order.append((task, metric))
            values[(task, metric)][name] = (value, stderr)
        for task, counts in (results.get("n-samples") or {}).items():
            n_docs.setdefault(task, counts.get("effective", counts.get("original")))
    header = ["task", "metric", "n", *names, *(f"Δ {n} − {names[0]}" for n in names[1:]),
              *(f"{n} stderr" for n in names)]
    rows = []
    for task, metric in order:
        cells = [values[(task, metric)].get(n, (None, None)) for n in names]
        row_values = [value for value, _ in cells]
        ref = row_values[0]
        diffs = [None if v is None or ref is None else v - ref for v in row_values[1:]]
        rows.append([task, metric, n_docs.get(task), *row_values, *diffs, *(stderr for _, stderr in cells)])
    return header, rows


def write_comparison(all_results: dict[str, dict], output_dir: Path) -> str:
    """comparison.md (each score as `value ± stderr`), comparison.csv (the stderrs in columns of their own) and
    comparison.png (stderr bars) under `output_dir`; returns the Markdown table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    header, rows = comparison_table(all_results)
    n_models = len(all_results)
    shown = 3 + 2 * n_models - 1  # task, metric, n, the scores, the differences; the stderrs go into the cells

    def fmt(row: list, k: int) -> str:
        value = row[k]
        if value is None:
            return "—"
        if k == 2:
            return str(value)
        if k >= 3 + n_models:
            return f"{value:+.4f}"
        if 3 <= k < 3 + n_models:
            stderr = row[k + 2 * n_models - 1]
            return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
        return str(value)

    rule = "|" + "|".join("---" if k < 2 else "---:" for k in range(shown)) + "|"
    lines = ["| " + " | ".join(header[:shown]) + " |", rule]
    lines += ["| " + " | ".join(fmt(row, k) for k in range(shown)) + " |" for row in rows]
    table = "\n".join(lines)
    write_text(output_dir / "comparison.md", table + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    write_text(output_dir / "comparison.csv", buf.getvalue())
    plot_comparison(list(all_results), rows, output_dir / "comparison.png")
    return table


def plot_comparison(names: list[str], rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{task}\n{metric}" for task, metric, *_ in rows]
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(names))
    first_stderr = 3 + 2 * len(names) - 1
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) * max(1, len(names)) ** 0.5 + 2), 4.5))
    for k, name in enumerate(names):
        heights = [row[3 + k] if row[3 + k] is not None else np.nan for row in rows]
        stderrs = [row[first_stderr + k] if row[first_stderr + k] is not None else np.nan for row in rows]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, heights, width, yerr=stderrs, capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score (bars: ± stderr)")
    ax.set_title("midtune eval: " + " vs ".join(names))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
