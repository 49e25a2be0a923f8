"""The run directory: one run per directory (refused otherwise), replaced or resumed only once every input has
been checked, and logs cut back to the checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from midtune.files import read_jsonl, write_text
from train.checkpoints import remove_interrupted_saves, resolve_resume
from train.config import TrainConfig, to_yaml
from train.stopping import UserError

log = logging.getLogger("midtune.train")
RUN_FILES = ("run.json", "metrics.jsonl", "config.yaml", "final", "logs", "analysis")


def check_output_dir(config: TrainConfig, output_dir: Path) -> Path | None:
    """Refuse to mix two runs in one directory; returns the checkpoint to resume from, if any. Writes nothing."""
    if config.resume_from:
        return resolve_resume(config.resume_from, output_dir)
    existing = existing_run_files(output_dir)
    if existing and not config.overwrite:
        raise UserError(
            f"output_dir {str(output_dir)!r} already holds a run ({', '.join(sorted(existing)[:4])}); "
            f"set overwrite=true to replace it or resume_from=latest to continue it"
        )
    return None


def existing_run_files(output_dir: Path) -> list[str]:
    if not output_dir.exists():
        return []
    return [name for name in RUN_FILES if (output_dir / name).exists()] + \
        [d.name for d in output_dir.glob("checkpoint-*")] + [f.name for f in output_dir.glob("samples-rank*.jsonl")]


def start_output_dir(accelerator, config: TrainConfig, output_dir: Path, resume_path: Path | None) -> None:
    """Once every input has been checked: replace an overwritten run, clear what crashed saves left behind,
    and write the resolved config."""
    if accelerator.is_main_process:
        if resume_path is None:  # overwrite=true (check_output_dir refused an existing run otherwise)
            for name in existing_run_files(output_dir):
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_interrupted_saves(output_dir):
            log.info(f"removed {leftover.name}, left by a save that was cut short")
        write_text(output_dir / "config.yaml", to_yaml(config))
    accelerator.wait_for_everyone()


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (and a finished run's closing line) so the log reads as one
    run. A line cut short by a crash is dropped too. The log is replaced whole: a crash here loses nothing."""
    if not path.exists():
        return
    keep = [record for _, record in read_jsonl(path, skip_invalid=True) if record.get("step", math.inf) <= step]
    write_text(path, "".join(json.dumps(record) + "\n" for record in keep))
