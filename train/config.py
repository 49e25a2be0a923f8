"""Training run configuration: YAML → typed, validated `TrainConfig`, with `key=value` overrides.

OmegaConf structured configs do the parsing and type checking (the same approach as torchtune and Hydra);
this module adds what users need on top: an unknown key names the closest valid one, values are checked
for meaning (not only type), and every message names the file and the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class TrainableConfig:
    """What trains. `layers`: LLM decoder layers ("8-23", [3, 5, 7], "middle:0.5", "first:4", "last:4", "all",
    "none"); components on/off; `vision_tower` may be "last:N" (its own last N layers)."""

    layers: Any = None
    vision_tower: Any = False
    projector: bool = False
    embeddings: bool = False
    lm_head: bool = False
    norm: bool = False


@dataclass
class LoraConfig:
    """LoRA on the `trainable.layers` block (method: lora); only LLM layers get adapters."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class OptimConfig:
    lr: float = 2e-5
    # Per-component learning rates; None = `lr`. LLaVA trains the projector faster than the LLM.
    projector_lr: Optional[float] = None
    vision_lr: Optional[float] = None
    embeddings_lr: Optional[float] = None
    weight_decay: float = 0.0  # never applied to norms and biases
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # any transformers scheduler name: cosine, linear, constant_with_warmup, ...
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    fused: Optional[bool] = None  # fused AdamW; None = on where supported (much faster on CPU)


@dataclass
class AnalysisHookConfig:
    """Geometry profile of each saved checkpoint, in a background process (analysis/hook.py); off when `pairs` is
    null. `every`: "save" (every checkpoint save) or "final" (the last one only)."""

    pairs: Optional[str] = None  # a pairs.jsonl (the shapes world's, or your own)
    image_folder: Optional[str] = None  # default: <pairs dir>/images
    every: str = "save"
    max_pairs: int = 200  # the first N pairs
    k: int = 30  # neighbours of the overlap metrics; needs max_pairs >= k + 2
    label: str = "dominant_color"  # label of the probe and the label overlap
    protocol: str = "authors"  # authors (needs a question per pairs row) | describe (docs/analysis.md)
    device: str = "cpu"  # where the profile runs: cpu leaves the accelerators to training; auto or cuda:N
    batch_size: int = 8
    timeout: float = 1800.0  # seconds to wait for outstanding profiles when training ends


@dataclass
class TrainConfig:
    model: str = MISSING  # a directory or hub id
    data: Any = MISSING  # LLaVA json/jsonl or a datasets directory, or a list of them (mixed in one dataset)
    output_dir: str = MISSING
    image_folder: Optional[str] = None
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    method: str = "full"  # full: train the selected parameters; lora: LoRA adapters on the selected layers
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    max_steps: int = -1  # optimizer steps; -1 = run `epochs`
    epochs: float = 1.0
    batch_size: int = 4  # per device, per micro-step
    grad_accum: int = 1
    # Rows per optimizer step over all ranks: grad_accum is then derived from it, batch_size and the number of
    # processes (a remainder is refused), so the same config trains the same recipe on 8 GPUs or 16.
    global_batch_size: Optional[int] = None
    # tokens: each labelled token of an optimizer step weighs the same, whichever micro-batch and rank it is on
    # (the step's summed cross-entropy over its labelled tokens, as transformers' num_items_in_batch and torchtune
    # do). mean: the mean over each micro-batch's tokens, averaged over micro-batches and ranks (LLaVA's scripts),
    # where a token of a short VQA batch weighs many times one of a long conversation in the same step.
    loss_normalization: str = "tokens"
    max_length: int = 2048
    on_bad_sample: str = "error"  # error | skip
    on_image_truncation: str = "skip"  # skip | error
    # A non-finite (NaN/inf) loss or gradient norm: error stops with the batch's sample ids, writing no checkpoint
    # of the suspect weights; skip drops that optimizer step (no update) and stops after max_nan_skips of them.
    on_nan_loss: str = "error"  # error | skip
    max_nan_skips: int = 10
    allow_outside_images: bool = False
    split: str = "train"  # for datasets directories
    num_workers: int = 0
    seed: int = 42
    # Batches of one modality (image or text-only) and similar length, in random order (LLaVA's
    # group_by_modality_length): far less padding than random batches. false: a plain shuffle.
    group_by_length: bool = True
    # Keep the row checks (structure, images, lengths) in $MIDTUNE_CACHE/data-checks, keyed by the data files,
    # the processor and these settings: a restart or resume with the same inputs skips checking every row.
    data_check_cache: bool = True

    # Autocast precision. auto: follows `dtype` (bfloat16 → bf16, float16 → fp16); float32 weights → bf16 on a GPU
    # that has it, none on the CPU. `no` as on accelerate's command line (YAML's `no` is read as that, not false).
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    gradient_checkpointing: bool = False  # wraps only the layers from the first trainable one upward
    # The LM head runs only where a label is predicted (not on image tokens, prompts, padding); false: everywhere,
    # as the model's own loss does (the same value).
    logits_at_labels: bool = True
    dtype: str = "float32"  # how the model's weights are loaded; frozen tensors stay in it
    # What trains is kept in this dtype: the master weights AdamW updates. float32 (default) is mixed precision
    # done right; bfloat16/float16 update low-precision weights directly, where steps of lr 1e-5 round away
    # (bf16 spacing is ~0.4 % of a weight), so only when asked for explicitly.
    trainable_dtype: str = "float32"
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn) | ...
    # Qwen2-VL/2.5-VL: the pixel budget each image is resized into (the processor's default allows ~12.8 MP, up to
    # thousands of image tokens); null keeps the processor's. Saved with the trained model's processor.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    # pad: LLaVA-1.5's pad-to-square in the processor's mean colour before its resize (CLIP's own preprocessing
    # centre-crops, cutting a 4:3 image's sides); native: the processor's own. null keeps what the model's
    # processor says (a stage-2 run inherits stage 1's). Saved with the trained model: eval and analysis follow.
    image_aspect_ratio: Optional[str] = None
    # chat: rows rendered with the model's chat template. plain: LLaVA's stage-1 format (the image, then the
    # caption, no roles or prompt text), for this run only: the saved model keeps its chat template.
    conversation: str = "chat"
    trust_remote_code: bool = False

    logging_steps: int = 1
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 2
    save_merged: bool = True  # final/: also a merged Hugging Face directory, not only delta.safetensors
    resume_from: Optional[str] = None  # latest | a checkpoint directory
    overwrite: bool = False
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, or []
    run_name: Optional[str] = None  # the tracker's run name (default: the output directory's name)
    project: str = "midtune"  # the tracker's project (W&B project, TensorBoard's folder under logs/)
    # Write each rank's sample ids per step, and a checksum of its trainable weights at the end, to
    # samples-rank<k>.jsonl: shows data order and that data-parallel ranks see disjoint data and stay in sync.
    record_samples: bool = False
    analysis: AnalysisHookConfig = field(default_factory=AnalysisHookConfig)


