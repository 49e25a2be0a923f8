"""Experiment files: read one, check it whole, and turn it into the ordered stages `python -m compare` runs.

An experiment is one YAML file (schema: docs/compare.md). Every string may use placeholders: `{output_dir}`,
`{NAME}` for a variable of `vars:` and `{STAGE}` for the output directory of a `prepare` stage or a training stage
(e.g. `{world}/train.json`, `{align}/final`); a prepare command's own directory is `{out}`. Relative paths are
relative to the directory `compare` runs in, like the train configs' own paths.

Everything is checked before anything runs: unknown keys (with a suggestion), runs under which nothing would
train, a base model that does not exist, sweeps that do not fit the model, names used twice. The stages are then
plain commands (the ones a user would type), so `--print-commands` can hand them to a scheduler.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import re
import shlex
import string
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from midtune.spec import SpecError, TrainableSpec

TOP_KEYS = ("name", "description", "hardware", "output_dir", "vars", "prepare", "base", "stages", "config", "data",
            "image_folder", "train_overrides", "runs", "sweep", "seeds", "launch", "eval", "analysis", "reference",
            "report", "executor", "slurm")
EXECUTORS = ("local", "slurm", "submitit-local")
PREPARE_KEYS = ("command", "watch")
COMPOSE_KEYS = ("vision", "llm", "projector", "vision_feature_layer", "image_token", "chat_template", "dtype", "seed",
                "trust_remote_code")
SWEEP_KEYS = ("config", "width", "stride", "num_layers", "overrides")
LAUNCH_KEYS = ("with", "config_file", "num_processes", "args")
EVAL_KEYS = ("tasks", "limit", "include_path", "batch_size", "dtype", "args")
ANALYSIS_KEYS = ("pairs", "image_folder", "dtype", "batch_size", "args", "lens", "lens_args", "seeds", "protocol")
PROTOCOLS = ("authors", "describe")  # analysis profile --protocol (docs/analysis.md); the first is the report's
REPORT_KEYS = ("margin", "cost_margin", "chance", "metrics", "cluster_by", "cost_probe", "n_boot")
COST_PROBE_KEYS = ("warmup", "steps")
COST_PROBE_DEFAULTS = {"warmup": 2, "steps": 10}
# Names the report and the output layout use for themselves.
RESERVED = ("base", "pretrained", "eval", "analysis", "lens", "report", "cost", "out", "output_dir", "fast_dtype")
PYTHON = "python"  # the first word of a command: replaced by this interpreter when compare runs it
MARKER = ".midtune-stage.json"


class ExperimentError(ValueError):
    """An experiment file that cannot run as written; the message names the file and the key."""


@dataclass
class Stage:
    """One command and where it writes. `params` (with the markers of the stages in `after`) decide reuse."""

    name: str
    kind: str  # prepare | compose | train | eval | eval-table | analysis | lens | cost | report
    out: Path
    command: list[str]
    params: dict
    after: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # files under `out` that show a run outside compare finished
    check: list[str] | None = None  # a command that checks the stage's settings without running it
    marker_name: str = MARKER
    clear: bool = True  # redoing the stage empties `out` first (eval-table shares eval/ with the per-model stages)
    # files and folders the stage reads that no earlier stage makes: checked before the first stage runs
    inputs: list[str] = field(default_factory=list)

    @property
    def marker(self) -> Path:
        return self.out / self.marker_name


@dataclass
class Experiment:
    path: Path
    name: str
    description: str
    hardware: str
    output_dir: Path
    stages: list[Stage]
    models: dict[str, str]  # name → model path, in report order: [pretrained,] base, runs (each seed)..., sweep...
    # stage/run name → {"role": stage|run|sweep, "block": [lo, hi] | None, "seeds": {seed: training stage name}}
    trainings: dict[str, dict]
    reference: str
    eval: dict
    analysis: dict | None
    report: dict
    cost_probes: dict[str, str] = field(default_factory=dict)  # run → its cost probe's directory
    cost_probe_skipped: str | None = None  # why there is no cost probe, when there is none
    settings: list[str] = field(default_factory=list)  # the --set overrides it was read with
    executor: str = "local"  # local | slurm | submitit-local (the file's `executor:`)
    resources: dict[str, dict] = field(default_factory=dict)  # resource kind → its slurm settings (compare.cluster)
    fast_dtype: str = "float32"  # what {fast_dtype} stood for

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# ---------------------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------------------


def _unknown(keys, allowed, where: str, file: Path) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(allowed)})"
            raise ExperimentError(f"{file}: unknown key {where}{key!r}{hint}")


def _mapping(value, where: str, file: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExperimentError(f"{file}: {where} must be a mapping, got {type(value).__name__}")
    return value


class _Placeholders(dict):
    def __init__(self, values: dict, file: Path, where: str):
        super().__init__(values)
        self.file, self.where = file, where

    def __missing__(self, key):
        close = difflib.get_close_matches(key, list(self), n=1)
        hint = f"; did you mean {{{close[0]}}}?" if close else f" (known: {', '.join('{' + k + '}' for k in self)})"
        raise ExperimentError(f"{self.file}: {self.where}: unknown placeholder {{{key}}}{hint}")


def _fill(value, names: dict, file: Path, where: str):
    """Substitute placeholders in every string of `value` (lists and mappings walked)."""
    if isinstance(value, str):
        try:
            return string.Formatter().vformat(value, (), _Placeholders(names, file, where))
        except ExperimentError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
            raise ExperimentError(f"{file}: {where}: {value!r}: not a plain {{placeholder}} ({e}); write a literal "
                                  f"brace as {{{{ or }}}}") from None
    if isinstance(value, list):
        return [_fill(v, names, file, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names, file, f"{where}.{k}") for k, v in value.items()}
    return value


def fingerprint_files(*paths: Path) -> str:
    """What a stage's inputs depend on in these files. A Python module counts by its code only (its syntax tree
    without docstrings; comments never reach the tree), so fixing a comment does not redo a GPU-day of stages;
    any other file counts byte for byte."""
    h = hashlib.sha256()
    for p in paths:
        h.update(_code_of(Path(p)))
    return h.hexdigest()[:16]


def _code_of(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".py":
        return raw
    try:
        tree = ast.parse(raw)
    except SyntaxError:
        return raw
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def _override_value(value) -> str:
    """A value as train's `key=value` reads it (OmegaConf parses the right-hand side as YAML)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """{trainable: {layers: 6-16}} → {trainable.layers: 6-16}: a nested override changes only the keys it names."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _overrides(mapping: dict) -> list[str]:
    return [f"{key}={_override_value(value)}" for key, value in _flatten(mapping).items()]


