"""midtune training app: layer-restricted visual instruction tuning.

    accelerate launch train --config configs/demo/stage_c_middle.yaml [key=value ...]
    python -m train --config ... [key=value ...]          # one process

The recipe, top to bottom: config → accelerator → model → freezing plan (+ LoRA) → backward cut → data →
optimizer and schedule → loop (log, checkpoint) → final delta + merged model → run.json.

Nothing is written to `output_dir` until every input has been checked. Exit codes: 0 done; 2 bad input (config,
layer spec, data, model or checkpoint; one message naming the file, row or key); 1 a checkpoint or the final
model could not be written (a full disk); 3 a non-finite loss; 128 + N stopped by signal N (SIGTERM: 143,
SIGINT: 130) after finishing the step and saving a checkpoint. Whenever a checkpoint exists the command that
resumes the run is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from midtune.adapters import UnsupportedModelError, family_of, set_image_pixels, unwrap
from midtune.checkpoint import (DTYPES, CheckpointError, atomic_dir, attn_implementations, base_hash, load_pretrained,
                                load_with_delta, save_delta)
from midtune.data import IGNORE_INDEX, Collator, DataError, SupervisedDataset
from midtune.spec import FreezePlan, SpecError, TrainableSpec, numel, resolve_layers, resolve_plan
from train.backward_cut import setup_checkpointing
from train.checkpoints import (CheckpointSaveError, all_ranks_ok, checkpoint_dirs, load_checkpoint,
                               remove_interrupted_saves, resolve_resume, save_checkpoint)
from train.config import ConfigError, TrainConfig, load_config, plain, to_dict, to_yaml
from train.memory import Memory

log = logging.getLogger("midtune.train")
RUN_FILES = ("run.json", "metrics.jsonl", "config.yaml", "final", "logs", "analysis")


class UserError(Exception):
    """A problem with the user's input: printed as one clear message, exit code 2."""


class TrainingStopped(Exception):
    """Training stopped before its last step; the message says why. `code` is the exit status."""

    code = 1


class Interrupted(TrainingStopped):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")