CHOICES = {
    "method": ("full", "lora"),
    "on_bad_sample": ("error", "skip"),
    "on_image_truncation": ("skip", "error"),
    "on_nan_loss": ("error", "skip"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "dtype": ("float32", "bfloat16", "float16"),
    "trainable_dtype": ("float32", "bfloat16", "float16"),
    "loss_normalization": ("tokens", "mean"),
    "image_aspect_ratio": (None, "native", "pad"),
    "conversation": ("chat", "plain"),
}


def _valid_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = f.default_factory() if f.default_factory is not field().default_factory else None  # type: ignore
        keys.append(prefix + f.name)
        if is_dataclass(sub):
            keys += _valid_keys(type(sub), prefix + f.name + ".")
    return keys


# The names other trainers (Hugging Face Trainer, LLaVA's scripts) give to settings midtune names differently:
# spelling is no guide from these to ours.
FOREIGN_KEYS = {
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.scheduler", "lr_scheduler": "optim.scheduler",
    "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio", "warmup_steps": "optim.warmup_steps",
    "max_grad_norm": "optim.max_grad_norm", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "model_name_or_path": "model", "data_path": "data",
    "model_max_length": "max_length", "bf16": "mixed_precision", "fp16": "mixed_precision",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    valid = _valid_keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    known = FOREIGN_KEYS.get(key.rsplit(".", 1)[-1])
    if known:
        hint = f"; did you mean {known!r}?"
    elif close:
        hint = f"; did you mean {close[0]!r}?"
    else:
        hint = f"; valid keys: {', '.join(k for k in valid if '.' not in k)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _check_keys(node: Any, cls, where: str, prefix: str = "") -> None:
    """Reject unknown keys before OmegaConf merges, so the message can suggest the right one."""
    if not isinstance(node, (dict, DictConfig)):
        return
    names = {f.name: f for f in fields(cls)}
    for key, value in node.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown_key_error(full, where)
        default = names[key].default_factory() if names[key].default_factory is not field().default_factory else None  # type: ignore
        if is_dataclass(default) and isinstance(value, (dict, DictConfig)):
            _check_keys(value, type(default), where, full + ".")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (optional) and apply `key=value` overrides; returns a validated TrainConfig."""
    schema = OmegaConf.structured(TrainConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)  # YAML safe_load underneath
        except Exception as e:  # noqa: BLE001 - yaml's errors, and OmegaConf's for what YAML allows but it does not
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            reason = getattr(e, "problem", None) or _first_line(e)
            raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        layers.append((str(path), loaded))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. trainable.layers=8-23)")
        key, _, raw = item.partition("=")
        # OmegaConf parses the value as YAML (numbers, lists, null) like the file would
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([f"{key.strip()}={raw}"])))
    for where, layer in layers:
        _yaml_words(layer)
        _check_keys(OmegaConf.to_container(layer), TrainConfig, where)
        try:
            schema = OmegaConf.merge(schema, layer)
        except ConfigKeyError as e:
            raise _unknown_key_error(str(e.full_key), where) from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: key {e.full_key!r}: {_first_line(e)}") from None
    missing = sorted(k for k in OmegaConf.missing_keys(schema))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)} (set them in the YAML or as key=value)")
    config: TrainConfig = OmegaConf.to_object(schema)  # type: ignore[assignment]
    validate(config)
    return config


def _yaml_words(layer: DictConfig) -> None:
    """YAML 1.1 reads `no` (and off, false) as a boolean; for mixed_precision it is accelerate's name "no"."""
    if "mixed_precision" in layer and layer.mixed_precision is False:
        layer.mixed_precision = "no"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0]


def validate(config: TrainConfig) -> None:
    for key, choices in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in choices:
            raise ConfigError(f"key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}")
    positive = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "max_length": config.max_length,
                "logging_steps": config.logging_steps, "lora.r": config.lora.r}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"key {key!r}: must be ≥ 1, got {value}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"key 'max_steps': must be ≥ 1 (or -1 to run `epochs`), got {config.max_steps}")
    if config.max_steps == -1 and config.epochs <= 0:
        raise ConfigError(f"key 'epochs': must be > 0 when max_steps is -1, got {config.epochs}")
    if config.global_batch_size is not None and config.global_batch_size < 1:
        raise ConfigError(f"key 'global_batch_size': must be ≥ 1, got {config.global_batch_size}")
    for key in ("save_steps", "save_total_limit", "max_nan_skips"):
        if getattr(config, key) < 0:
            raise ConfigError(f"key {key!r}: must be ≥ 0, got {getattr(config, key)}")
    if not 0 <= config.optim.warmup_ratio < 1:
        raise ConfigError(f"key 'optim.warmup_ratio': must be in [0, 1), got {config.optim.warmup_ratio}")
    for key in ("lr", "projector_lr", "vision_lr", "embeddings_lr"):
        value = getattr(config.optim, key)
        if value is not None and value < 0:
            raise ConfigError(f"key 'optim.{key}': must be ≥ 0, got {value}")
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if config.optim.scheduler not in names:
        raise ConfigError(f"key 'optim.scheduler': {config.optim.scheduler!r} is not one of {', '.join(names)}")
    from midtune.checkpoint import CheckpointError, check_attn_implementation

    try:
        check_attn_implementation(config.attn_implementation)
    except CheckpointError as e:
        raise ConfigError(f"key {e}") from None
    low = {"bfloat16": "bf16", "float16": "fp16"}
    if config.dtype in low and config.trainable_dtype == "float32" and config.mixed_precision == "no":
        raise ConfigError(
            f"keys 'dtype'/'mixed_precision': dtype={config.dtype} keeps the frozen weights in {config.dtype} and what "
            f"trains in float32, which needs autocast; set mixed_precision={low[config.dtype]} (or auto), or "
            f"dtype=float32, or trainable_dtype={config.dtype} to update {config.dtype} weights directly")
    if config.method == "lora" and config.trainable.layers in (None, "none", []):
        raise ConfigError("method 'lora' needs trainable.layers: the block of LLM layers that gets adapters")