def _read_yaml(path: Path, what: str):
    """A YAML file's contents; one ExperimentError starting with `what` when it is missing or not YAML."""
    if not path.is_file():
        raise ExperimentError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{what} {path}: not valid YAML: {e}") from None


def _load_train_config(path: Path, file: Path, where: str) -> dict:
    loaded = _read_yaml(path, f"{file}: {where}: train config")
    return loaded if isinstance(loaded, dict) else {}


def _check_trains_something(config_path: Path, overrides: dict, file: Path, where: str) -> None:
    """The run's trainable block (config file + `trainable.*` overrides) must train something: the same check
    train makes, but before any stage runs."""
    trainable = dict(_load_train_config(config_path, file, where).get("trainable") or {})
    for key, value in _flatten(overrides).items():
        if key.startswith("trainable."):
            trainable[key.removeprefix("trainable.")] = value
    try:
        TrainableSpec.from_dict(trainable, where=f"{where} trainable")
    except SpecError as e:
        raise ExperimentError(f"{file}: {e} (config {config_path})") from None


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def _check_model(model: str, file: Path, where: str, produced: tuple[str, ...]) -> None:
    """A model that no earlier stage produces must exist: a directory or a hub id."""
    if any(model.startswith(p) for p in produced) or Path(model).exists():
        return
    if _looks_like_hub_id(model) and not model.startswith(("runs/", "data/")):
        return  # a hub id: loaded (from the local cache offline) by the stage that uses it
    raise ExperimentError(f"{file}: {where}: model {model!r} does not exist (a directory, a hub id owner/name, or "
                          f"a placeholder of a stage that makes it)")


