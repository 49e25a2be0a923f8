"""Per-layer representations of image ↔ caption pairs, streamed to disk.

For every pair of a pairs file (the shapes world's ``pairs.jsonl``: ``{id, image, caption, labels}``, images
relative to an image folder) two forward passes run, batched, under ``torch.no_grad()``:

1. the image with a fixed prompt: the model's chat template with one user turn ``[image, prompt text]`` and the
   assistant prefix (``add_generation_prompt``), default prompt "Describe the image." (the shapes world's
   caption instruction);
2. the caption alone: by default as plain text (``caption_format="plain"``: the tokenizer's own special tokens,
   e.g. a BOS, and nothing else around it); with ``caption_format="chat"`` as a user turn of the chat template.

From ``hidden_states`` (all of them: index 0 = the embeddings, index l = the output of decoder layer l − 1 = the
input of layer l, the last index = the final norm's output, as transformers returns them; num_layers + 1 in all)
three vectors per pair and layer are kept:

* ``image_mean``: the mean over the image-token positions (``input_ids == config.image_token_id``, via the family
  adapter) of pass 1;
* ``image_last``: the last non-padding token of pass 1 (the assistant prefix's last token);
* ``caption_mean``: the mean over the caption's own tokens in pass 2 — located through the tokenizer's offset
  mapping, so template and special tokens (and padding) are excluded, and so is the sequence's first position
  (an attention sink, see ``Extractor.run_describe``) where a tokenizer without BOS puts the caption's first token.

Batches are right-padded (padding never moves a position; the last token is the last attention-mask 1), and the
means are taken in float32.

On-disk layout of one extraction directory::

    index.json                                  format, fingerprint, model, family, num_layers, hidden_size,
                                                ids, labels, settings, shards, complete
    shard-<start:07d>-<stop:07d>.safetensors    pairs [start, stop): tensors image_mean, image_last,
                                                caption_mean, each float16 (stop - start, num_layers + 1, hidden);
                                                metadata {format, fingerprint, start, stop}

Each shard (``shard_size`` pairs, several batches) is written to a temporary file and renamed, and index.json is
rewritten (atomically) after every shard, so an interrupted extraction leaves only whole shards. Running again with
the same fingerprint (model weights, pairs, prompt, caption format, shard size, dtype) skips them; a directory made
with other settings is started over.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from midtune.files import atomic_file, read_jsonl, write_json

log = logging.getLogger("midtune.analysis")

FORMAT = "midtune-extract/1"
# What each protocol stores (docs/analysis.md compares them). "describe": the image with a fixed prompt against the
# caption alone. "authors": the image with its own question against a textual twin (the same question, the image
# replaced by its captions written out), both read at the same position: last token, sequence mean, one sampled
# image / caption token.
PROTOCOL_KINDS = {
    "describe": ("image_mean", "image_last", "caption_mean"),
    "authors": ("visual_last", "visual_mean", "visual_token", "textual_last", "textual_mean", "textual_token"),
}
PROTOCOLS = tuple(PROTOCOL_KINDS)
POSITIONS = ("last", "mean", "token")
KINDS = tuple(kind for kinds in PROTOCOL_KINDS.values() for kind in kinds)
DEFAULT_PROMPT = "Describe the image."
CAPTION_FORMATS = ("plain", "chat")
# The textual twin's instruction (the authors' wording); their captions follow, numbered, then the question.
TWIN_INSTRUCTION = "Below are {n} descriptions of an image. Use them to answer the question."
_SHARD_RE = re.compile(r"shard-(\d{7})-(\d{7})\.safetensors")


class AnalysisError(ValueError):
    """Bad input to an analysis command: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path  # absolute
    caption: str
    labels: dict = field(default_factory=dict)
    captions: tuple[str, ...] = ()  # every caption of the image (the row's `captions`; else just `caption`)
    question: str | None = None  # the sample's own question (the authors' protocol asks it of image and twin)


