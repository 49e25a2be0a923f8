"""The training recipe: layer-restricted visual instruction tuning, read top to bottom.

    Recipe(config).run()  =  setup()  →  train()  →  save()

setup()  accelerator → model → freezing plan (+ LoRA) → activation checkpointing from the first trainable layer
         → data → optimizer and schedule → resume → the run directory (written only now: every input is checked)
train()  the loop: micro-batches accumulate into optimizer steps; each step is logged, checkpointed every
         `save_steps`, and a SIGTERM/SIGINT finishes the step, checkpoints and stops
save()   the last checkpoint, final/ (delta + merged model), run.json

Where things are decided: which tensors train — midtune/spec.py (`resolve_plan` → `FreezePlan.apply`, which sets
`requires_grad`); where the backward graph starts — train/activation_checkpointing.py; the loss —
train/loss.py; the optimizer's groups — train/optimizer.py; precision — train/precision.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from midtune.adapters import set_image_pixels
from midtune.checkpoint import attn_implementations, load_pretrained
from midtune.data import Collator, LengthGroupedSampler, SupervisedDataset, conversation_template, dummy_image_inputs
from midtune.files import cache_dir, write_json
from midtune.images import image_aspect_ratio, set_image_aspect_ratio
from midtune.spec import TrainableSpec, numel, resolve_plan
from train.activation_checkpointing import setup_checkpointing
from train.checkpoints import (
    CheckpointSaveError,
    all_ranks_ok,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_final,
)
from train.config import ConfigError, TrainConfig, derive_grad_accum, plain, to_dict
from train.distributed import (
    check_process_group,
    cpu_deepspeed_kwargs,
    name_fsdp_wrap_classes,
    set_deepspeed_clipping,
    weights_checksum,
)
from train.lora import add_lora
from train.loss import labelled_tokens, summed_lm_loss
from train.memory import Memory
from train.optimizer import build_optimizer, keep_trainable_in
from train.precision import (
    check_precision,
    loss_scale,
    precision_summary,
    resolve_mixed_precision,
    scaler_skipped,
)
from train.run_dir import check_output_dir, start_output_dir, truncate_log
from train.stopping import (
    Interrupted,
    StopSignals,
    TrainingStopped,
    ignore_stop_signals,
    nonfinite_error,
    nonfinite_skip,
)

log = logging.getLogger("midtune.train")


@dataclass
class RunResult:
    summary: dict
    model: torch.nn.Module  # the trained model, unwrapped (LoRA merged when save_merged)
    processor: object


@dataclass
class TrainState:
    """Where the run is; the first five fields are what a checkpoint saves and a resume restores."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    skipped_steps: list[dict] = field(default_factory=list)  # dropped for a non-finite loss
    overflow_steps: int = 0  # fp16 updates the loss scaler skipped
    saved_step: int | None = None  # the step of the newest checkpoint
    losses: list[float] = field(default_factory=list)  # this session's, per optimizer step
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0  # real (attention-mask) tokens this session
    positions: int = 0  # padded batch positions this session: 1 - tokens / positions is the padding fraction


@dataclass
class Update:
    """One optimizer step's outcome, before it is counted."""

    loss: float  # the step's loss over its micro-batches and ranks, normalised as loss_normalization says
    grad_norm: float
    finite: bool  # loss and gradient norm finite
    overflow: bool  # fp16: the loss scaler skipped the update