class NonFiniteLoss(TrainingStopped):
    code = 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train", description="Layer-restricted visual instruction tuning.")
    ap.add_argument("--config", help="YAML run config (configs/...)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainable.layers=8-23")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        train(config)
    except (ConfigError, SpecError, DataError, CheckpointError, UnsupportedModelError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingStopped, CheckpointSaveError) as e:
        print(e if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
        if checkpoint_dirs(Path(config.output_dir)):
            extra = ["on_nan_loss=skip"] if isinstance(e, NonFiniteLoss) and config.on_nan_loss == "error" else []
            print(f"resume with:\n  {resume_command(args.config, args.overrides, extra)}", file=sys.stderr)
        return getattr(e, "code", 1)
    return 0


def resume_command(config_path: str | None, overrides: list[str], extra: list[str] = ()) -> str:
    """The command that continues this run from its newest complete checkpoint (run from this directory)."""
    replaced = {"resume_from", *(o.partition("=")[0] for o in extra)}
    args = ["--config", config_path] if config_path else []
    args += [o for o in overrides if o.partition("=")[0].strip() not in replaced] + ["resume_from=latest", *extra]
    # Under a launcher (accelerate launch, torchrun) this process cannot see the launcher's own options.
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    program = "accelerate launch <this run's launch options> train" if launched else "python -m train"
    return f"cd {shlex.quote(os.getcwd())} && {program} {shlex.join(args)}"


class NoAnalysis:
    """Stands in for analysis.hook.AnalysisHook when no `analysis.pairs` is set: train then never imports analysis."""

    def poll(self, *args, **kwargs) -> None:
        pass

    def on_save(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


@dataclass
class RunResult:
    summary: dict
    model: torch.nn.Module  # the trained model, unwrapped (LoRA merged when save_merged)
    processor: object


def train(config: TrainConfig) -> RunResult:
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

    started = time.time()
    output_dir = Path(config.output_dir)
    # analysis hook: background geometry profiles of saved checkpoints (analysis/hook.py); checks `analysis.pairs` now.
    # The one place train reaches analysis, and only when an analysis is configured.
    analysis_hook: object = NoAnalysis()
    if config.analysis.pairs is not None:
        from analysis.hook import AnalysisHook, HookSettingsError

        try:
            analysis_hook = AnalysisHook.from_config(config)
        except HookSettingsError as e:
            raise ConfigError(str(e)) from None
    resume_path = check_output_dir(config, output_dir)

    # The accelerator comes first: under ZeRO-3 (zero3_init_flag) from_pretrained then loads partitioned.
    spec = TrainableSpec.from_dict(plain(to_dict(config)["trainable"]))  # spelling checked before any loading
    # Parts that only images reach get no gradient from a text-only micro-batch on one rank, and LLaVA feeds the
    # LLM from vision layer -2, so the last vision layer never gets one: DDP must look for unused parameters.
    image_only_trains = spec.vision_tower not in (False, None, "none") or bool(spec.projector)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision, config.dtype),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum, sync_with_dataloader=False),  # steps span epochs: exact resume arithmetic
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=image_only_trains),
                         *cpu_deepspeed_kwargs()],
    )
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    check_precision(accelerator, config)
    if deepspeed and config.on_nan_loss == "skip":
        raise ConfigError("key 'on_nan_loss': 'skip' is not available under DeepSpeed (its engine applies the update "
                          "inside backward, before a step could be dropped); use 'error'")
    set_seed(config.seed)
    main_process = accelerator.is_main_process
    say = accelerator.print

    # -- model and freezing plan ----------------------------------------------------------------------------
    model, processor = load_pretrained(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                                       attn_implementation=config.attn_implementation)
    pixels = set_image_pixels(processor, config.min_pixels, config.max_pixels)
    if config.method == "lora":
        model = add_lora(model, spec, config)
    plan = resolve_plan(model, spec, adapter_marker="lora_" if config.method == "lora" else None)
    plan.apply(model)
    if not deepspeed:  # DeepSpeed's optimizer keeps its own fp32 master copy of what trains
        keep_trainable_in(model, plan, config.trainable_dtype)
    checkpointed = setup_checkpointing(model, plan, config.gradient_checkpointing)
    model.train()
    say(f"model {config.model} ({plan.model_class}), method {config.method}, world size {accelerator.num_processes}")
    say(plan.table())
    if checkpointed:
        say(f"gradient checkpointing (non-reentrant) on LLM layers {checkpointed[0]}-{checkpointed[-1]}; "
            f"nothing below layer {checkpointed[0]} records a graph")

    # -- data ----------------------------------------------------------------------------------------------
    dataset = SupervisedDataset(
        plain(config.data), processor, image_folder=config.image_folder, max_length=config.max_length,
        on_bad_sample=config.on_bad_sample, on_image_truncation=config.on_image_truncation, split=config.split,
        allow_outside_images=config.allow_outside_images, progress=main_process,
    )
    say(f"data: {dataset.summary}")
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, collate_fn=Collator(pad_id),
        num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=ignore_stop_signals,
    )

    # -- optimizer and schedule ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, plan, config)
    optimizer_groups = [{"name": g["name"], "weight_decay": g["weight_decay"], "lr": g["lr"],
                         "tensors": len(g["params"]), "parameters": sum(numel(p) for p in g["params"])}
                        for g in optimizer.param_groups]
    wrapped = name_fsdp_wrap_classes(getattr(accelerator.state, "fsdp_plugin", None), model)
    if wrapped:
        say(f"FSDP wraps each {', '.join(wrapped)}")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    precision = precision_summary(accelerator, model, plan, config)
    say(f"precision: {precision['line']}")
    micro_per_epoch = len(loader)
    if config.max_steps > 0:
        total_steps = config.max_steps
    else:
        total_steps = max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    warmup = config.optim.warmup_steps or round(config.optim.warmup_ratio * total_steps)
    from transformers import get_scheduler

    # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = get_scheduler(config.optim.scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)

    trainable_names = sorted(plan.trainable_names)
    step, resumed_state = 0, {}
    if resume_path is not None:
        resumed_state = load_checkpoint(accelerator, model, optimizer, scheduler, resume_path, trainable_names)
        step = resumed_state["step"]
        say(f"resumed from {resume_path} at step {step}")

    # -- every input checked: now the run directory is written ----------------------------------------------
    start_output_dir(accelerator, config, output_dir, resume_path)
    samples_path = output_dir / f"samples-rank{accelerator.process_index}.jsonl"
    if main_process:
        truncate_log(output_dir / "metrics.jsonl", step)
    if config.record_samples:
        truncate_log(samples_path, step)
    if config.report_to:
        accelerator.init_trackers(config.run_name or output_dir.name, config=flat_hparams(to_dict(config)))

    # -- loop -----------------------------------------------------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    skipped_steps: list[dict] = list(resumed_state.get("skipped_steps", []))  # dropped for a non-finite loss
    loss_scaled = accelerator.mixed_precision == "fp16"  # accelerate's GradScaler or DeepSpeed's loss scaler
    overflow_steps = int(resumed_state.get("overflow_steps", 0))  # fp16 updates the scaler skipped
    micro = (step + len(skipped_steps)) * config.grad_accum  # micro-batches this rank has consumed
    epoch, skip = divmod(micro, micro_per_epoch)
    step_times: list[float] = []
    tokens_total = 0
    losses: list[float] = []
    window: list[tuple[list[str], torch.Tensor]] = []  # this optimizer step's micro-batches: sample ids, loss
    window_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    saved_step = step if resume_path is not None else None

    def checkpoint(at_step: int) -> Path:
        nonlocal saved_step
        path = save_checkpoint(accelerator, model, optimizer, scheduler, trainable_names, output_dir, at_step,
                               {"step": at_step, "epoch": epoch, "loss": losses[-1] if losses else None,
                                "skipped_steps": skipped_steps, "overflow_steps": overflow_steps},
                               config.save_total_limit)
        saved_step = at_step
        return path

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, disable=not main_process, desc="train", unit="step")
    memory = Memory(str(accelerator.device))
    memory.mark()  # what the loop adds to the loaded model: gradients, optimizer state, activations
    step_start = time.perf_counter()
    metrics_file = open(output_dir / "metrics.jsonl", "a") if main_process else None
    samples_file = open(samples_path, "a") if config.record_samples else None
    stop = StopSignals(announce=main_process).install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for batch in batches:
                sample_ids = batch.pop("sample_ids")
                with accelerator.accumulate(model):
                    loss = causal_lm_loss(model, batch, config.logits_at_labels)
                    window.append((sample_ids, loss.detach()))
                    # DeepSpeed's engine updates inside backward: a bad loss must be caught before it
                    if deepspeed and not all_ranks_ok(accelerator, bool(torch.isfinite(loss))):
                        raise nonfinite_error(accelerator, config, dataset, window, step, output_dir, skipped_steps)
                    accelerator.backward(loss)
                    window_tokens += batch["attention_mask"].sum()
                    if accelerator.sync_gradients:
                        # the reduced loss is NaN on every rank if it is on one: all ranks take the same branch
                        step_loss = accelerator.reduce(sum(l for _, l in window) / config.grad_accum, "mean").item()
                        max_norm = config.optim.max_grad_norm or float("inf")  # inf: measure, do not clip
                        grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
                        grad = float(grad_norm) if grad_norm is not None else float("nan")
                        finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad))
                        overflow = False
                        if loss_scaled:
                            # fp16: an inf/NaN gradient is the loss scaler's to handle. Its step skips the update
                            # and lowers the scale (normal while it calibrates); without that call it never would.
                            scale = loss_scale(accelerator)
                            optimizer.step()
                            overflow = math.isfinite(step_loss) and scaler_skipped(accelerator, scale)
                        elif finite:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)  # a non-finite step's gradients are dropped here
                if not accelerator.sync_gradients:
                    continue

                if not finite and not overflow:  # no update; raises under on_nan_loss=error or past max_nan_skips
                    skipped_steps.append(
                        nonfinite_skip(accelerator, config, dataset, window, step, output_dir, skipped_steps))
                    window = []
                    window_tokens.zero_()
                    continue
                step += 1
                lr = scheduler.get_last_lr()[0]
                if overflow:  # the scaler skipped this update: the schedule waits for the next real one
                    overflow_steps += 1
                else:
                    scheduler.step()
                step_tokens = int(accelerator.reduce(window_tokens, "sum").item())
                step_samples = [i for ids, _ in window for i in ids]
                window = []
                window_tokens.zero_()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                step_times.append(now - step_start)
                step_start = now
                tokens_total += step_tokens
                losses.append(step_loss)
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad,
                          "step_time": step_times[-1], "tokens": step_tokens, "epoch": epoch}
                if loss_scaled:
                    record.update(loss_scale=loss_scale(accelerator), skipped_by_scaler=overflow)
                if main_process and (step % config.logging_steps == 0 or step == total_steps):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if config.report_to and step % config.logging_steps == 0:
                    accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad,
                                     "train/step_time": step_times[-1]}, step=step)
                if samples_file:
                    samples_file.write(json.dumps({"step": step, "samples": step_samples}) + "\n")
                    samples_file.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                analysis_hook.poll(accelerator)  # analysis hook: log finished profiles (non-blocking)
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    checkpoint(step)
                    analysis_hook.on_save(step, output_dir / f"checkpoint-{step}", accelerator)  # analysis hook
                if step < total_steps and not all_ranks_ok(accelerator, stop.received is None):
                    path = output_dir / f"checkpoint-{step}" if saved_step == step else checkpoint(step)
                    raise Interrupted(stop.received or signal.SIGTERM, step, path)
                if step >= total_steps:
                    break
            epoch += 1
        progress.close()
        training_memory_mb = (memory.peak() - memory.base) / 2**20
        if samples_file:
            checksum = weights_checksum(model, trainable_names, accelerator)
            samples_file.write(json.dumps({"final_weights": checksum}) + "\n")

        # -- final outputs --------------------------------------------------------------------------------
        checkpoint(step)
        analysis_hook.on_save(step, output_dir / f"checkpoint-{step}", accelerator, final=True)  # analysis hook
        final = save_final(accelerator, model, processor, plan, config, output_dir)
    except (TrainingStopped, CheckpointSaveError):
        progress.close()
        analysis_hook.finish(accelerator, timeout=0)  # stop background profiles: the checkpoint is what counts
        accelerator.end_training()
        raise
    finally:
        stop.restore()
        for f in (metrics_file, samples_file):
            if f:
                f.close()
    wall = time.time() - started
    summary = {
        "config": to_dict(config),
        "plan": plan.to_dict(),
        "freezing_table": plan.table(),
        "parameters": {"trainable": plan.num_trainable, "total": plan.num_total},
        "optimizer_groups": optimizer_groups,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name,
        "mixed_precision": accelerator.mixed_precision,
        "precision": precision,
        "attn_implementation": attn_implementations(accelerator.unwrap_model(model)),
        "image_pixels": pixels,  # Qwen2-VL/2.5-VL's pixel budget per image; null for fixed-size families
        "device": str(accelerator.device),
        "gradient_checkpointing_layers": checkpointed,
        "data": dataset.summary.to_dict(),
        "steps": step,
        "steps_this_session": len(step_times),
        "skipped_steps": skipped_steps,
        "fp16_overflow_steps": overflow_steps if loss_scaled else None,
        "resumed_from": str(resume_path) if resume_path else None,
        "final_loss": losses[-1] if losses else None,
        "wall_time_s": wall,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "tokens_per_s": tokens_total / sum(step_times) if step_times else None,
        "peak_memory_mb": peak_memory_mb(),
        "peak_training_memory_mb": training_memory_mb,  # peak above the loaded model, during the loop
        "final": str(final),
        "versions": versions(),
    }
    if main_process:
        (output_dir / "run.json").write_text(json.dumps(summary, indent=2))
        final_loss = f"{summary['final_loss']:.4f}" if losses else "—"
        median = f"{summary['median_step_time_s']:.3f}s" if step_times else "—"
        say(f"done: {step} steps in {wall:.1f}s, final loss {final_loss}, median step {median} → {final}")
    analysis_hook.finish(accelerator)  # analysis hook: wait (analysis.timeout) for outstanding profiles
    accelerator.end_training()
    return RunResult(summary, accelerator.unwrap_model(model), processor)


