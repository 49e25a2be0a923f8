"""What each stage asks of a cluster: the experiment file's `slurm:` section, checked when the file is read, and
the words that launch a training across the nodes of its job.

```yaml
slurm:                        # keys here apply to every stage kind ...
  partition: gpu
  account: my-lab
  train: {nodes: 2, gpus_per_node: 8, time: "1-00:00:00"}   # ... and a kind's own keys win
  eval: {gpus_per_node: 1, time: "4:00:00"}
```

Stage kinds: prepare (prepare and compose stages), train, eval (one model's evaluation), analysis (geometry and
the logit lens), cost (the cost probe), report (the evaluation table and the report: no GPU).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

KINDS = ("prepare", "train", "eval", "analysis", "cost", "report")
KEYS = ("partition", "account", "qos", "time", "nodes", "gpus_per_node", "cpus_per_task", "mem", "constraint",
        "setup", "additional")
# the resource kind of each stage kind
KIND_OF = {"prepare": "prepare", "compose": "prepare", "train": "train", "eval": "eval", "eval-table": "report",
           "analysis": "analysis", "lens": "analysis", "cost": "cost", "report": "report"}
DEFAULTS = {
    "prepare": {"nodes": 1, "gpus_per_node": 0, "time": "2:00:00"},
    "train": {"nodes": 1, "gpus_per_node": 1, "time": "1-00:00:00"},
    "eval": {"nodes": 1, "gpus_per_node": 1, "time": "8:00:00"},
    "analysis": {"nodes": 1, "gpus_per_node": 1, "time": "4:00:00"},
    "cost": {"nodes": 1, "gpus_per_node": 1, "time": "1:00:00"},
    "report": {"nodes": 1, "gpus_per_node": 0, "time": "1:00:00"},
}
MAIN_PROCESS_PORT = 29500


class ResourceError(ValueError):
    pass


def _unknown(keys, allowed, where: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(allowed)})"
            raise ResourceError(f"unknown key {where}{key!r}{hint}")


def minutes(value, where: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) or a number of minutes → minutes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m or isinstance(value, bool):
        raise ResourceError(f"{where}: {value!r} is not a Slurm time (e.g. 90, \"4:00:00\" or \"1-12:00:00\")")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, mins, secs = a, b or 0, c or 0
    elif c is not None:  # HH:MM:SS
        hours, mins, secs = a, b, c
    else:  # MM or MM:SS
        hours, mins, secs = 0, a, b or 0
    total = ((days or 0) * 24 + hours) * 60 + mins + (1 if secs else 0)
    if total < 1:
        raise ResourceError(f"{where}: {value!r} is less than a minute")
    return total


def read_slurm(section, train_processes: int | None, accelerate: bool) -> dict[str, dict]:
    """Each resource kind's settings: defaults, then the section's common keys, then the kind's own. A training
    defaults to as many GPUs as its launch starts processes; more than one GPU needs `launch.with: accelerate`."""
    section = section or {}
    if not isinstance(section, dict):
        raise ResourceError(f"slurm must be a mapping, got {type(section).__name__}")
    _unknown(section, (*KEYS, *KINDS), "slurm.")
    common = {k: v for k, v in section.items() if k in KEYS}
    resolved = {}
    for kind in KINDS:
        own = section.get(kind) or {}
        if not isinstance(own, dict):
            raise ResourceError(f"slurm.{kind} must be a mapping, got {type(own).__name__}")
        _unknown(own, KEYS, f"slurm.{kind}.")
        defaults = dict(DEFAULTS[kind])
        if kind == "train" and train_processes:
            defaults["gpus_per_node"] = train_processes
        resolved[kind] = _checked({**defaults, **common, **own}, f"slurm.{kind}")
    train = resolved["train"]
    if not accelerate and (train["nodes"] > 1 or train["gpus_per_node"] > 1):
        raise ResourceError(f"slurm.train asks for {train['nodes']} node(s) × {train['gpus_per_node']} GPUs, but "
                            f"launch.with is python: one process. Set `launch: {{with: accelerate}}`")
    return resolved


def _checked(settings: dict, where: str) -> dict:
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        value = settings.get(key)
        low = 1 if key in ("nodes", "cpus_per_task") else 0
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ResourceError(f"{where}.{key} must be an integer ≥ {low}, got {value!r}")
    settings["time"] = minutes(settings["time"], f"{where}.time")
    if settings.get("setup") is not None:
        setup = settings["setup"]
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            raise ResourceError(f"{where}.setup must be a list of shell lines, got {setup!r}")
    if settings.get("additional") is not None and not isinstance(settings["additional"], dict):
        raise ResourceError(f"{where}.additional must be a mapping of sbatch options, got {settings['additional']!r}")
    return settings


def slurm_parameters(settings: dict, job_name: str, dependencies: list[str]) -> dict:
    """submitit SlurmExecutor parameters for one stage: one task per node (the launcher starts the GPU processes),
    the job's dependencies as `afterok`, and a dependency that can never be met cancels the job instead of leaving
    it queued forever."""
    params = {"job_name": job_name, "time": settings["time"], "nodes": settings["nodes"], "ntasks_per_node": 1,
              "gpus_per_node": settings["gpus_per_node"] or None, "stderr_to_stdout": True,
              "additional_parameters": {"kill-on-invalid-dep": "yes", **(settings.get("additional") or {})}}
    for key in ("partition", "account", "qos", "cpus_per_task", "mem", "constraint", "setup"):
        if settings.get(key) is not None:
            params[key] = settings[key]
    if dependencies:
        params["dependency"] = "afterok:" + ":".join(dependencies)
    return params


def local_parameters(settings: dict) -> dict:
    """submitit LocalExecutor parameters: the same time limit; GPUs only where the machine has them."""
    from compare.devices import visible_gpus

    gpus = min(settings["gpus_per_node"], len(visible_gpus()))
    return {"timeout_min": settings["time"], "gpus_per_node": gpus, "tasks_per_node": 1, "stderr_to_stdout": True}


def node_launch(num_nodes: int, node_rank: int, main_host: str, gpus_per_node: int,
                port: int = MAIN_PROCESS_PORT) -> list[str]:
    """accelerate launch's words for one node of a training job: the job's nodes × GPUs decide the process count
    (not the launch config's), and a multi-node job names its machines and this node's rank."""
    if num_nodes <= 1:
        return ["--num_processes", str(max(1, gpus_per_node))]
    return ["--num_machines", str(num_nodes), "--machine_rank", str(node_rank), "--main_process_ip", main_host,
            "--main_process_port", str(port), "--num_processes", str(num_nodes * gpus_per_node)]


def log_path(folder: Path, job_id: str) -> Path:
    """Where submitit writes a job's output (stderr joined to stdout)."""
    return folder / f"{job_id}_0_log.out"