class NoAnalysis:
    """Stands in for analysis.hook.AnalysisHook when no `analysis.pairs` is set: train then never imports analysis."""

    def poll(self, *args, **kwargs) -> None:
        pass

    def on_save(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


def train(config: TrainConfig) -> RunResult:
    return Recipe(config).run()


class Recipe:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.started = time.time()
        self.state = TrainState()

    def run(self) -> RunResult:
        self.setup()
        stop = StopSignals(announce=self.main_process).install()  # SIGTERM/SIGINT: finish the step, checkpoint
        try:
            self.train(stop)
            summary = self.save()
        except (TrainingStopped, CheckpointSaveError):
            self.analysis.finish(self.accelerator, timeout=0)  # stop background profiles: the checkpoint counts
            self.accelerator.end_training()
            raise
        finally:
            stop.restore()
            self.close_logs()
        self.analysis.finish(self.accelerator)  # wait (analysis.timeout) for outstanding profiles
        self.accelerator.end_training()
        return RunResult(summary, self.accelerator.unwrap_model(self.model), self.processor)

    # -- setup ----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything that can refuse the run, then the run directory. Nothing is written before the last check."""
        self.analysis = self.setup_analysis_hook()
        self.resume_path = check_output_dir(self.config, self.output_dir)
        self.setup_accelerator()
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        if self.resume_path is not None:
            self.resume()
        self.start_run_dir()

    def setup_analysis_hook(self):
        """Background geometry profiles of saved checkpoints (analysis/hook.py), checked now. The one place train
        reaches analysis, and only when an analysis is configured."""
        if self.config.analysis.pairs is None:
            return NoAnalysis()
        from analysis.hook import AnalysisHook, HookSettingsError

        try:
            return AnalysisHook.from_config(self.config)
        except HookSettingsError as e:
            raise ConfigError(str(e)) from None

    def setup_accelerator(self) -> None:
        """The accelerator comes first: under ZeRO-3 (zero3_init_flag) from_pretrained then loads partitioned."""
        from accelerate import (
            Accelerator,
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
        )
        from accelerate.utils import (
            GradientAccumulationPlugin,
            ProjectConfiguration,
            set_seed,
        )

        c = self.config
        self.spec = TrainableSpec.from_dict(plain(to_dict(c)["trainable"]))  # spelling checked before loading
        launched_world = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher set up; checked below
        derive_grad_accum(c, launched_world)
        # Parts only images reach get no gradient from a text-only micro-batch on one rank, and LLaVA feeds the LLM
        # from vision layer -2, so the last vision layer never gets one: DDP must look for unused parameters.
        image_only_trains = self.spec.vision_tower not in (False, None, "none") or bool(self.spec.projector)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(c.mixed_precision, c.dtype),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=c.grad_accum, sync_with_dataloader=False),  # steps span epochs: exact resume arithmetic
            log_with=c.report_to or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=image_only_trains),
                             *cpu_deepspeed_kwargs()],
        )
        check_process_group(self.accelerator.num_processes)
        if c.global_batch_size is not None and self.accelerator.num_processes != launched_world:
            raise ConfigError(f"key 'global_batch_size': derived for WORLD_SIZE={launched_world}, but the job has "
                              f"{self.accelerator.num_processes} processes")
        self.deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        if self.deepspeed:
            set_deepspeed_clipping(self.accelerator, c.optim.max_grad_norm)
        check_precision(self.accelerator, c)
        if self.deepspeed and c.on_nan_loss == "skip":
            raise ConfigError("key 'on_nan_loss': 'skip' is not available under DeepSpeed (its engine applies the "
                              "update inside backward, before a step could be dropped); use 'error'")
        set_seed(c.seed)
        self.main_process = self.accelerator.is_main_process
        self.say = self.accelerator.print

    def setup_model(self) -> None:
        """Load the model, decide what trains (the freezing plan) and cut the backward graph below it."""
        c = self.config
        model, self.processor = load_pretrained(c.model, dtype=c.dtype, trust_remote_code=c.trust_remote_code,
                                                attn_implementation=c.attn_implementation)
        self.image_pixels = set_image_pixels(self.processor, c.min_pixels, c.max_pixels)
        if c.image_aspect_ratio is not None:  # saved with the trained model's processor and in its delta
            set_image_aspect_ratio(self.processor, c.image_aspect_ratio)
        if c.method == "lora":
            model = add_lora(model, self.spec, c)
        self.plan = resolve_plan(model, self.spec, adapter_marker="lora_" if c.method == "lora" else None)
        self.plan.apply(model)  # requires_grad on what trains, off on everything else
        if not self.deepspeed:  # DeepSpeed's optimizer keeps its own fp32 master copy of what trains
            keep_trainable_in(model, self.plan, c.trainable_dtype)
        self.checkpointed = setup_checkpointing(model, self.plan, c.gradient_checkpointing)
        model.train()
        self.model = model
        self.trainable_names = sorted(self.plan.trainable_names)
        self.say(f"model {c.model} ({self.plan.model_class}), method {c.method}, "
                 f"world size {self.accelerator.num_processes}")
        self.say(self.plan.table())
        if self.checkpointed:
            first, last = self.checkpointed[0], self.checkpointed[-1]
            self.say(f"gradient checkpointing (non-reentrant) on LLM layers {first}-{last}; "
                     f"nothing below layer {first} records a graph")

    def setup_data(self) -> None:
        c = self.config
        from accelerate.utils import gather_object

        acc = self.accelerator
        self.dataset = SupervisedDataset(
            plain(c.data), self.processor, image_folder=c.image_folder, max_length=c.max_length,
            on_bad_sample=c.on_bad_sample, on_image_truncation=c.on_image_truncation, split=c.split,
            allow_outside_images=c.allow_outside_images, progress=self.main_process,
            # each process checks 1/world_size of the rows, with its DataLoader workers; the results are shared
            num_workers=c.num_workers, shard=(acc.process_index, acc.num_processes), gather=gather_object,
            cache_dir=cache_dir("data-checks") if c.data_check_cache else None,
            template=conversation_template(self.processor, c.conversation),
        )
        self.say(f"data: {self.dataset.summary}")
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if c.group_by_length:  # batches of one modality and similar length: little padding
            # every micro-step holds one modality on all ranks (the sampler's docstring says why)
            order = {"sampler": LengthGroupedSampler(self.dataset.lengths, self.dataset.has_images,
                                                     c.batch_size, seed=c.seed, world_size=acc.num_processes)}
        else:
            order = {"shuffle": True, "generator": torch.Generator().manual_seed(c.seed)}
        # With several ranks, a micro-batch without images still runs the vision path on a stand-in (no loss, no
        # gradient): under ZeRO-3 and FSDP every rank must call the same sharded modules in every micro-step.
        dummy = dummy_image_inputs(self.processor) if acc.num_processes > 1 and any(self.dataset.has_images) else None
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=c.batch_size, collate_fn=Collator(pad_id, dummy_image=dummy),
            num_workers=c.num_workers,
            worker_init_fn=ignore_stop_signals, **order,
        )

    def setup_optimizer(self) -> None:
        """AdamW over what trains, accelerate's prepare(), and the learning-rate schedule."""
        from transformers import get_scheduler

        c, acc = self.config, self.accelerator
        optimizer = build_optimizer(self.model, self.plan, c)
        self.optimizer_groups = [{"name": g["name"], "weight_decay": g["weight_decay"], "lr": g["lr"],
                                  "tensors": len(g["params"]), "parameters": sum(numel(p) for p in g["params"])}
                                 for g in optimizer.param_groups]
        wrapped = name_fsdp_wrap_classes(getattr(acc.state, "fsdp_plugin", None), self.model)
        if wrapped:
            self.say(f"FSDP wraps each {', '.join(wrapped)}")
        self.model, self.optimizer, self.loader = acc.prepare(self.model, optimizer, self.loader)
        self.precision = precision_summary(acc, self.model, self.plan, c)
        self.say(f"precision: {self.precision['line']}")
        self.micro_per_epoch = len(self.loader)
        if c.max_steps > 0:
            self.total_steps = c.max_steps
        else:
            self.total_steps = max(1, math.ceil(c.epochs * self.micro_per_epoch / c.grad_accum))
        warmup = c.optim.warmup_steps or round(c.optim.warmup_ratio * self.total_steps)
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
        self.scheduler = get_scheduler(c.optim.scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)

    def resume(self) -> None:
        # the layout first: a checkpoint of another world size would otherwise fail on a missing per-rank file
        check_resume_shape(read_trainer_state(self.resume_path), self.data_shape(), self.resume_path)
        saved = load_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, self.resume_path,
                                self.trainable_names)
        self.state = TrainState(step=saved["step"], skipped_steps=list(saved.get("skipped_steps", [])),
                                overflow_steps=int(saved.get("overflow_steps", 0)), saved_step=saved["step"])
        self.say(f"resumed from {self.resume_path} at step {self.state.step}")

    def data_shape(self) -> dict:
        """What decides which rows each rank sees at each step: a resume must find the same, or it would repeat
        or skip data without a word (the data position is counted in micro-batches of this rank)."""
        c = self.config
        return {"world_size": self.accelerator.num_processes, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "group_by_length": c.group_by_length}

    def start_run_dir(self) -> None:
        """Every input checked: replace or continue the run directory, and open its logs."""
        c, acc = self.config, self.accelerator
        start_output_dir(acc, c, self.output_dir, self.resume_path)
        samples_path = self.output_dir / f"samples-rank{acc.process_index}.jsonl"
        if self.main_process:
            truncate_log(self.output_dir / "metrics.jsonl", self.state.step)
        if c.record_samples:
            truncate_log(samples_path, self.state.step)
        if c.report_to:
            # W&B: the project groups the runs of one study (compare sets the experiment), the name tells them apart
            acc.init_trackers(c.project, config=flat_hparams(to_dict(c)),
                              init_kwargs={"wandb": {"name": c.run_name or self.output_dir.name}})
        self.metrics_file = open(self.output_dir / "metrics.jsonl", "a") if self.main_process else None
        self.samples_file = open(samples_path, "a") if c.record_samples else None

    def close_logs(self) -> None:
        for f in (self.metrics_file, self.samples_file):
            if f:
                f.close()

    # -- train ----------------------------------------------------------------------------------------------

    def train(self, stop: StopSignals) -> None:
        """Until total_steps: forward and backward each micro-batch; every grad_accum of them, an optimizer step."""
        from tqdm.auto import tqdm

        s = self.state
        skip = self.start_loop()
        self.progress = tqdm(total=self.total_steps, initial=s.step, disable=not self.main_process, desc="train",
                             unit="step")
        memory = Memory(str(self.accelerator.device))
        memory.mark()  # what the loop adds to the loaded model: gradients, optimizer state, activations
        self.step_start = time.perf_counter()
        batches = self.micro_batches(skip)
        try:
            while s.step < self.total_steps:
                update = self.take_step(batches)
                if not update.finite and not update.overflow:  # no update; may raise NonFiniteLoss
                    self.drop_step()
                    continue
                self.end_step(update)
                if s.step >= self.total_steps:
                    break
                if not all_ranks_ok(self.accelerator, stop.received is None):
                    path = self.output_dir / f"checkpoint-{s.step}" if s.saved_step == s.step else self.checkpoint()
                    # stop.received is None here when the signal reached another rank only
                    raise Interrupted(stop.received or signal.SIGTERM, s.step, path)
        finally:
            self.progress.close()
        self.training_memory_mb = (memory.peak() - memory.base) / 2**20
        if self.samples_file:
            checksum = weights_checksum(self.model, self.trainable_names, self.accelerator)
            self.samples_file.write(json.dumps({"final_weights": checksum}) + "\n")

    def start_loop(self) -> int:
        """The loop's per-session state: the epoch it starts in, what trains, an empty accumulation window. Returns
        how many micro-batches of that epoch a resume skips. Also what train/probe.py calls to step a recipe by hand."""
        c, s = self.config, self.state
        micro = (s.step + len(s.skipped_steps)) * c.grad_accum  # micro-batches this rank has consumed
        s.epoch, skip = divmod(micro, self.micro_per_epoch)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_scaled = self.accelerator.mixed_precision == "fp16"  # a GradScaler or DeepSpeed's loss scaler
        self.window: list[tuple[list[str], torch.Tensor]] = []  # this step's micro-batches: sample ids, mean loss
        self.window_loss = torch.zeros((), device=self.accelerator.device)  # this rank's share of the step's loss
        # this step's real tokens and padded positions, summed over its micro-batches (one reduce per step)
        self.window_tokens = torch.zeros(2, device=self.accelerator.device, dtype=torch.long)
        return skip

    def micro_batches(self, skip: int = 0) -> Iterator[dict]:
        """Train's micro-batches in order, epoch after epoch (an optimizer step may span two), the loader told each
        epoch (its sampler's order depends on seed and epoch only); a resume leaves out the first `skip`."""
        s = self.state
        while True:
            self.loader.set_epoch(s.epoch)
            yield from self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            skip = 0
            s.epoch += 1

    def take_step(self, batches: Iterator[dict]) -> Update:
        """One optimizer step: its grad_accum micro-batches, forward and backward each, then the update.

        The micro-batches are taken first because, under loss_normalization=tokens, each one's loss is divided by
        the labelled tokens of the whole step, summed over its micro-batches and ranks (one reduce per step)."""
        window = [next(batches) for _ in range(self.config.grad_accum)]
        step_tokens = None
        if self.config.loss_normalization == "tokens":
            local = torch.tensor(sum(labelled_tokens(b) for b in window), device=self.accelerator.device)
            step_tokens = max(int(self.accelerator.reduce(local, "sum")), 1)
        for batch in window:
            update = self.micro_step(batch, step_tokens)
        assert update is not None, "the last micro-batch of a window is an optimizer step"
        return update

    def micro_step(self, batch: dict, step_tokens: int | None = None) -> Update | None:
        """Forward and backward one micro-batch; the optimizer step once the accumulation window is full.

        `step_tokens` (loss_normalization=tokens): the step's labelled tokens over micro-batches and ranks. The
        summed cross-entropy is scaled so that, after accelerate divides by grad_accum and the backend averages
        over ranks, the gradient is that of (the step's summed cross-entropy) / step_tokens. Without it, the
        micro-batch's own mean (LLaVA's legacy normalisation)."""
        acc = self.accelerator
        sample_ids = batch.pop("sample_ids")
        with acc.accumulate(self.model):
            total, count = summed_lm_loss(self.model, batch, self.config.logits_at_labels)
            mean = total / max(count, 1)
            if step_tokens is None:
                loss = mean
                self.window_loss += mean.detach() / self.config.grad_accum
            else:
                loss = total * (self.config.grad_accum * acc.num_processes / step_tokens)
                self.window_loss += total.detach() * acc.num_processes / step_tokens
            self.window.append((sample_ids, mean.detach()))
            # DeepSpeed's engine updates inside backward: a bad loss must be caught before it
            if self.deepspeed and not all_ranks_ok(acc, bool(torch.isfinite(loss))):
                raise nonfinite_error(acc, self.config, self.dataset, self.window, self.state.step, self.output_dir,
                                      self.state.skipped_steps)
            acc.backward(loss)
            mask = batch["attention_mask"]
            self.window_tokens += torch.stack([mask.sum(), torch.tensor(mask.numel(), device=mask.device)])
            return self.optimizer_step() if acc.sync_gradients else None

    def optimizer_step(self) -> Update:
        acc, c = self.accelerator, self.config
        # the reduced loss is NaN on every rank if it is on one: all ranks take the same branch. Under tokens each
        # rank's share is (its summed cross-entropy) × world / step tokens, so the mean over ranks is the step's.
        loss = acc.reduce(self.window_loss, "mean").item()
        max_norm = c.optim.max_grad_norm or float("inf")  # inf: measure, do not clip
        grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
        grad = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad))
        overflow = False
        if self.loss_scaled:
            # fp16: an inf/NaN gradient is the loss scaler's to handle. Its step skips the update and lowers the
            # scale (normal while it calibrates); without that call it never would.
            scale = loss_scale(acc)
            self.optimizer.step()
            overflow = math.isfinite(loss) and scaler_skipped(acc, scale)
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # a non-finite step's gradients are dropped here
        return Update(loss, grad, finite, overflow)

    def drop_step(self) -> None:
        """A non-finite step: recorded and skipped, or NonFiniteLoss (on_nan_loss=error, or past max_nan_skips)."""
        s = self.state
        s.skipped_steps.append(nonfinite_skip(self.accelerator, self.config, self.dataset, self.window, s.step,
                                              self.output_dir, s.skipped_steps))
        self.window = []
        self.window_tokens.zero_()
        self.window_loss.zero_()

    def end_step(self, update: Update) -> None:
        """Count the step: schedule, log, progress, the analysis hook, and a checkpoint every save_steps."""
        c, s, acc = self.config, self.state, self.accelerator
        lr, tokens, positions, sample_ids = self.close_step(update)
        padding = 1 - tokens / positions
        self.log_step(update, lr, tokens, padding, sample_ids)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{update.loss:.4f}", lr=f"{lr:.2e}", pad=f"{padding:.0%}",
                                  tok_s=f"{s.tokens / sum(s.step_times):.0f}")
        self.analysis.poll(acc)  # log finished profiles (non-blocking)
        if c.save_steps and s.step % c.save_steps == 0 and s.step < self.total_steps:
            self.analysis.on_save(s.step, self.checkpoint(), acc)

    def close_step(self, update: Update) -> tuple[float, int, int, list[str]]:
        """Count the step, move the schedule, empty the window and time the step: from `step_start` (the previous
        step's end) to now, after a CUDA sync. Returns the step's lr, real tokens, padded positions, sample ids."""
        s, acc = self.state, self.accelerator
        s.step += 1
        lr = self.scheduler.get_last_lr()[0]
        if update.overflow:  # the scaler skipped this update: the schedule waits for the next real one
            s.overflow_steps += 1
        else:
            self.scheduler.step()
        tokens, positions = acc.reduce(self.window_tokens, "sum").tolist()
        sample_ids = [i for ids, _ in self.window for i in ids]
        self.window = []
        self.window_tokens.zero_()
        self.window_loss.zero_()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        s.step_times.append(now - self.step_start)
        self.step_start = now
        s.tokens += tokens
        s.positions += positions
        s.losses.append(update.loss)
        return lr, tokens, positions, sample_ids

    def log_step(self, update: Update, lr: float, tokens: int, padding: float, sample_ids: list[str]) -> None:
        """metrics.jsonl every logging_steps (and the last step), the trackers, and the samples log."""
        c, s, acc = self.config, self.state, self.accelerator
        record = {"step": s.step, "loss": update.loss, "lr": lr, "grad_norm": update.grad_norm,
                  "step_time": s.step_times[-1], "tokens": tokens, "padding": padding, "epoch": s.epoch}
        if self.loss_scaled:
            record.update(loss_scale=loss_scale(acc), skipped_by_scaler=update.overflow)
        if self.metrics_file and (s.step % c.logging_steps == 0 or s.step == self.total_steps):
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if c.report_to and s.step % c.logging_steps == 0:
            acc.log({"train/loss": update.loss, "train/lr": lr, "train/grad_norm": update.grad_norm,
                     "train/step_time": s.step_times[-1]}, step=s.step)
        if self.samples_file:
            self.samples_file.write(json.dumps({"step": s.step, "samples": sample_ids}) + "\n")
            self.samples_file.flush()

    def checkpoint(self) -> Path:
        s = self.state
        path = save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, self.trainable_names,
                               self.output_dir, s.step,
                               {"step": s.step, "epoch": s.epoch, "loss": s.losses[-1] if s.losses else None,
                                "skipped_steps": s.skipped_steps, "overflow_steps": s.overflow_steps,
                                "data_shape": self.data_shape()},
                               self.config.save_total_limit)
        s.saved_step = s.step
        return path

    # -- save -----------------------------------------------------------------------------------------------

    def save(self) -> dict:
        """The last checkpoint, final/ (delta + merged model) and run.json; returns run.json's summary."""
        s = self.state
        self.analysis.on_save(s.step, self.checkpoint(), self.accelerator, final=True)
        final = save_final(self.accelerator, self.model, self.processor, self.plan, self.config, self.output_dir)
        summary = self.summary(final)
        if self.main_process:
            write_json(self.output_dir / "run.json", summary, indent=2)
            loss = f"{summary['final_loss']:.4f}" if s.losses else "—"
            median = f"{summary['median_step_time_s']:.3f}s" if s.step_times else "—"
            self.say(f"done: {s.step} steps in {summary['wall_time_s']:.1f}s, final loss {loss}, "
                     f"median step {median} → {final}")
        return summary

    def summary(self, final: Path) -> dict:
        c, s, acc, plan = self.config, self.state, self.accelerator, self.plan
        return {
            "config": to_dict(c),
            "plan": plan.to_dict(),
            "freezing_table": plan.table(),
            "parameters": {"trainable": plan.num_trainable, "total": plan.num_total},
            "optimizer_groups": self.optimizer_groups,
            "world_size": acc.num_processes,
            "grad_accum": c.grad_accum,  # derived from global_batch_size where that is set
            "global_batch_size": c.batch_size * c.grad_accum * acc.num_processes,
            "loss_normalization": c.loss_normalization,
            # what DeepSpeed's engine clips to (its JSON's gradient_clipping, filled from optim.max_grad_norm)
            "deepspeed_gradient_clipping": (acc.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
                                            if self.deepspeed else None),
            "distributed_type": acc.distributed_type.name,
            "mixed_precision": acc.mixed_precision,
            "precision": self.precision,
            "attn_implementation": attn_implementations(acc.unwrap_model(self.model)),
            "image_pixels": self.image_pixels,  # Qwen2-VL/2.5-VL's pixel budget per image; null elsewhere
            "image_aspect_ratio": image_aspect_ratio(self.processor), "conversation": self.config.conversation,
            "device": str(acc.device),
            "gradient_checkpointing_layers": self.checkpointed,
            "data": self.dataset.summary.to_dict(),
            "steps": s.step,
            "steps_this_session": len(s.step_times),
            "skipped_steps": s.skipped_steps,
            "fp16_overflow_steps": s.overflow_steps if self.loss_scaled else None,
            "resumed_from": str(self.resume_path) if self.resume_path else None,
            "final_loss": s.losses[-1] if s.losses else None,
            "wall_time_s": time.time() - self.started,
            "median_step_time_s": statistics.median(s.step_times) if s.step_times else None,
            "tokens_per_s": s.tokens / sum(s.step_times) if s.step_times else None,
            # of the padded batch positions this session, the fraction that was padding
            "padding_fraction": 1 - s.tokens / s.positions if s.positions else None,
            "peak_memory_mb": peak_memory_mb(),
            "peak_training_memory_mb": self.training_memory_mb,  # peak above the loaded model, during the loop
            "final": str(final),
            "versions": versions(),
        }


def check_resume_shape(saved: dict, now: dict, path: Path) -> None:
    """Refuse a resume whose world size, batch size, accumulation or grouping differ from the checkpoint's,
    naming each. Checkpoints written before the shape was recorded are resumed as before, with a warning."""
    recorded = saved.get("data_shape")
    if recorded is None:
        log.warning(f"{path}: the checkpoint does not record its world size, batch size and accumulation; "
                    f"resuming with {now} as if they were the same")
        return
    changed = [f"{key} {recorded.get(key)} → {value}" for key, value in now.items() if recorded.get(key) != value]
    if changed:
        raise ConfigError(f"{path}: written with another data layout ({', '.join(changed)}); the rows each rank "
                          "sees would repeat or be skipped. Resume with the checkpoint's values (its number of "
                          "processes too), or start a new run from its weights")


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
