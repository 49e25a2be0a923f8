"""Geometry profiles of a run's checkpoints while it trains (the `analysis:` section of a training config).

    analysis:
      pairs: runs/world/pairs.jsonl   # off when null
      image_folder: null               # default <pairs dir>/images
      every: save                      # save: profile every checkpoint save; final: only the last one
      max_pairs: 200                   # the first N pairs
      k: 30                            # neighbours (needs max_pairs >= k + 2)
      label: dominant_color
      device: cpu                      # where the profile runs (cpu keeps the GPUs to training; auto/cuda:N)
      batch_size: 8
      timeout: 1800                    # seconds to wait for outstanding profiles when training ends

Each time a checkpoint is saved, the main process hard-links the checkpoint's `trainable.safetensors` into
`output_dir/analysis/step-<S>/` (so checkpoint rotation cannot delete it first) and starts
`python -m analysis profile --model step-<S>=<that file> --base <config.model> ...` as a background process at
lower CPU priority (nice 10), one at a time (later saves queue). The training loop calls `poll()` every step: a cheap
non-blocking check; a finished profile's per-layer metrics go to `metrics.jsonl` as
`{"step": S, "analysis": {metric: [value per hidden-state index]}}` and to the trackers as
`analysis/<metric>/layer_<l>` at step S. `finish()` waits for what is outstanding (up to `timeout`, then stops it).
The profile's own files stay in `analysis/step-<S>/` (profiles.json/csv, profile.png, profile.log); the extracted
vectors and the link are deleted once it is done. LoRA checkpoints are merged with scale alpha / r. DeepSpeed/FSDP
checkpoints hold no `trainable.safetensors` and are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("midtune.analysis")
EVERY = ("save", "final")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Job:
    step: int
    dir: Path
    command: list[str]
    proc: subprocess.Popen | None = None
    log_file: object = None


class HookSettingsError(ValueError):
    """A bad `analysis:` section of a training config. Its own class, so that analysis never imports train."""


class AnalysisHook:
    """Background profiles of saved checkpoints; every method is a no-op when `analysis.pairs` is unset."""

    def __init__(self, config=None):
        self.config = config
        self.enabled = config is not None and config.analysis.pairs is not None
        self.queue: deque[_Job] = deque()
        self.running: _Job | None = None
        self.results: dict[int, dict] = {}  # step → {metric: [per layer]}
        self._warned = False

    @classmethod
    def from_config(cls, config) -> "AnalysisHook":
        """Checks the `analysis` section (pairs file, images, labels, enough pairs for k) before training starts.
        Raises HookSettingsError naming the key (train reports it as a config error)."""
        from analysis.extract import AnalysisError, read_pairs
        from analysis.profile import ProfileSettings

        a = config.analysis
        if a.pairs is None:
            return cls(None)
        if a.every not in EVERY:
            raise HookSettingsError(f"key 'analysis.every': {a.every!r} is not one of {', '.join(map(repr, EVERY))}")
        from analysis.extract import PROTOCOLS

        if a.protocol not in PROTOCOLS:
            raise HookSettingsError(f"key 'analysis.protocol': {a.protocol!r} is not one of "
                                    f"{', '.join(map(repr, PROTOCOLS))}")
        for key in ("max_pairs", "k", "batch_size"):
            if getattr(a, key) < 1:
                raise HookSettingsError(f"key 'analysis.{key}': must be >= 1, got {getattr(a, key)}")
        try:
            pairs = read_pairs(a.pairs, a.image_folder, label=a.label, max_pairs=a.max_pairs,
                               allow_outside_images=config.allow_outside_images,
                               need_question=a.protocol == "authors")
            ProfileSettings(k=a.k).check(len(pairs))
        except AnalysisError as e:
            raise HookSettingsError(f"key 'analysis.pairs': {e}") from None
        return cls(config)

    # -- the three calls from the training loop ----------------------------------------------------------------
    def on_save(self, step: int, checkpoint: Path, accelerator, final: bool = False) -> None:
        """Queue a profile of `checkpoint` (main process only; returns at once)."""
        if not self.enabled or not accelerator.is_main_process or (self.config.analysis.every == "final" and not final):
            return
        source = Path(checkpoint) / "trainable.safetensors"
        if not source.is_file():
            if not self._warned:
                log.warning(f"analysis: {checkpoint} has no trainable.safetensors (DeepSpeed/FSDP checkpoints keep "
                            f"the engine's own state); checkpoints of this run are not profiled")
                self._warned = True
            return
        out = Path(self.config.output_dir) / "analysis" / f"step-{step}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        link = out / "trainable.safetensors"
        try:
            os.link(source, link)  # survives save_total_limit deleting the checkpoint; costs nothing
        except OSError:
            shutil.copy2(source, link)
        self.queue.append(_Job(step, out, self._command(step, link, out)))
        self._start_next()

    def poll(self, accelerator) -> None:
        """Log any finished profile and start the next queued one; never blocks."""
        if not self.enabled or self.running is None:
            return
        if self.running.proc.poll() is not None:
            self._collect(accelerator)
            self._start_next()

    def finish(self, accelerator, timeout: float | None = None) -> None:
        """Wait (up to `analysis.timeout` seconds in all) for outstanding profiles and log them."""
        if not self.enabled or not accelerator.is_main_process:
            return
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.analysis.timeout)
        while self.running is not None:
            try:
                self.running.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pending = [self.running.step] + [j.step for j in self.queue]
                log.warning(f"analysis: profiles of steps {pending} did not finish within the timeout; stopped")
                self.running.proc.kill()
                self.running.proc.wait()
                self.running.log_file.close()
                self.running, self.queue = None, deque()
                return
            self._collect(accelerator)
            self._start_next()

    # -- internals -----------------------------------------------------------------------------------------------
    def _command(self, step: int, trainable: Path, out: Path) -> list[str]:
        c, a = self.config, self.config.analysis
        cmd = [sys.executable, "-m", "analysis", "profile", "--model", f"step-{step}={trainable}",
               "--base", str(c.model), "--pairs", str(a.pairs), "--out", str(out), "--k", str(a.k),
               "--label", a.label, "--max-pairs", str(a.max_pairs), "--batch-size", str(a.batch_size),
               "--device", a.device, "--dtype", c.dtype, "--protocol", a.protocol, "--no-progress", "--nice", "10"]
        if a.image_folder is not None:
            cmd += ["--image-folder", str(a.image_folder)]
        if c.method == "lora":
            cmd += ["--lora-scale", repr(c.lora.alpha / c.lora.r)]
        if c.trust_remote_code:
            cmd.append("--trust-remote-code")
        if c.allow_outside_images:
            cmd.append("--allow-outside-images")
        return cmd

    def _start_next(self) -> None:
        if self.running is not None or not self.queue:
            return
        job = self.queue.popleft()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ACCELERATE_", "DEEPSPEED_")) and k not in
               ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
        # Run in the trainer's working directory (relative config paths keep their meaning), importing from here.
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if self.config.analysis.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        job.log_file = open(job.dir / "profile.log", "w")
        job.proc = subprocess.Popen(job.command, env=env, stdout=job.log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.running = job

    def _collect(self, accelerator) -> None:
        job, self.running = self.running, None
        job.log_file.close()
        (job.dir / "trainable.safetensors").unlink(missing_ok=True)
        shutil.rmtree(job.dir / "extract", ignore_errors=True)
        if job.proc.returncode != 0:
            tail = (job.dir / "profile.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            log.warning(f"analysis: profile of step {job.step} failed (exit {job.proc.returncode}): {tail[0]} "
                        f"— see {job.dir / 'profile.log'}")
            return
        from analysis.profile import METRICS, read_profiles

        doc = read_profiles(job.dir / "profiles.json")
        per_layer = next(iter(doc["profiles"].values()))
        layers = sorted(per_layer)
        metrics = {m: [_finite(per_layer[layer][m]) for layer in layers] for m in METRICS}
        self.results[job.step] = metrics
        with open(Path(self.config.output_dir) / "metrics.jsonl", "a") as fh:  # O_APPEND: whole lines
            fh.write(json.dumps({"step": job.step, "analysis": metrics}) + "\n")
        if self.config.report_to:
            values = {f"analysis/{m}/layer_{layer}": v for m, vs in metrics.items()
                      for layer, v in zip(layers, vs) if v is not None}
            accelerator.log(values, step=job.step)


def _finite(v: float):
    return v if v is not None and math.isfinite(v) else None