def read_pairs(path: str | Path, image_folder: str | Path | None = None, *, label: str | Sequence[str] | None = None,
               max_pairs: int | None = None, min_pairs: int = 1, allow_outside_images: bool = False,
               need_question: bool = False) -> list[Pair]:
    """The rows of a pairs JSONL file, checked: every row parses and has id/image/caption, every image exists
    inside the image folder (unless `allow_outside_images`), `label` (a name or several) is in every row's
    `labels`, and at least `min_pairs` rows remain after `max_pairs`. Optional keys: `captions` (a list of
    non-empty strings: all captions of the image) and `question` (a non-empty string), required in every row
    with `need_question`.

    `image_folder` defaults to `<pairs dir>/images`. Raises AnalysisError naming the file, row and problem."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"pairs file {str(path)!r} does not exist")
    folder = Path(image_folder) if image_folder is not None else path.parent / "images"
    if not folder.is_dir():
        raise AnalysisError(f"image folder {str(folder)!r} does not exist (pairs file {path})")
    if max_pairs is not None and max_pairs < 1:
        raise AnalysisError(f"max_pairs must be >= 1, got {max_pairs}")
    required = [label] if isinstance(label, str) else list(label or ())
    pairs: list[Pair] = []
    missing: list[str] = []
    for lineno, row in read_jsonl(path, error=AnalysisError):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        where = f"{path}: line {lineno}"
        if not isinstance(row, dict):
            raise AnalysisError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("id", "image", "caption"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise AnalysisError(f"{where}: missing or empty {key!r} (rows need id, image, caption, labels)")
        captions = row.get("captions", [row["caption"]])
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                      for c in captions):
            raise AnalysisError(f"{where} (id={row['id']!r}): 'captions' must be a list of non-empty strings")
        question = row.get("question")
        if (question is not None or need_question) and not (isinstance(question, str) and question.strip()):
            raise AnalysisError(f"{where} (id={row['id']!r}): {'no' if question is None else 'empty'} 'question' "
                                f"(the authors' protocol asks each image its row's question; --protocol describe "
                                f"needs none)")
        labels = row.get("labels") or {}
        if not isinstance(labels, dict):
            raise AnalysisError(f"{where} (id={row['id']!r}): 'labels' must be an object")
        absent = next((name for name in required if name not in labels), None)
        if absent is not None:
            have = ", ".join(sorted(labels)) or "none"
            raise AnalysisError(f"{where} (id={row['id']!r}): no label {absent!r} (this row has: {have})")
        image = (folder / row["image"]).resolve()
        if not allow_outside_images and not image.is_relative_to(folder.resolve()):
            raise AnalysisError(f"{where} (id={row['id']!r}): image path {row['image']!r} escapes the image "
                                f"folder {str(folder)!r} (--allow-outside-images permits it)")
        if not image.is_file():
            missing.append(f"line {lineno} (id={row['id']!r}): {image}")
        pairs.append(Pair(row["id"], image, row["caption"], {k: str(v) for k, v in labels.items()},
                          tuple(captions), question))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise AnalysisError(f"{path}: {len(missing)} image file(s) not found under {folder}: "
                            f"{'; '.join(missing[:3])}{more}")
    if len(pairs) < min_pairs:
        raise AnalysisError(f"{path}: {len(pairs)} pairs, but at least {min_pairs} are needed")
    seen: set[str] = set()
    for p in pairs:
        if p.id in seen:
            raise AnalysisError(f"{path}: duplicate pair id {p.id!r}")
        seen.add(p.id)
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Models: a merged/HF directory, a hub id, a midtune delta on its base, or a checkpoint's trainable tensors
# ---------------------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def parse_model_arg(value: str) -> tuple[str, str]:
    """`NAME=PATH` → (NAME, PATH). A bare PATH is named after its last component, or the one before it when that
    is a generic name (`final`, `delta.safetensors`, `trainable.safetensors`)."""
    name, sep, path = value.partition("=")
    if not sep:
        path = value
        parts = [p for p in Path(value).parts if p not in ("/", ".", "..")] or ["model"]
        generic = ("final", "delta.safetensors", "trainable.safetensors")
        name = parts[-2] if parts[-1] in generic and len(parts) > 1 else parts[-1]
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", name.removesuffix(".safetensors")).lstrip("._+-") or "model"
    if not NAME_RE.match(name):
        raise AnalysisError(f"--model {value!r}: the name {name!r} must be letters, digits, '.', '_', '+', '-'")
    if not path:
        raise AnalysisError(f"--model {value!r}: no path after '='")
    return name, path


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. `trainable`: a plain safetensors of trained tensors (a training checkpoint's
    `trainable.safetensors`) applied to `base`; `delta`: a midtune delta on `base`; else `base` alone."""

    base: str
    delta: str | None = None
    trainable: str | None = None
    lora_scale: float | None = None  # alpha / r, for LoRA tensors in a `trainable` file

    def describe(self) -> str:
        extra = self.delta or self.trainable
        return f"{extra} on base {self.base}" if extra else self.base

    def fingerprint(self) -> dict:
        """Identifies the weights without loading them: paths plus size and mtime of the weight files."""
        def stamp(path: str | None):
            if path is None:
                return None
            p = Path(path)
            files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.exists() else []
            return [str(p.resolve()) if p.exists() else path,
                    [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]

        return {"base": stamp(self.base), "delta": stamp(self.delta), "trainable": stamp(self.trainable),
                "lora_scale": self.lora_scale}


def resolve_model(path: str, base: str | None = None, lora_scale: float | None = None) -> ModelRef:
    """What `--model NAME=PATH` (and `--base`) name. Raises AnalysisError/CheckpointError naming the problem.

    * a checkpoint directory (`checkpoint-N/` holding `trainable.safetensors`) or a safetensors file without midtune
      delta metadata → those tensors on `--base` (required);
    * a midtune delta (`final/delta.safetensors`, or a run's `final/` holding only a delta) → on `--base` if given,
      else on the base named in its metadata;
    * otherwise a merged/HF model directory or a hub id.
    """
    from midtune.checkpoint import DELTA_FORMAT
    from midtune.sources import resolve_source

    local = Path(path).expanduser()
    if local.is_dir() and (local / "trainable.safetensors").is_file() and not (local / "config.json").is_file():
        local = local / "trainable.safetensors"
    if local.is_file() and local.suffix == ".safetensors":
        if _safetensors_format(local) != DELTA_FORMAT:
            if base is None:
                raise AnalysisError(f"{str(local)!r} holds trained tensors without midtune delta metadata (a "
                                    f"training checkpoint's trainable.safetensors): give the model they belong to "
                                    f"with --base")
            return ModelRef(resolve_source(base).pretrained, trainable=str(local), lora_scale=lora_scale)
        source = resolve_source(base, str(local))
        return ModelRef(source.pretrained, delta=source.delta)
    source = resolve_source(path)  # a full model: `base` (meant for deltas and checkpoints) does not apply
    return ModelRef(source.pretrained, delta=source.delta)


def _safetensors_format(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception as e:
        raise AnalysisError(f"{str(path)!r}: not a readable safetensors file ({e})") from None


def load_model(ref: ModelRef, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa"):
    """(model, processor) in eval mode on `device` (default: CUDA if available, else CPU)."""
    from midtune.checkpoint import (
        LORA_PARAMETER,
        CheckpointError,
        apply_trained_tensors,
        load_pretrained,
        load_with_delta,
    )
    from midtune.sources import resolve_device

    try:
        if ref.delta:
            model, processor = load_with_delta(ref.base, ref.delta, dtype=dtype, trust_remote_code=trust_remote_code,
                                               attn_implementation=attn_implementation)
        else:
            model, processor = load_pretrained(ref.base, dtype=dtype, trust_remote_code=trust_remote_code,
                                               attn_implementation=attn_implementation)
        if ref.trainable:
            from safetensors.torch import load_file

            tensors = load_file(ref.trainable)
            if ref.lora_scale is None and any(LORA_PARAMETER.fullmatch(name) for name in tensors):
                raise AnalysisError(f"{ref.trainable}: holds LoRA adapters; give their scale (lora alpha / r) with "
                                    f"--lora-scale")
            model = apply_trained_tensors(model, tensors, ref.lora_scale)
    except (CheckpointError, AnalysisError):
        raise
    except (OSError, ValueError) as e:
        raise AnalysisError(f"model {ref.describe()!r} could not be loaded: {str(e).splitlines()[0]}") from None
    return model.to(resolve_device(device)).eval(), processor


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    """The tokenizer alone (a second or less), for checks that should fail before a model loads; None when the
    source has none that AutoTokenizer reads (the checks then run after loading)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ExtractSettings:
    protocol: str = "describe"  # describe | authors (PROTOCOL_KINDS)
    prompt: str = DEFAULT_PROMPT  # describe only
    caption_format: str = "plain"  # plain | chat
    batch_size: int = 8
    shard_size: int = 256  # pairs per shard file
    dtype: str = "float32"  # weights
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 ...
    token_seed: int = 0  # authors: which image / caption token is "the sampled token" of a pair

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise AnalysisError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.caption_format not in CAPTION_FORMATS:
            raise AnalysisError(f"caption format {self.caption_format!r} is not one of {', '.join(CAPTION_FORMATS)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise AnalysisError("batch size and shard size must be >= 1")


def fingerprint(model_fp: dict, pairs: Sequence[Pair], settings: ExtractSettings) -> str:
    """Everything the stored vectors depend on (batch size does not: batches are padding-invariant)."""
    authors = settings.protocol == "authors"
    digest = hashlib.sha256()
    for p in pairs:
        row = [p.id, str(p.image), p.caption] + ([list(p.captions), p.question] if authors else [])
        digest.update(json.dumps(row).encode())
    payload = {"format": FORMAT, "model": model_fp, "pairs": digest.hexdigest(), "prompt": settings.prompt,
               "caption_format": settings.caption_format, "shard_size": settings.shard_size, "dtype": settings.dtype}
    # Keys only where they differ from the defaults, which keeps the fingerprints of earlier extractions valid.
    if settings.attn_implementation != "sdpa":
        payload["attn_implementation"] = settings.attn_implementation
    if authors:
        payload.update(protocol=settings.protocol, token_seed=settings.token_seed, twin=TWIN_INSTRUCTION)
    else:  # the caption mean leaves the attention sink out (Extractor.run_describe)
        payload["caption_mean"] = "without the sequence's first position"
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def extract(ref: ModelRef | tuple, pairs: Sequence[Pair], out_dir: str | Path,
            settings: ExtractSettings | None = None, *, device: str | None = None, progress: bool = True,
            trust_remote_code: bool = False, on_shard: Callable[[dict], None] | None = None) -> "Extraction":
    """Extract (or finish extracting) `pairs` through a model into `out_dir`; returns the complete Extraction.

    `ref` is a ModelRef (loaded only if something is left to do) or an already loaded `(model, processor)`
    (then its fingerprint is the model's name_or_path and parameter count, so pass a fresh directory for
    different weights). `on_shard(info)` is called after each shard is written (tests use it to interrupt)."""
    settings = settings or ExtractSettings()
    settings.check()
    if settings.protocol == "authors":
        lacking = next((p for p in pairs if not p.question), None)
        if lacking is not None:
            raise AnalysisError(f"pair {lacking.id!r} has no question; the authors' protocol asks each image its "
                                f"row's question (pairs rows need a 'question')")
    kinds = PROTOCOL_KINDS[settings.protocol]
    out_dir = Path(out_dir)
    loaded = None if isinstance(ref, ModelRef) else ref
    if loaded is not None:
        model = loaded[0]
        model_fp = {"loaded": getattr(model.config, "_name_or_path", type(model).__name__),
                    "parameters": sum(p.numel() for p in model.parameters())}
    else:
        model_fp = ref.fingerprint()
    fp = fingerprint(model_fp, pairs, settings)
    done = _resume_state(out_dir, fp, len(pairs), kinds[0])
    ranges = [(s, min(s + settings.shard_size, len(pairs))) for s in range(0, len(pairs), settings.shard_size)]
    todo = [r for r in ranges if r not in done]
    if not todo and (out_dir / "index.json").is_file():
        index = json.loads((out_dir / "index.json").read_text())
        if index.get("complete") and index.get("fingerprint") == fp:
            return Extraction(out_dir)
    if done:
        log.info(f"extraction {out_dir}: resuming, {len(done)} of {len(ranges)} shards already written")

    if loaded is None:
        model, processor = load_model(ref, settings.dtype, device, trust_remote_code, settings.attn_implementation)
        describe = ref.describe()
    else:
        model, processor = loaded
        describe = model_fp["loaded"]
    try:
        extractor = Extractor(model, processor, settings)
        index = {
            "format": FORMAT, "fingerprint": fp, "model": describe, "family": extractor.family.name,
            "num_layers": extractor.num_layers, "hidden_size": None, "n_pairs": len(pairs),
            "ids": [p.id for p in pairs], "labels": [p.labels for p in pairs], "settings": asdict(settings),
            "protocol": settings.protocol, "kinds": list(kinds),
            "representations": _representations(settings),
            "layers": "hidden_states index: 0 = embeddings, l = output of decoder layer l-1, last = final norm",
            "shards": [], "complete": False,
        }
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(b - a for a, b in todo), desc=f"extract {out_dir.name}", unit="pair",
                   disable=not progress)
        for start, stop in todo:
            chunk = pairs[start:stop]
            parts = {k: [] for k in kinds}
            for b in range(0, len(chunk), settings.batch_size):
                batch = chunk[b:b + settings.batch_size]
                for kind, value in extractor.run(batch).items():
                    parts[kind].append(value)
                bar.update(len(batch))
            tensors = {k: torch.cat(v).to(torch.float16).contiguous() for k, v in parts.items()}
            _warn_overflow(tensors, start, stop)
            _write_shard(out_dir, start, stop, tensors, fp)
            done[(start, stop)] = tensors[kinds[0]].shape[-1]
            _write_index(out_dir, index, done, len(ranges))
            if on_shard is not None:
                on_shard({"start": start, "stop": stop, "dir": out_dir})
        bar.close()
        if not todo:  # every shard was there but the index was not (interrupted between the two writes)
            _write_index(out_dir, index, done, len(ranges))
    finally:
        if loaded is None:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return Extraction(out_dir)


def _representations(settings: ExtractSettings) -> dict[str, str]:
    if settings.protocol == "describe":
        return {"image_mean": "mean over image-token positions of the image + prompt pass",
                "image_last": "last non-padding token of the image + prompt pass",
                "caption_mean": f"mean over the caption's tokens ({settings.caption_format} text pass), the "
                                f"sequence's first position (an attention sink) left out"}
    where = {"last": "last non-padding token (the assistant prefix's last token)",
             "mean": "mean over every non-padding token of the sequence",
             "token": f"one image token (visual) / caption token (textual) drawn per pair (seed {settings.token_seed})"}
    passes = {"visual": "the image + its question, in the chat template",
              "textual": "the textual twin: the captions written out + the same question, in the chat template"}
    return {f"{side}_{pos}": f"{text} of {passes[side]}" for side in passes for pos, text in where.items()}


def _shard_name(start: int, stop: int) -> str:
    return f"shard-{start:07d}-{stop:07d}.safetensors"


def _resume_state(out_dir: Path, fp: str, n: int, first_kind: str) -> dict[tuple[int, int], int]:
    """Shards already written with this fingerprint: {(start, stop): hidden_size}. Anything else in the directory
    from another extraction (other model/pairs/settings) is removed, with a message."""
    from safetensors import safe_open

    done: dict[tuple[int, int], int] = {}
    if not out_dir.is_dir():
        return done
    stale = []
    for f in sorted(out_dir.iterdir()):
        m = _SHARD_RE.fullmatch(f.name)
        if f.name.startswith(".shard-") and ".tmp" in f.name:  # a shard whose write was interrupted
            f.unlink()
            continue
        if not m:
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata() or {}
                hidden = st.get_slice(first_kind).get_shape()[-1] if first_kind in st.keys() else None
        except Exception:
            meta, hidden = {}, None
        start, stop = int(m.group(1)), int(m.group(2))
        if meta.get("fingerprint") == fp and hidden and stop <= n:
            done[(start, stop)] = hidden
        else:
            stale.append(f)
    if stale:
        log.warning(f"extraction {out_dir}: {len(stale)} shard(s) from other settings or weights; starting over")
        for f in stale:
            f.unlink()
        (out_dir / "index.json").unlink(missing_ok=True)
    return done


def _write_index(out_dir: Path, index: dict, done: dict[tuple[int, int], int], n_shards: int) -> None:
    index["hidden_size"] = next(iter(done.values()), None)
    index["shards"] = [{"file": _shard_name(a, b), "start": a, "stop": b} for a, b in sorted(done)]
    index["complete"] = len(done) == n_shards
    write_json(out_dir / "index.json", index)


def _write_shard(out_dir: Path, start: int, stop: int, tensors: dict, fp: str) -> None:
    from safetensors.torch import save_file

    with atomic_file(out_dir / _shard_name(start, stop)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "fingerprint": fp, "start": str(start),
                                                "stop": str(stop)})


def _warn_overflow(tensors: dict, start: int, stop: int) -> None:
    for kind, t in tensors.items():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            layers = sorted({int(i) for i in bad.nonzero()[:, 1].tolist()})
            warnings.warn(f"extraction: {kind} of pairs {start}-{stop} is NaN/inf (or beyond float16 range) at "
                          f"layer(s) {layers[:8]}; metrics on those layers will be NaN", RuntimeWarning, stacklevel=3)


class Extractor:
    """The two forward passes of a batch of pairs and the per-layer vectors they give."""

    def __init__(self, model, processor, settings: ExtractSettings):
        from midtune.adapters import family_of

        self.model, self.processor, self.settings = model, processor, settings
        self.family = family_of(model)
        self.num_layers = self.family.parts(model).num_layers
        self.image_token_id = self.family.image_token_id(model.config)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self.accepted = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set(params)
        self.only_last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.image_prompt = self._render(settings.prompt, n_images=1, generation=True,
                                         fallback=f"{self.family.image_placeholder}\n{settings.prompt}")

    def _render(self, text: str, n_images: int, generation: bool, fallback: str) -> str:
        """One user turn through the chat template, built and rendered as training and eval build theirs."""
        from midtune.data import content_parts, render_chat

        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            warnings.warn("the processor has no chat template; using a bare prompt", RuntimeWarning, stacklevel=3)
            return fallback
        messages = [{"role": "user", "content": content_parts(text, n_images)}]
        return render_chat(self.processor, messages, add_generation_prompt=generation)

    def forward(self, inputs: dict, output_hidden_states: bool = False):
        """The model's output on `inputs` (moved to its device and dtype; keys it does not take dropped)."""
        inputs = {k: v for k, v in inputs.items() if self.accepted is None or k in self.accepted}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                inputs[k] = v.to(self.dtype) if v.is_floating_point() else v
        # logits_to_keep=1: the callers read hidden states or hooks; full-vocabulary logits at every position cost
        # as much as a quarter of a small LLM's forward (SmolLM2-135M: 49k × 576 against 30 layers of 576)
        with torch.no_grad():
            return self.model(**inputs, output_hidden_states=output_hidden_states, use_cache=False,
                              return_dict=True, **self.only_last_logits)

    def hidden_states(self, inputs: dict) -> tuple:
        states = self.forward(inputs, output_hidden_states=True).hidden_states
        if states is None or len(states) != self.num_layers + 1:
            raise AnalysisError(f"{type(self.model).__name__} returned {len(states or ())} hidden states, expected "
                                f"num_layers + 1 = {self.num_layers + 1}")
        return states

    def encode_images(self, batch: Sequence[Pair], suffixes: Sequence[str] | None = None,
                      prompts: Sequence[str] | None = None) -> tuple[dict, torch.Tensor]:
        """Pass 1's inputs, right-padded: each pair's image with the prompt (`prompts[i]`, rendered, or the fixed
        one; plus `suffixes[i]` after it, e.g. the caption as the answer), and the (batch, seq) mask of image-token
        positions."""
        from midtune.data import add_special_tokens_for, load_image
        from midtune.images import fit_images

        texts = [(prompts[i] if prompts else self.image_prompt) + (suffixes[i] if suffixes else "")
                 for i in range(len(batch))]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            images = fit_images(self.processor, [load_image(str(p.image)) for p in batch])  # as the model trained
            enc = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                 add_special_tokens=add_special_tokens_for(self.tokenizer, texts[0]))
        finally:
            self.tokenizer.padding_side = side
        image_mask = (enc["input_ids"] == self.image_token_id) & enc["attention_mask"].bool()
        empty = (~image_mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise AnalysisError(f"pair {batch[empty[0]].id!r}: no image tokens (id {self.image_token_id}) in the "
                                f"image prompt; does the chat template write the image placeholder?")
        return dict(enc), image_mask

    def encode_texts(self, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], batch: Sequence[Pair],
                     add_special_tokens: bool = True) -> tuple[dict, torch.Tensor]:
        """Text-only inputs, right-padded, and the (batch, seq) mask of the tokens inside each row's character
        `spans` (the captions): real tokens only, no special, template or padding tokens."""
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt", return_offsets_mapping=True,
                             padding_side="right", add_special_tokens=add_special_tokens)
        offsets = enc.pop("offset_mapping")
        mask = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
        for row, row_spans in enumerate(spans):
            for lo, hi in row_spans:
                mask[row] |= (offsets[row, :, 0] >= lo) & (offsets[row, :, 1] <= hi)
        special = torch.isin(enc["input_ids"], torch.tensor(sorted(self.special_ids)))
        mask &= enc["attention_mask"].bool() & ~special & (offsets[..., 1] > offsets[..., 0])
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise AnalysisError(f"pair {batch[empty[0]].id!r}: its caption has no tokens of its own")
        return dict(enc), mask

    def run(self, batch: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """{kind: (batch, num_layers + 1, hidden) float32} for the protocol's kinds."""
        return self.run_authors(batch) if self.settings.protocol == "authors" else self.run_describe(batch)

    def run_describe(self, batch: Sequence[Pair]) -> dict[str, torch.Tensor]:
        # Pass 1: image + prompt, right-padded.
        enc, image_mask = self.encode_images(batch)
        last = last_positions(enc["attention_mask"])
        states = self.hidden_states(enc)
        image_mean = masked_means(states, image_mask)
        image_last = at_positions(states, last)

        # Pass 2: the caption alone.
        texts, spans = [], []
        for p in batch:
            if self.settings.caption_format == "plain":
                text, span = p.caption, (0, len(p.caption))
            else:
                text = self._render(p.caption, n_images=0, generation=False, fallback=p.caption)
                at = text.find(p.caption)
                if at < 0:
                    raise AnalysisError(f"pair {p.id!r}: the chat template changed the caption text")
                span = (at, at + len(p.caption))
            texts.append(text)
            spans.append(span)
        enc, caption_mask = self.encode_texts(texts, [[span] for span in spans], batch)
        # The sequence's first position is an attention sink: from mid-depth on its state is a massive activation
        # (SmolLM2: 170× the other tokens' norm from hidden state 12), nearly the same vector for every caption that
        # starts with the same word. A plain caption of a tokenizer without BOS starts there, and its mean then
        # carries that vector / caption length: every caption on one line, ordered by length (GRIDE 5.4 → 1.0 at
        # hidden state 12 of the demo's SmolLM2, docs/analysis.md). Left out, unless it is the caption's only token.
        caption_mask[:, 0] &= caption_mask[:, 1:].sum(1) == 0
        states = self.hidden_states({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        caption_mean = masked_means(states, caption_mask)
        return {"image_mean": image_mean, "image_last": image_last, "caption_mean": caption_mean}

    def run_authors(self, batch: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """The authors' pair of passes: the image with its question, and the textual twin (the same question with
        the captions in the image's place), both in the chat template with the assistant prefix, both read at the
        last token, as a sequence mean, and at one drawn image / caption token."""
        from midtune.data import add_special_tokens_for

        placeholder = self.family.image_placeholder
        prompts = [self._render(p.question, n_images=1, generation=True, fallback=f"{placeholder}\n{p.question}")
                   for p in batch]
        enc, image_mask = self.encode_images(batch, prompts=prompts)
        out = self._positions("visual", self.hidden_states(enc), enc["attention_mask"], image_mask, batch)

        texts, spans = [], []
        for p in batch:
            twin = twin_text(p.captions or (p.caption,), p.question)
            text = self._render(twin, n_images=0, generation=True, fallback=twin)
            spans.append(_caption_spans(text, p))
            texts.append(text)
        enc, caption_mask = self.encode_texts(texts, spans, batch,
                                              add_special_tokens=add_special_tokens_for(self.tokenizer, texts[0]))
        states = self.hidden_states({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        out.update(self._positions("textual", states, enc["attention_mask"], caption_mask, batch))
        return out

    def _positions(self, side: str, states, attention_mask: torch.Tensor, token_mask: torch.Tensor,
                   batch: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """`<side>_last`, `<side>_mean` (over every non-padding token), `<side>_token` (one of `token_mask`'s
        positions per pair, drawn from the pair's id and the token seed, so batching does not change it)."""
        drawn = torch.tensor([_draw(token_mask[i].nonzero().flatten(), p.id, side, self.settings.token_seed)
                              for i, p in enumerate(batch)])
        return {f"{side}_last": at_positions(states, last_positions(attention_mask)),
                f"{side}_mean": masked_means(states, attention_mask.bool()),
                f"{side}_token": at_positions(states, drawn)}


def twin_text(captions: Sequence[str], question: str) -> str:
    """The textual twin's user turn: the instruction, the captions numbered one per line, the question."""
    lines = [TWIN_INSTRUCTION.format(n=len(captions))] + [f"{i}. {c}" for i, c in enumerate(captions, 1)]
    return "\n".join(lines + [question])


def _caption_spans(text: str, pair: Pair) -> list[tuple[int, int]]:
    """Character spans of the pair's captions in the rendered twin, found in order."""
    spans, at = [], 0
    for caption in pair.captions or (pair.caption,):
        start = text.find(caption, at)
        if start < 0:
            raise AnalysisError(f"pair {pair.id!r}: the chat template changed a caption's text")
        spans.append((start, start + len(caption)))
        at = start + len(caption)
    return spans


def _draw(positions: torch.Tensor, pair_id: str, side: str, seed: int) -> int:
    """One of `positions`, the same for a pair whatever the batch it is in."""
    key = hashlib.sha256(f"{seed}:{side}:{pair_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return int(positions[rng.integers(len(positions))])


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding token (right or left padding)."""
    n = attention_mask.shape[1]
    positions = torch.arange(n).expand_as(attention_mask)
    return torch.where(attention_mask.bool().cpu(), positions, -1).max(dim=1).values


def at_positions(states: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """(batch, len(states), hidden) float32: each state at one position per row."""
    rows = torch.arange(len(positions))
    return torch.stack([h[rows, positions.to(h.device)].float().cpu() for h in states], dim=1)


def masked_means(states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(batch, len(states), hidden) float32: each state's mean over the positions where `mask` is true."""
    out = []
    for h in states:
        m = mask.to(h.device, torch.float32)
        out.append((torch.einsum("bt,bth->bh", m, h.float()) / m.sum(1, keepdim=True)).cpu())
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


class Extraction:
    """A complete extraction directory: `layer(kind, l)` → (N, hidden) float32 for hidden-state index l."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise AnalysisError(f"{self.path}: not an extraction directory (no index.json)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise AnalysisError(f"{index_file}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        if not self.index.get("complete"):
            raise AnalysisError(f"{self.path}: the extraction is incomplete; run it again to finish it")
        self.ids: list[str] = self.index["ids"]
        self.labels: list[dict] = self.index["labels"]
        self.num_layers: int = self.index["num_layers"]
        self.hidden_size: int = self.index["hidden_size"]
        self.protocol: str = self.index.get("protocol", "describe")  # extractions before the authors' protocol
        self.kinds: tuple[str, ...] = tuple(self.index.get("kinds", PROTOCOL_KINDS[self.protocol]))

    @property
    def num_states(self) -> int:
        return self.num_layers + 1

    def layer(self, kind: str, layer: int) -> np.ndarray:
        from safetensors import safe_open

        if kind not in self.kinds:
            raise AnalysisError(f"{self.path}: no representation {kind!r} ({self.protocol} protocol: "
                                f"{', '.join(self.kinds)})")
        if not 0 <= layer < self.num_states:
            raise AnalysisError(f"layer {layer} out of range 0..{self.num_layers}")
        parts = []
        for shard in self.index["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                parts.append(f.get_slice(kind)[:, layer:layer + 1, :][:, 0].float().numpy())
        return np.concatenate(parts)

    def array(self, kind: str) -> np.ndarray:
        """(N, num_layers + 1, hidden) float32 — everything at once."""
        from safetensors import safe_open

        parts = []
        for shard in self.index["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                parts.append(f.get_tensor(kind).float().numpy())
        return np.concatenate(parts)


class InMemoryExtraction:
    """The Extraction interface over arrays {kind: (N, num_layers + 1, hidden)} (tests, notebooks)."""

    def __init__(self, arrays: dict[str, np.ndarray], ids: Iterable[str] | None = None):
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        first = next(iter(self.arrays.values()))
        self.num_layers = first.shape[1] - 1
        self.hidden_size = first.shape[2]
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(first))]
        self.kinds = tuple(self.arrays)
        self.protocol = "authors" if "visual_last" in self.arrays else "describe"

    @property
    def num_states(self) -> int:
        return self.num_layers + 1

    def layer(self, kind: str, layer: int) -> np.ndarray:
        return self.arrays[kind][:, layer]

    def array(self, kind: str) -> np.ndarray:
        return self.arrays[kind]
