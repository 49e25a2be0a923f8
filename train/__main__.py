"""midtune training app: layer-restricted visual instruction tuning.

    accelerate launch train --config configs/demo/stage_c_middle.yaml [key=value ...]
    python -m train --config ... [key=value ...]          # one process

The recipe, top to bottom: config → accelerator → model → freezing plan (+ LoRA) → backward cut → data →
optimizer and schedule → loop (log, checkpoint) → final delta + merged model → run.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from midtune.adapters import family_of, unwrap
from midtune.checkpoint import CheckpointError, atomic_dir, base_hash, load_pretrained, load_with_delta, save_delta
from midtune.data import Collator, DataError, SupervisedDataset
from midtune.spec import FreezePlan, SpecError, TrainableSpec, resolve_layers, resolve_plan
from train.backward_cut import setup_checkpointing
from train.checkpoints import STATE_FILE, load_checkpoint, resolve_resume, save_checkpoint
from train.config import ConfigError, TrainConfig, load_config, plain, to_dict, to_yaml

log = logging.getLogger("midtune.train")
RUN_FILES = ("run.json", "metrics.jsonl", "config.yaml", "final", "logs", "analysis")


class UserError(Exception):
    """A problem with the user's input: printed as one clear message, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train", description="Layer-restricted visual instruction tuning.")
    ap.add_argument("--config", help="YAML run config (configs/...)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainable.layers=8-23")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        train(config)
    except (ConfigError, SpecError, DataError, CheckpointError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


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
    # analysis hook: background geometry profiles of saved checkpoints (analysis/hook.py); checks `analysis.pairs` now
    from analysis.hook import AnalysisHook
    analysis_hook = AnalysisHook.from_config(config)
    resume_path = prepare_output_dir(config, output_dir)

    # The accelerator comes first: under ZeRO-3 (zero3_init_flag) from_pretrained then loads partitioned.
    spec = TrainableSpec.from_dict(plain(to_dict(config)["trainable"]))  # spelling checked before any loading
    vision_trains = spec.vision_tower not in (False, None, "none")
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum, sync_with_dataloader=False),  # steps span epochs: exact resume arithmetic
        log_with=config.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # LLaVA feeds the LLM from vision layer -2, so the last vision layer gets no gradient when the tower trains
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=vision_trains), *cpu_deepspeed_kwargs()],
    )
    set_seed(config.seed)
    main_process = accelerator.is_main_process
    say = accelerator.print

    # -- model and freezing plan ----------------------------------------------------------------------------
    model, processor = load_pretrained(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if config.method == "lora":
        model = add_lora(model, spec, config)
    plan = resolve_plan(model, spec, adapter_marker="lora_" if config.method == "lora" else None)
    plan.apply(model)
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
    )

    # -- optimizer and schedule ---------------------------------------------------------------------------
    optimizer = build_optimizer(model, plan, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
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

    step = 0
    if resume_path is not None:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, resume_path)
        step = state["step"]
        say(f"resumed from {resume_path} at step {step}")
    if main_process:
        (output_dir / "config.yaml").write_text(to_yaml(config))
        truncate_metrics(output_dir / "metrics.jsonl", step)
    if config.report_to:
        accelerator.init_trackers(config.run_name or output_dir.name, config=flat_hparams(to_dict(config)))

    # -- loop -----------------------------------------------------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_names = sorted(plan.trainable_names)
    micro = step * config.grad_accum  # micro-batches this rank has consumed
    epoch, skip = divmod(micro, micro_per_epoch)
    step_times: list[float] = []
    tokens_total = 0
    losses: list[float] = []
    window_loss = torch.zeros((), device=accelerator.device)
    window_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, disable=not main_process, desc="train", unit="step")
    step_start = time.perf_counter()
    metrics_file = open(output_dir / "metrics.jsonl", "a") if main_process else None
    samples_file = None
    if config.record_samples:
        samples_file = open(output_dir / f"samples-rank{accelerator.process_index}.jsonl", "a")
    step_samples: list[str] = []
    while step < total_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            step_samples += batch.pop("sample_ids")
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = config.optim.max_grad_norm or float("inf")  # inf: measure, do not clip
                    grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += loss.detach() / config.grad_accum
            window_tokens += batch["attention_mask"].sum()
            if not accelerator.sync_gradients:
                continue

            step += 1
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step_loss = accelerator.reduce(window_loss, "mean").item()
            step_tokens = int(accelerator.reduce(window_tokens, "sum").item())
            window_loss.zero_()
            window_tokens.zero_()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_times.append(now - step_start)
            step_start = now
            tokens_total += step_tokens
            losses.append(step_loss)
            grad = float(grad_norm) if grad_norm is not None else float("nan")
            record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad,
                      "step_time": step_times[-1], "tokens": step_tokens, "epoch": epoch}
            if main_process and (step % config.logging_steps == 0 or step == total_steps):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if config.report_to and step % config.logging_steps == 0:
                accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad,
                                 "train/step_time": step_times[-1]}, step=step)
            if samples_file:
                samples_file.write(json.dumps({"step": step, "samples": step_samples}) + "\n")
            step_samples = []
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            analysis_hook.poll(accelerator)  # analysis hook: log finished profiles (non-blocking)
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                save_checkpoint(accelerator, model, optimizer, scheduler, trainable_names, output_dir, step,
                                {"step": step, "epoch": epoch, "loss": step_loss}, config.save_total_limit)
                analysis_hook.on_save(step, output_dir / f"checkpoint-{step}", accelerator)  # analysis hook
            if step >= total_steps:
                break
        epoch += 1
    progress.close()
    if metrics_file:
        metrics_file.close()
    if samples_file:
        samples_file.write(json.dumps({"final_weights": weights_checksum(model, trainable_names, accelerator)}) + "\n")
        samples_file.close()

    # -- final outputs ------------------------------------------------------------------------------------
    save_checkpoint(accelerator, model, optimizer, scheduler, trainable_names, output_dir, step,
                    {"step": step, "epoch": epoch, "loss": losses[-1] if losses else None}, config.save_total_limit)
    analysis_hook.on_save(step, output_dir / f"checkpoint-{step}", accelerator, final=True)  # analysis hook
    final = save_final(accelerator, model, processor, plan, config, output_dir)
    wall = time.time() - started
    summary = {
        "config": to_dict(config),
        "plan": plan.to_dict(),
        "freezing_table": plan.table(),
        "parameters": {"trainable": plan.num_trainable, "total": plan.num_total},
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "gradient_checkpointing_layers": checkpointed,
        "data": dataset.summary.to_dict(),
        "steps": step,
        "steps_this_session": len(step_times),
        "resumed_from": str(resume_path) if resume_path else None,
        "final_loss": losses[-1] if losses else None,
        "wall_time_s": wall,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "tokens_per_s": tokens_total / sum(step_times) if step_times else None,
        "peak_memory_mb": peak_memory_mb(),
        "final": str(final),
        "versions": versions(),
    }
    if main_process:
        (output_dir / "run.json").write_text(json.dumps(summary, indent=2))
        say(f"done: {step} steps in {wall:.1f}s, final loss {summary['final_loss']:.4f}, "
            f"median step {summary['median_step_time_s']:.3f}s → {final}")
    analysis_hook.finish(accelerator)  # analysis hook: wait (analysis.timeout) for outstanding profiles
    accelerator.end_training()
    return RunResult(summary, accelerator.unwrap_model(model), processor)