def derive_grad_accum(config: TrainConfig, world_size: int) -> None:
    """With `global_batch_size`, set grad_accum to global / (batch_size × world_size); a remainder, or a
    grad_accum given as well that disagrees, is refused naming the numbers."""
    if config.global_batch_size is None:
        return
    per_step = config.batch_size * world_size
    accum, remainder = divmod(config.global_batch_size, per_step)
    if remainder or accum < 1:
        raise ConfigError(f"key 'global_batch_size': {config.global_batch_size} rows per step is not a multiple of "
                          f"batch_size {config.batch_size} × {world_size} processes = {per_step}")
    if config.grad_accum not in (1, accum):
        raise ConfigError(f"keys 'global_batch_size'/'grad_accum': {config.global_batch_size} rows per step over "
                          f"{per_step} per micro-step needs grad_accum {accum}, but grad_accum is "
                          f"{config.grad_accum}; give one of the two")
    config.grad_accum = accum


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: TrainConfig) -> dict:
    container = OmegaConf.to_container(OmegaConf.structured(config))
    assert isinstance(container, dict)
    return container


def plain(value: Any) -> Any:
    """OmegaConf containers → plain Python (for the layer spec parser)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """`python -m train.config --config C.yaml [key=value ...]`: check a run config's keys and values exactly as
    `train` reads them, without loading a model, data or torch (under a second), and print it resolved. `compare`
    checks every training of an experiment this way before its first stage runs (and the layer spec itself)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m train.config", description=main.__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML run config")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_yaml(config), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