def _num_layers(model: str) -> int | None:
    """LLM layers of a local model directory, from its config.json (None when it is not local yet)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    c = json.loads(config.read_text())
    text = c.get("text_config") or {}
    return text.get("num_hidden_layers") or c.get("num_hidden_layers")


def _names_path(command: list[str], path: Path) -> bool:
    """Whether a word of `command` is `path` or lies under it (also after `key=`, inside a `[a,b]` list, and in a
    word that holds a whole command line, as the cost probe's `--run NAME "ARGS"` does)."""
    pattern = re.compile(r"(^|[=,\[])" + re.escape(str(path)) + r"(/|$|,|\])")
    return any(pattern.search(part) for word in command for part in word.split())


def _watched(item: str, file: Path, where: str) -> Path:
    """A file whose contents are part of a stage's inputs: a path, or a Python module's source (midtune.shapes)."""
    if Path(item).is_file():
        return Path(item)
    if re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", item):
        import importlib.util

        try:
            spec = importlib.util.find_spec(item)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            return Path(spec.origin)
    raise ExperimentError(f"{file}: {where}: {item!r} is neither a file nor an importable module")


def _list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def read_experiment(path: str | Path, settings: list[str] = ()) -> Experiment:
    """Read, check and plan an experiment file. `settings`: `key.sub=value` overrides of the file (--set)."""
    file = Path(path)
    raw = _mapping(_read_yaml(file, "experiment file"), "the top level", file)
    _apply_settings(raw, settings, file)
    _unknown(raw, TOP_KEYS, "", file)
    plan = _Planner(file, raw)
    plan.prepare()
    plan.base()
    plan.launch()
    plan.trainings()
    plan.evals()
    plan.analyses()
    report = plan.report()
    plan.cost_probes(report.get("cost_probe", True))
    plan.link_dependencies()
    plan.report_stage(list(settings))
    executor = raw.get("executor", "local")
    if executor not in EXECUTORS:
        raise ExperimentError(f"{file}: executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    return Experiment(path=file, name=str(raw.get("name") or file.stem), description=str(raw.get("description") or ""),
                      hardware=str(raw.get("hardware") or ""), output_dir=plan.output_dir, stages=plan.stages,
                      models=plan.models, trainings=plan.roles, reference=plan.reference,
                      eval={"tasks": plan.tasks, **plan.eval_settings}, analysis=plan.analysis, report=report,
                      cost_probes=plan.probes, cost_probe_skipped=plan.probe_skipped, settings=list(settings),
                      executor=executor, resources=plan.resources(), fast_dtype=plan.names["fast_dtype"])


def _apply_settings(raw: dict, settings: list[str], file: Path) -> None:
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExperimentError(f"--set {item!r}: expected key=value (e.g. eval.limit=20)")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ExperimentError(f"--set {item!r}: {part!r} is not a mapping in {file}")
        node[parts[-1]] = yaml.safe_load(value)


def primary_model(name: str, seeds: dict) -> str:
    """The (run, seed) model that stands for run `name` where one seed is enough (geometry, the cost probe, the
    report's settings table): the run's own seed (the stage named like the run), else its first."""
    models = list(seeds.values())
    return name if name in models else models[0]


class _Planner:
    """Turns an experiment file's sections into stages, in the order they run; each method reads one section."""

    def __init__(self, file: Path, raw: dict):
        self.file, self.raw = file, raw
        self.output_dir = Path(str(raw.get("output_dir") or f"runs/{file.stem}"))
        variables = {k: str(v) for k, v in _mapping(raw.get("vars"), "vars", file).items()}
        # what placeholders stand for; {fast_dtype}: bfloat16 where this machine runs it natively, else float32
        self.names = {"output_dir": str(self.output_dir), "fast_dtype": _fast_dtype(), **variables}
        self.stages: list[Stage] = []
        self.produced: list[str] = []  # output directories of stages so far: models under them need not exist yet
        self.models: dict[str, str] = {}  # evaluated and profiled: name → model directory
        self.roles: dict[str, dict] = {}  # each training's role (stage, run, sweep) and block

    def fill(self, value, where: str):
        return _fill(value, self.names, self.file, where)

    def external(self, paths: list[str]) -> list[str]:
        """The paths among `paths` that no stage so far writes (those must exist before anything runs)."""
        return [p for p in paths if not any(p.startswith(made) for made in self.produced)]

    def add_name(self, name: str, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ExperimentError(f"{self.file}: {where}: name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in RESERVED or name in self.names:
            raise ExperimentError(f"{self.file}: {where}: name {name!r} is reserved or used twice")
        self.names[name] = str(self.output_dir / name)

    def prepare(self) -> None:
        """prepare: commands that make what later stages read (data, a vision tower, ...)."""
        file = self.file
        for name, spec in _mapping(self.raw.get("prepare"), "prepare", file).items():
            spec = _mapping(spec, f"prepare.{name}", file)
            _unknown(spec, PREPARE_KEYS, f"prepare.{name}.", file)
            self.add_name(name, f"prepare.{name}")
            command = spec.get("command")
            if not isinstance(command, list) or not command:
                raise ExperimentError(f"{file}: prepare.{name}.command must be a non-empty list of words")
            out = self.output_dir / name
            command = [str(w) for w in _fill(command, {**self.names, "out": str(out)}, file, f"prepare.{name}.command")]
            watch = [_watched(str(w), file, f"prepare.{name}.watch")
                     for w in self.fill(_list(spec.get("watch")), f"prepare.{name}.watch")]
            self.stages.append(Stage(name, "prepare", out, command,
                                     {"command": command, "watch": fingerprint_files(*watch) if watch else None},
                                     after=[s.name for s in self.stages]))
            self.produced.append(str(out))

    def base(self) -> None:
        """base: the model the stages (or the runs) start from: a model, or one `python -m midtune.compose` builds."""
        file, base = self.file, self.raw.get("base")
        if base is None:
            raise ExperimentError(f"{file}: missing key 'base' (the starting model: a directory or hub id, or a "
                                  f"compose section)")
        if isinstance(base, dict):
            self.start = self.compose(base)
        else:
            self.start = str(self.fill(str(base), "base"))
            if "@" in self.start:
                raise ExperimentError(f"{file}: base: {self.start!r}: training starts from a model directory or hub "
                                      f"id, not a delta on a base (DELTA@BASE is for python -m eval and analysis); "
                                      f"use the run's final/ directory, which holds the merged model")
            _check_model(self.start, file, "base", tuple(self.produced))
        self.pretrained = self.start

    def compose(self, base: dict) -> str:
        from midtune import compose as compose_module
        from midtune.compose import PACKAGED_LLMS

        file = self.file
        _unknown(base, ("compose",), "base.", file)
        compose = self.fill(_mapping(base.get("compose"), "base.compose", file), "base.compose")
        _unknown(compose, COMPOSE_KEYS, "base.compose.", file)
        for key in ("vision", "llm"):
            if key not in compose:
                raise ExperimentError(f"{file}: base.compose: missing key {key!r}")
        _check_model(str(compose["vision"]), file, "base.compose.vision", tuple(self.produced))
        out = self.output_dir / "composed"
        command = [PYTHON, "-m", "midtune.compose", "--out", str(out), "--overwrite"]
        for key, value in compose.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                command.append(flag)
            elif value not in (False, None):
                command += [flag, str(value)]
        wheel = None  # the packaged LLM's version is an input: a new wheel is a new model
        if str(compose["llm"]) in PACKAGED_LLMS:
            try:
                wheel = version(PACKAGED_LLMS[str(compose["llm"])][0].replace("_", "-"))
            except PackageNotFoundError:
                wheel = "missing"
        template = compose.get("chat_template")  # its content, not only its path: an edited template is a new model
        template = fingerprint_files(Path(template)) if template and Path(template).is_file() else None
        self.stages.append(Stage("composed", "compose", out, command,
                                 {"command": command, "wheel": wheel, "chat_template": template,
                                  "compose": fingerprint_files(Path(compose_module.__file__))},
                                 after=[s.name for s in self.stages], done=["config.json"]))
        self.names["composed"] = str(out)
        self.produced.append(str(out))
        return str(out)

    def launch(self) -> None:
        """launch: how a training starts (the command's words before --config)."""
        file = self.file
        launch = _mapping(self.raw.get("launch"), "launch", file)
        _unknown(launch, LAUNCH_KEYS, "launch.", file)
        launcher = launch.get("with", "python")
        self.launch_files: list[Path] = []  # their contents are inputs of every training (a DeepSpeed stage, ...)
        self.one_process = _one_process(launch, file)  # None, or why the cost probe cannot share this launch
        self.accelerate = launcher == "accelerate"
        self.train_processes = _launch_processes(launch, file)
        if launcher == "python":
            if set(launch) - {"with", "args"}:
                raise ExperimentError(f"{file}: launch: config_file and num_processes need `with: accelerate`")
            self.prefix = [PYTHON, *map(str, _list(launch.get("args"))), "-m", "train"]
        elif launcher == "accelerate":
            self.prefix = [PYTHON, "-m", "accelerate.commands.launch"]
            if launch.get("config_file"):
                config_file = Path(self.fill(str(launch["config_file"]), "launch.config_file"))
                if not config_file.is_file():
                    raise ExperimentError(f"{file}: launch.config_file: {str(config_file)!r} does not exist")
                self.prefix += ["--config_file", str(config_file)]
                self.launch_files.append(config_file)
            if launch.get("num_processes") is not None:
                self.prefix += ["--num_processes", str(int(launch["num_processes"]))]
            self.prefix += [*map(str, _list(launch.get("args"))), "-m", "train"]
        else:
            raise ExperimentError(f"{file}: launch.with: {launcher!r} is not 'python' or 'accelerate'")

    def training(self, name: str, spec: dict, model: str, data, image_folder, where: str) -> Stage:
        """One training stage: `python -m train --config C` with the experiment's and the run's overrides."""
        file = self.file
        spec = dict(self.fill(spec, where))
        config = spec.pop("config", None) or self.raw.get("config")
        if not config:
            raise ExperimentError(f"{file}: {where}: no train config (set {where}.config or a top-level config)")
        config_path = Path(self.fill(str(config), f"{where}.config"))
        common = self.fill(_mapping(self.raw.get("train_overrides"), "train_overrides", file), "train_overrides")
        own = {**_flatten(common), **_flatten(spec)}  # nested mappings merge key by key
        _check_trains_something(config_path, own, file, where)
        out = self.output_dir / name
        fixed = {"model": model, "output_dir": str(out)}
        # trackers (W&B): one project per experiment, one run per training (its name carries the seed)
        tracking = {"project": str(self.raw.get("name") or file.stem), "run_name": name}
        fixed.update({k: v for k, v in tracking.items() if k not in own})
        # the experiment's data and image folder, unless the run names its own
        if data is not None and "data" not in own:
            fixed["data"] = data
        if image_folder is not None and "image_folder" not in own:
            fixed["image_folder"] = image_folder
        overrides = _overrides({**own, **fixed})
        command = [*self.prefix, "--config", str(config_path), *overrides]
        params = {"command": command, "config": fingerprint_files(config_path, *self.launch_files)}
        # run.json is written last, after final/ (a merged model, or only a delta with save_merged: false)
        inputs = [str(d) for key in ("data", "image_folder") for d in _list({**own, **fixed}.get(key))]
        return Stage(name, "train", out, command, params, done=["final", "run.json"],
                     check=[PYTHON, "-m", "train.config", "--config", str(config_path), *overrides],
                     inputs=self.external(inputs))

    def trainings(self) -> None:
        """stages (in order, each from the model the previous one made), then the runs and the sweep's blocks,
        all from the last stage's model."""
        file, raw = self.file, self.raw
        image_folder = self.fill(raw.get("image_folder"), "image_folder")
        for name, spec in _mapping(raw.get("stages"), "stages", file).items():
            spec = _mapping(spec, f"stages.{name}", file)
            self.add_name(name, f"stages.{name}")
            # a stage names its own data; the image folder is the experiment's unless it names one
            folder = None if "image_folder" in spec else image_folder
            stage = self.training(name, spec, self.start, None, folder, f"stages.{name}")
            self.stages.append(stage)
            self.roles[name] = {"role": "stage", "block": None}
            self.start = str(stage.out / "final")
            self.produced.append(str(stage.out))

        runs = _mapping(raw.get("runs"), "runs", file)
        if not runs:
            raise ExperimentError(f"{file}: no runs: name at least the reference run under `runs:` (e.g. `full: "
                                  f"{{}}`), which the other runs and any sweep are compared with")
        data = self.fill(raw.get("data"), "data")
        if data is None:
            raise ExperimentError(f"{file}: missing key 'data' (the instruction-tuning data of the runs)")
        run_data = [str(d) for d in _list(data)]
        data = run_data[0] if len(run_data) == 1 else run_data
        if raw.get("stages"):
            self.models["pretrained"] = self.pretrained
        self.models["base"] = self.start
        self.default_seeds = _seed_list(raw.get("seeds"), file, "seeds")
        for name, spec in runs.items():
            spec = dict(_mapping(spec, f"runs.{name}", file))
            self.add_name(name, f"runs.{name}")
            seeds = _seed_list(spec.pop("seeds"), file, f"runs.{name}.seeds") if "seeds" in spec else None
            self.add_seeded(name, spec, data, image_folder, f"runs.{name}", {"role": "run", "block": None},
                            seeds or self.default_seeds)
        if raw.get("sweep") is not None:
            self.sweep(_mapping(raw["sweep"], "sweep", file), data, image_folder)
        self.reference = raw.get("reference") or ("full" if "full" in runs else next(iter(runs), None))
        if self.reference is None or self.reference not in runs:
            raise ExperimentError(f"{file}: reference: {self.reference!r} is not one of the runs ({', '.join(runs)})")

    def add_seeded(self, name: str, spec: dict, data, image_folder, where: str, role: dict,
                   seeds: list[int] | None) -> None:
        """A run trained once per seed. The seed its config already sets is the run itself (its name and directory,
        no override, so adding seeds later reuses it); every other seed s is a training of its own, NAME-seedS,
        with `seed=s`: the seed sets the initialisation of what is new and the data order, the same for every run
        (a paired design)."""
        configured = self.configured_seed(spec, where)
        names: dict = {}
        for seed in seeds if seeds is not None else [configured]:
            own = seeds is None or seed == configured
            stage_name = name if own else f"{name}-seed{seed}"
            if not own:
                self.add_name(stage_name, where)
            self.stages.append(self.training(stage_name, spec if own else {**spec, "seed": seed}, self.start, data,
                                             image_folder, where if own else f"{where} (seed {seed})"))
            self.models[stage_name] = str(self.output_dir / stage_name / "final")
            names[seed] = stage_name
        self.roles[name] = {**role, "seeds": names}

    def configured_seed(self, spec: dict, where: str) -> int | None:
        """The seed a run trains with before any seeds list: its own override, the experiment's, its config's."""
        flat = {**_flatten(_mapping(self.raw.get("train_overrides"), "train_overrides", self.file)), **_flatten(spec)}
        if "seed" in flat:
            return flat["seed"] if isinstance(flat["seed"], int) else None
        config = spec.get("config") or self.raw.get("config")
        if not config:
            return None
        loaded = _load_train_config(Path(self.fill(str(config), f"{where}.config")), self.file, where)
        return loaded.get("seed") if isinstance(loaded.get("seed"), int) else None

    def primary(self, name: str) -> str:
        return primary_model(name, self.roles[name]["seeds"])

    def sweep(self, sweep: dict, data, image_folder) -> None:
        """sweep: a run per block of `width` layers, every `stride` layers, named layers_LO-HI."""
        file = self.file
        _unknown(sweep, SWEEP_KEYS, "sweep.", file)
        for key in ("width", "stride"):
            if not isinstance(sweep.get(key), int) or sweep[key] < 1:
                raise ExperimentError(f"{file}: sweep.{key} must be a positive integer, got {sweep.get(key)!r}")
        n = sweep.get("num_layers") or _num_layers(self.start if not self.raw.get("stages") else self.pretrained)
        if not n:
            raise ExperimentError(f"{file}: sweep: the base model's layer count is not known before it is built; "
                                  f"set sweep.num_layers")
        width, stride = sweep["width"], sweep["stride"]
        if width > n:
            raise ExperimentError(f"{file}: sweep.width {width} is more than the model's {n} LLM layers")
        spec = _flatten(_mapping(sweep.get("overrides"), "sweep.overrides", file))
        if sweep.get("config"):
            spec["config"] = sweep["config"]
        for lo in range(0, n - width + 1, stride):
            hi = lo + width - 1
            name = f"layers_{lo}-{hi}"
            self.add_name(name, "sweep")
            self.add_seeded(name, {**spec, "trainable.layers": f"{lo}-{hi}"}, data, image_folder, f"sweep ({name})",
                            {"role": "sweep", "block": [lo, hi], "num_layers": n}, self.default_seeds)

    def evals(self) -> None:
        """eval: one stage per model (each its own job for a scheduler), then the table over all of them."""
        file = self.file
        ev = self.fill(_mapping(self.raw.get("eval"), "eval", file), "eval")
        _unknown(ev, EVAL_KEYS, "eval.", file)
        self.eval_settings = ev
        self.tasks = [str(t) for t in _list(ev.get("tasks"))]
        if not self.tasks:
            raise ExperimentError(f"{file}: eval.tasks: name at least one lmms-eval task")
        for p in _list(ev.get("include_path")):
            if not Path(str(p)).is_dir():
                raise ExperimentError(f"{file}: eval.include_path: {str(p)!r} is not a directory")
        eval_dir = self.output_dir / "eval"
        options = ["--tasks", ",".join(self.tasks)]
        for p in _list(ev.get("include_path")):
            options += ["--include_path", str(p)]
        if ev.get("limit") is not None:
            options += ["--limit", str(ev["limit"])]
        if ev.get("batch_size") is not None:  # else python -m eval's own default (1, as lmms-eval's llava_hf)
            options += ["--batch-size", str(ev["batch_size"])]
        options += ["--dtype", str(ev.get("dtype", "auto")), *map(str, _list(ev.get("args"))),
                    "--output_dir", str(eval_dir)]
        evaluated = [m for m in self.models if m != "pretrained"]
        for m in evaluated:
            command = [PYTHON, "-m", "eval", f"--model={m}={self.models[m]}", *options]
            # Kept when redone: eval itself reuses the tasks it finished with the same settings and weights, so a
            # killed eval loses nothing. Never picked up: a failed eval leaves a results.json of what it finished.
            self.stages.append(Stage(f"eval/{m}", "eval", eval_dir / m, command, {"command": command}, clear=False))
        table = [PYTHON, "-m", "eval", *(f"--model={m}={self.models[m]}" for m in evaluated), *options]
        self.stages.append(Stage("eval", "eval-table", eval_dir, table, {"command": table},
                                 # no pick-up: every per-model eval writes a comparison.csv of its own; this is cheap
                                 after=[f"eval/{m}" for m in evaluated],
                                 marker_name=".midtune-table.json", clear=False,
                                 # every task found by name before anything trains (not their data: a prepare
                                 # stage may make it)
                                 check=[*table, "--check-tasks-only"]))

    def analyses(self) -> None:
        """analysis: the geometry profile of every model, and the logit lens (optional)."""
        file, an = self.file, self.raw.get("analysis")
        self.analysis = None
        if an is None:
            return
        an = self.fill(_mapping(an, "analysis", file), "analysis")
        _unknown(an, ANALYSIS_KEYS, "analysis.", file)
        if not an.get("pairs"):
            raise ExperimentError(f"{file}: analysis.pairs: the image/caption pairs JSONL the geometry is measured on")
        options = ["--pairs", str(an["pairs"])]
        if an.get("image_folder"):
            options += ["--image-folder", str(an["image_folder"])]
        options += ["--dtype", str(an.get("dtype", "float32")), "--batch-size", str(an.get("batch_size", 8))]
        which = an.get("seeds", "first")
        if which not in ("first", "all"):
            raise ExperimentError(f"{file}: analysis.seeds: {which!r} is not 'first' (each run's own seed) or 'all'")
        profiled = self.models if which == "all" else {m: p for m, p in self.models.items() if m in (
            "pretrained", "base") or m in {self.primary(r) for r in self.roles if self.roles[r]["role"] != "stage"}}
        protocols = _list(an.get("protocol", PROTOCOLS[0]))
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad or not protocols or len(set(protocols)) < len(protocols):
            raise ExperimentError(f"{file}: analysis.protocol: {protocols!r} — one or more of {', '.join(PROTOCOLS)}, "
                                  f"each once (the first is the report's own; the others add their overlap verdicts)")
        inputs = self.external([str(an["pairs"]), *([str(an["image_folder"])] if an.get("image_folder") else [])])
        for protocol in protocols:
            # The first protocol writes analysis/, the others analysis-<protocol>/.
            name = "analysis" if protocol == protocols[0] else f"analysis-{protocol}"
            out = self.output_dir / name
            command = [PYTHON, "-m", "analysis", "profile", *(f"--model={m}={p}" for m, p in profiled.items()),
                       *options, "--protocol", protocol, *map(str, _list(an.get("args"))), "--out", str(out)]
            # Not emptied when redone: analysis keeps each model's extracted hidden states under extract/, one
            # directory per model and protocol, fingerprinted by the weight files, so adding one run to a sweep
            # extracts only that run's model.
            self.stages.append(Stage(name, "analysis", out, command, {"command": command},
                                     done=["profiles.json"], clear=False, inputs=inputs))
        an["protocols"] = protocols
        if an.get("lens"):
            lens_models = {m: p for m, p in profiled.items() if m != "pretrained"}
            out = self.output_dir / "lens"
            command = [PYTHON, "-m", "analysis", "logit-lens", *(f"--model={m}={p}" for m, p in lens_models.items()),
                       *options, *map(str, _list(an.get("lens_args"))), "--out", str(out)]
            self.stages.append(Stage("lens", "lens", out, command, {"command": command}, done=["lens.json"],
                                     inputs=inputs))
        self.analysis = an

    def report(self) -> dict:
        """report: the margins the verdicts are judged against (fixed before the runs), chance, metrics, ..."""
        file = self.file
        report = self.fill(_mapping(self.raw.get("report"), "report", file), "report")
        _unknown(report, REPORT_KEYS, "report.", file)
        for key in ("margin", "cost_margin"):
            value = report.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ExperimentError(f"{file}: report.{key} must be a number ≥ 0, got {value!r}")
        if report.get("cluster_by") is not None and not isinstance(report["cluster_by"], str):
            raise ExperimentError(f"{file}: report.cluster_by must be 'image', 'question' or a document field")
        return report

    def cost_probes(self, setting) -> None:
        """cost/<run>: each run's configuration beside the reference's in one process, steps alternated on the same
        batches (python -m train.probe); what the report's cost verdicts come from."""
        file = self.file
        self.probes: dict[str, str] = {}
        self.probe_skipped = None
        if setting is False:
            self.probe_skipped = "report.cost_probe is false"
            return
        probe = {**COST_PROBE_DEFAULTS, **_mapping(None if setting is True else setting, "report.cost_probe", file)}
        _unknown(probe, COST_PROBE_KEYS, "report.cost_probe.", file)
        for key, value in probe.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "steps" else 0):
                raise ExperimentError(f"{file}: report.cost_probe.{key} must be an integer ≥ "
                                      f"{2 if key == 'steps' else 0}, got {value!r}")
        if self.one_process is not None:
            self.probe_skipped = self.one_process
            return
        by_name = {s.name: s for s in self.stages}
        reference = self.primary(self.reference)
        for name, role in self.roles.items():
            if role["role"] == "stage" or name == self.reference:
                continue
            out = self.output_dir / "cost" / name
            command = [PYTHON, "-m", "train.probe", "--out", str(out), "--warmup", str(probe["warmup"]), "--steps",
                       str(probe["steps"])]
            for label, stage in ((self.reference, by_name[reference]), (name, by_name[self.primary(name)])):
                # the probe writes nothing under output_dir; pointing it at the probe's own directory keeps the
                # probe independent of the trainings (it needs only their start model and data)
                args = [w for w in _train_args(stage.command) if not w.startswith("output_dir=")]
                command += ["--run", label, shlex.join([*args, f"output_dir={out / label}"])]
            self.stages.append(Stage(f"cost/{name}", "cost", out, command,
                                     {"command": command, "config": by_name[self.primary(name)].params["config"],
                                      "reference_config": by_name[reference].params["config"]},
                                     done=["probe.json"]))
            self.probes[name] = str(out)

    def report_stage(self, settings: list[str]) -> None:
        """report: reads every other stage, so it runs (here, or as a job of its own) once all of them are done.
        Its record holds the report code's fingerprint: a newer compare writes the report again."""
        from compare import geometry, plots, report, scores, stats

        command = [PYTHON, "-m", "compare.report", str(self.file), *(w for s in settings for w in ("--set", s))]
        code = fingerprint_files(*(Path(m.__file__) for m in (report, stats, scores, geometry, plots)))
        self.stages.append(Stage("report", "report", self.output_dir, command, {"command": command, "code": code},
                                 after=[s.name for s in self.stages], marker_name=".midtune-report.json",
                                 clear=False))

    def resources(self) -> dict[str, dict]:
        from compare.cluster import ResourceError, read_slurm

        try:
            return read_slurm(self.raw.get("slurm"), self.train_processes, self.accelerate)
        except ResourceError as e:
            raise ExperimentError(f"{self.file}: {e}") from None

    def link_dependencies(self) -> None:
        """A stage reads every earlier stage whose directory its command names: the model it starts from or
        evaluates, its data under {world}, ... (the eval table and the prepare stages also name theirs above)."""
        for i, s in enumerate(self.stages):
            for earlier in self.stages[:i]:
                if earlier.name not in s.after and _names_path(s.command, earlier.out):
                    s.after.append(earlier.name)


def _fast_dtype() -> str:
    """bfloat16 where this machine runs it natively, else float32; a submitted job gets the submitter's value
    (MIDTUNE_FAST_DTYPE), so that the job and the compare that follows it read the same stages."""
    import os

    if os.environ.get("MIDTUNE_FAST_DTYPE"):
        return os.environ["MIDTUNE_FAST_DTYPE"]
    from midtune.sources import fast_dtype

    return fast_dtype()


def _seed_list(value, file: Path, where: str) -> list[int] | None:
    if value is None:
        return None
    seeds = _list(value)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ExperimentError(f"{file}: {where} must be a list of distinct integers (e.g. [0, 1, 2]), got {value!r}")
    return seeds


def _train_args(command: list[str]) -> list[str]:
    """A training command's words after `-m train`: its --config and overrides."""
    at = next(i for i in range(len(command) - 1) if command[i] == "-m" and command[i + 1] == "train")
    return command[at + 2:]


def _launch_processes(launch: dict, file: Path) -> int | None:
    """How many processes a training's launch starts, where the file or its accelerate config says."""
    if launch.get("num_processes") is not None:
        return int(launch["num_processes"])
    config_file = launch.get("config_file")
    settings = _read_yaml(Path(str(config_file)), f"{file}: launch.config_file") if config_file else {}
    n = settings.get("num_processes") if isinstance(settings, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def _one_process(launch: dict, file: Path) -> str | None:
    """None when trainings run in one process (the cost probe then runs as they do); else why the probe, which
    holds two configurations in one process, cannot run like them."""
    if launch.get("with", "python") == "python":
        return None
    if launch.get("num_processes") not in (None, 1):
        return (f"the trainings launch {launch['num_processes']} processes; the cost probe holds both "
                f"configurations in one process (set report.cost_probe: false to silence this)")
    config_file = launch.get("config_file")
    settings = _read_yaml(Path(str(config_file)), f"{file}: launch.config_file") if config_file else {}
    settings = settings if isinstance(settings, dict) else {}
    if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED":
        return "the trainings run under DeepSpeed, whose engine takes one model per process"
    if settings.get("num_processes") not in (None, 1) and launch.get("num_processes") is None:
        return f"the trainings launch {settings['num_processes']} processes ({config_file})"
    return None


def executable(command: list[str]) -> list[str]:
    """The command as it runs: `python` is this interpreter (the project's environment)."""
    return [sys.executable, *command[1:]] if command and command[0] == PYTHON else list(command)