# ---------------------------------------------------------------------------------------------------------
# Pieces of the recipe
# ---------------------------------------------------------------------------------------------------------


def prepare_output_dir(config: TrainConfig, output_dir: Path) -> Path | None:
    """Refuse to mix two runs in one directory; returns the checkpoint to resume from, if any."""
    if config.resume_from:
        try:
            return resolve_resume(config.resume_from, output_dir)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    existing += [d.name for d in output_dir.glob("checkpoint-*")] if output_dir.exists() else []
    if existing and not config.overwrite:
        raise UserError(
            f"output_dir {str(output_dir)!r} already holds a run ({', '.join(sorted(existing)[:4])}); "
            f"set overwrite=true to replace it or resume_from=latest to continue it"
        )
    if existing and is_main_rank():
        for name in existing:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    return None


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    groups: dict[tuple[str, bool], list] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name or name.endswith(".bias")
        groups.setdefault((owner[name], no_decay), []).append(p)
    param_groups = [
        {"params": params, "lr": lrs[component] if lrs[component] is not None else opt.lr,
         "weight_decay": 0.0 if no_decay else opt.weight_decay, "name": f"{component}{'/no_decay' if no_decay else ''}"}
        for (component, no_decay), params in sorted(groups.items())
    ]
    fused = opt.fused
    if fused is None:  # fused AdamW is several times faster than the per-parameter loop, CPU included
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused)


def cpu_deepspeed_kwargs() -> list:
    """DeepSpeed on a machine without GPUs: accelerate finds no process-group backend for DeepSpeed's CPU
    accelerator and then counts one process, while DeepSpeed itself forms the full world (each of 2 ranks
    reported num_processes == 1 and the batch-size check failed). Naming gloo makes both agree."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
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
    with atomic_dir(final) as tmp:
        save_delta(tmp / "delta.safetensors", delta, base_model=config.model, base_hash=base_hash(config.model),
                   method=config.method, trainable=plan.spec.to_dict(),
                   lora_config=lora_config_dict(unwrapped) if lora else None)
        if config.save_merged and zero3_enabled():
            # The ZeRO-3 model holds only partitions; rebuild base + delta on this process, as train.export does
            # (saving the gathered state through the ZeRO-3-loaded model wrote non-standard key names).
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            merged, _ = load_with_delta(config.model, tmp / "delta.safetensors", dtype=config.dtype,
                                        trust_remote_code=config.trust_remote_code, verify_base=False)
            merged.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        elif config.save_merged:
            merged = unwrapped.merge_and_unload() if lora else unwrapped
            merged.save_pretrained(tmp, state_dict=None if lora else {k[len(prefix):]: v for k, v in state.items()},
                                   safe_serialization=True)
            processor.save_pretrained(tmp)
    return final


def weights_checksum(model, names: list[str], accelerator) -> str:
    import hashlib

    params = dict(unwrap(accelerator.unwrap_model(model)).named_parameters())
    digest = hashlib.sha256()
    for name in names:
        digest.update(params[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
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