# ---------------------------------------------------------------------------------------------------------
# Faults: signals and non-finite losses
# ---------------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and SIGINT while training only set `received`: the loop finishes its step, saves a checkpoint and
    stops. A second signal gets the previous handler (Ctrl-C twice stops at once; saves are atomic either way)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool):
        self.announce = announce
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
        if self.announce:
            name = signal.Signals(signum).name
            print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again stops at once)",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
        self.previous = {}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which still needs them to finish the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def nonfinite_skip(accelerator, config: TrainConfig, dataset, window, step: int, output_dir: Path,
                   skipped_steps: list[dict]) -> dict:
    """The record of a dropped optimizer step, or NonFiniteLoss under on_nan_loss=error or past max_nan_skips."""
    if config.on_nan_loss == "error" or len(skipped_steps) >= config.max_nan_skips:
        raise nonfinite_error(accelerator, config, dataset, window, step, output_dir, skipped_steps)
    ids, what = offending_samples(accelerator, window)
    log.warning(f"non-finite {what} in step {step + 1}: dropped the step (no update), samples "
                f"{describe_samples(dataset, ids)} ({len(skipped_steps) + 1} of at most {config.max_nan_skips})")
    return {"after_step": step, "samples": ids}


def nonfinite_error(accelerator, config: TrainConfig, dataset, window, step: int, output_dir: Path,
                    skipped_steps: list[dict]) -> NonFiniteLoss:
    ids, what = offending_samples(accelerator, window)
    checkpoints = checkpoint_dirs(output_dir)
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint had been saved yet"
    why = (f"already dropped {len(skipped_steps)} step(s), max_nan_skips={config.max_nan_skips}"
           if config.on_nan_loss == "skip" else "on_nan_loss=error; 'skip' drops such steps")
    return NonFiniteLoss(f"non-finite {what} in step {step + 1}, on the batch of samples "
                         f"{describe_samples(dataset, ids)}: stopped before updating the weights ({why}); "
                         f"nothing was saved from this step and {kept}")


def offending_samples(accelerator, window) -> tuple[list[str], str]:
    """Sample ids of the micro-batches whose loss is not finite, from every rank; ('loss' or 'gradient norm')."""
    from accelerate.utils import gather_object

    local = [i for ids, loss in window if not torch.isfinite(loss) for i in ids]
    if accelerator.num_processes > 1:
        local = gather_object(local)
    if local:
        return local, "loss"
    everything = [i for ids, _ in window for i in ids]  # finite losses, non-finite gradients: the whole step
    return gather_object(everything) if accelerator.num_processes > 1 else everything, "gradient norm"


def describe_samples(dataset, ids: list[str], limit: int = 8) -> str:
    where = {}
    for sample in dataset.samples:
        where.setdefault(sample.id, f"{sample.source} row {sample.row}")
    shown = [f"{i!r} ({where[i]})" if i in where else repr(i) for i in ids[:limit]]
    return ", ".join(shown) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Pieces of the recipe
# ---------------------------------------------------------------------------------------------------------


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
        (output_dir / "config.yaml").write_text(to_yaml(config))
    accelerator.wait_for_everyone()


def add_lora(model, spec: TrainableSpec, config: TrainConfig):
    """LoRA adapters on the selected LLM layers only, addressed through the language model's own layer list
    (a name-suffix match would also catch vision layers with the same index)."""
    import re

    from peft import LoraConfig, get_peft_model

    parts = family_of(model).parts(model)
    layers = resolve_layers(spec.layers, parts.num_layers)
    targets = "|".join(re.escape(t) for t in config.lora.target_modules)
    pattern = rf"{re.escape(parts.language_layers_path)}\.({'|'.join(map(str, layers))})\.(.*\.)?({targets})"
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=pattern, bias="none")
    model = get_peft_model(model, lora)
    return model


def lora_config_dict(model) -> dict:
    cfg = model.peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules),
            "bias": cfg.bias}


def component_of(row_name: str) -> str:
    if row_name.startswith("vision_tower"):
        return "vision"
    if row_name in ("embeddings", "lm_head"):
        return "embeddings"
    if row_name == "projector":
        return "projector"
    return "llm"


def build_optimizer(model, plan: FreezePlan, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only, grouped by component learning rate and by weight decay
    (none on norms and biases)."""
    opt = config.optim
    lrs = {"llm": opt.lr, "projector": opt.projector_lr, "vision": opt.vision_lr, "embeddings": opt.embeddings_lr}
    owner = {name: component_of(row.name) for row in plan.rows for name in row.names}
    exempt = no_decay_names(unwrap(model))
    groups: dict[tuple[str, bool], list] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((owner[name], name in exempt), []).append(p)
    param_groups = [
        {"params": params, "lr": lrs[component] if lrs[component] is not None else opt.lr,
         "weight_decay": 0.0 if no_decay else opt.weight_decay, "name": f"{component}{'/no_decay' if no_decay else ''}"}
        for (component, no_decay), params in sorted(groups.items())
    ]
    fused = opt.fused
    if fused is None:  # fused AdamW is several times faster than the per-parameter loop, CPU included
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused)


def causal_lm_loss(model, batch: dict, at_labels: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, as the model's own loss computes it.

    With `at_labels`, the LM head runs only at the positions that predict a label in some row of the batch
    (transformers' `logits_to_keep` with an index tensor), not at every position: image tokens, prompts and
    padding carry no label, and a [tokens × vocabulary] logits tensor is the largest activation of a VLM step
    (Qwen2.5-VL: 152k × 4 bytes per token)."""
    if not at_labels:
        return model(**batch, use_cache=False).loss  # no KV cache while training
    labels = batch["labels"]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    kept = targets[:, keep]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (kept != IGNORE_INDEX).sum()


def no_decay_names(model) -> set[str]:
    """Parameters weight decay must not touch: biases, normalisation weights and other vectors (CLIP's class
    embedding). Decided by the owning module's role and the parameter's real shape: under ZeRO-3 every parameter
    is a 1-element stand-in (shape [0] or [1]), so `p.ndim < 2` would exempt all of them and weight decay would
    silently never apply."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)) or \
            type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))
        for pname, p in module.named_parameters(recurse=False):
            shape = getattr(p, "ds_shape", None) or p.shape
            if is_norm or pname == "bias" or len(shape) < 2:
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


def keep_trainable_in(model, plan: FreezePlan, dtype_name: str) -> None:
    """Cast only what trains to `dtype_name` (float32: the master weights AdamW updates, so steps of lr 1e-5
    are not rounded away by bf16's 8-bit mantissa); frozen tensors stay in the loaded dtype, at half the bytes."""
    target = DTYPES[dtype_name]
    params = dict(unwrap(model).named_parameters())
    for name in plan.trainable_names:
        p = params[name]
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def check_precision(accelerator, config: TrainConfig) -> None:
    """Refuse precisions that would not do what they say on this machine."""
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if accelerator.mixed_precision == "fp16" and not deepspeed and accelerator.scaler is None:
        raise ConfigError("key 'mixed_precision': fp16 needs a GPU here: on the CPU accelerate runs neither fp16 "
                          "autocast nor loss scaling; use bf16 or no")
    mixed = config.dtype != config.trainable_dtype
    if accelerator.distributed_type.name == "FSDP" and mixed:
        raise ConfigError(f"keys 'dtype'/'trainable_dtype': under FSDP load the weights in the dtype they train in "
                          f"(FSDP shards flat groups of one dtype); set dtype={config.trainable_dtype} (FSDP's mixed "
                          f"precision then computes in {accelerator.mixed_precision}), or trainable_dtype={config.dtype}")
    if config.trainable_dtype != "float32":
        log.warning(f"trainable_dtype={config.trainable_dtype}: AdamW updates {config.trainable_dtype} weights "
                    f"directly (no float32 master weights); updates below the dtype's resolution are lost")


def precision_summary(accelerator, model, plan: FreezePlan, config: TrainConfig) -> dict:
    """The dtypes in effect after prepare(): weights of frozen and trainable tensors (elements and bytes per
    dtype), the autocast dtype and where the master weights live."""
    trainable = set(plan.trainable_names)
    weights: dict[str, dict[str, dict[str, int]]] = {"trainable": {}, "frozen": {}}
    for name, p in unwrap(accelerator.unwrap_model(model)).named_parameters():
        kind = "trainable" if name in trainable else "frozen"
        entry = weights[kind].setdefault(str(p.dtype).removeprefix("torch."), {"parameters": 0, "bytes": 0})
        entry["parameters"] += numel(p)
        entry["bytes"] += numel(p) * p.element_size()
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(accelerator.mixed_precision)
    if accelerator.distributed_type.name == "DEEPSPEED":
        master = "float32 (DeepSpeed's optimizer)"
    else:
        master = "/".join(weights["trainable"]) or None
    line = (f"frozen {'/'.join(weights['frozen']) or '—'}, trainable {'/'.join(weights['trainable']) or '—'}, "
            f"master weights {master}, autocast {autocast or 'off'}")
    return {"dtype": config.dtype, "trainable_dtype": config.trainable_dtype, "autocast": autocast,
            "master_weights": master, "weights": weights, "line": line}


def loss_scale(accelerator) -> float | None:
    scaler = accelerator.scaler
    if scaler is not None:
        return float(scaler.get_scale())
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    optimizer = getattr(getattr(engine, "engine", None), "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None) or getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def scaler_skipped(accelerator, scale_before: float | None) -> bool:
    """Whether the loss scaler skipped the last update. A GradScaler lowers its scale exactly when it skips
    (accelerate's own flag misses skips inside fused AdamW, which applies the scaler's inf check itself);
    DeepSpeed reports its overflow."""
    if accelerator.scaler is not None:
        return float(accelerator.scaler.get_scale()) < scale_before
    return accelerator.optimizer_step_was_skipped


def cpu_deepspeed_kwargs() -> list:
    """DeepSpeed on a machine without GPUs: accelerate finds no process-group backend for DeepSpeed's CPU
    accelerator and then counts one process, while DeepSpeed itself forms the full world (each of 2 ranks
    reported num_processes == 1 and the batch-size check failed). Naming gloo makes both agree."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def name_fsdp_wrap_classes(plugin, model) -> list[str] | None:
    """FSDP's transformer-based wrap needs the layer classes to shard by. Unless the accelerate config names them
    (fsdp_transformer_layer_cls_to_wrap), accelerate takes the model's `_no_split_modules`, which for LLaVA in
    transformers 5 lists CLIPTextEmbeddings, a class a vision-only tower does not have, and prepare() fails
    ("Could not find the transformer layer class CLIPTextEmbeddings in the model", the first FSDP2 run, on an
    H200). midtune names the classes of the LLM's decoder layers and the vision tower's layers, from the adapter
    table. Returns the names it set, or None where it left the plugin alone."""
    if plugin is None or plugin.transformer_cls_names_to_wrap:
        return None
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy:
        return None
    parts = family_of(model).parts(model)
    names = list(dict.fromkeys(type(layer).__name__ for layer in [*parts.language_layers, *parts.vision_layers]))
    plugin.transformer_cls_names_to_wrap = names
    return names


def resolve_mixed_precision(value: str, dtype: str = "float32") -> str:
    """auto: the weights' own low precision when loaded in one; for float32 weights bf16 where the GPU has it."""
    if value != "auto":
        return value
    if dtype in ("bfloat16", "float16"):
        return {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def save_final(accelerator, model, processor, plan: FreezePlan, config: TrainConfig, output_dir: Path) -> Path:
    """final/: delta.safetensors (only the trained tensors, with the base's name and hash) and, unless
    save_merged is false, a merged Hugging Face directory beside it that vanilla transformers loads."""
    final = output_dir / "final"
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; plain state dict otherwise
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    unwrapped = accelerator.unwrap_model(model)
    lora = config.method == "lora"
    if lora:
        from peft import get_peft_model_state_dict

        delta = dict(get_peft_model_state_dict(unwrapped))
        params = dict(unwrapped.get_base_model().named_parameters())
        delta.update({n: params[n] for n in plan.trainable_names if "lora_" not in n})
    else:
        prefix = "module." if any(k.startswith("module.") for k in state) else ""
        delta = {n: state[prefix + n] for n in plan.trainable_names}
    # final/ holds the model in the dtype it was loaded in (the float32 master weights stay in the checkpoint):
    # base + delta then rebuilds exactly the merged model, and a bf16 base gives a bf16 model.
    dtype = DTYPES[config.dtype]
    delta = {n: t.to(dtype) if t.is_floating_point() else t for n, t in delta.items()}
    try:
        with atomic_dir(final) as tmp:
            save_delta(tmp / "delta.safetensors", delta, base_model=config.model, base_hash=base_hash(config.model),
                       method=config.method, trainable=plan.spec.to_dict(),
                       lora_config=lora_config_dict(unwrapped) if lora else None)
            if config.save_merged and zero3_enabled():
                # The ZeRO-3 model holds only partitions; rebuild base + delta on this process, as train.export
                # does (saving the gathered state through the ZeRO-3-loaded model wrote non-standard key names).
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                merged, _ = load_with_delta(config.model, tmp / "delta.safetensors", dtype=config.dtype,
                                            trust_remote_code=config.trust_remote_code, verify_base=False)
                merged.save_pretrained(tmp, safe_serialization=True)
                processor.save_pretrained(tmp)
            elif config.save_merged:
                merged = unwrapped.merge_and_unload().to(dtype) if lora else unwrapped
                merged.save_pretrained(tmp, safe_serialization=True, state_dict=None if lora else {
                    k[len(prefix):]: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
                processor.save_pretrained(tmp)
    except OSError as e:  # atomic_dir has removed its temporary directory; an earlier final/ is untouched
        raise CheckpointSaveError(f"could not write {final}: {e.strerror or e}; nothing half-written was left, and "
                                  f"the last checkpoint holds the trained weights (resume_from=latest writes final/ "
                                  f"again)") from e
    return final


def weights_checksum(model, names: list[str], accelerator) -> str:
    """sha256 of the trainable tensors, in float32. Under ZeRO-3 each rank holds only a partition, so they are
    gathered first (a collective: every rank calls this); hashing the stand-ins would hash empty tensors."""
    import contextlib
    import hashlib

    params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
    gathered = contextlib.nullcontext()
    if zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None)
    digest = hashlib.sha256()
    with gathered:
        for name in names:
            digest.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (and a finished run's closing line) so the log reads as one
    run. A line cut short by a crash is dropped too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", math.inf) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars only."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def versions() -> dict:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


if __name__ == "__main__":
    sys.exit(main())
