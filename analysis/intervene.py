"""Causal intervention: block attention to the image (or to one token) in a window of LLM layers, measure the loss.

Targets (`--target`; the Narrow Gate's token choices, Serra et al. 2024):

* ``image`` (default): every text position after the (first) image — the question, the template's tokens, the
  assistant prefix and the answer — is kept from attending to the image-token positions; the image tokens still
  attend to each other and to what precedes them;
* ``last-image``: every later position is kept from attending to the last image token;
* ``after-image``: … to the token right after the image (Qwen's ``<|vision_end|>``, LLaVA's first text token);
* ``last``: … to the last token of the prompt (the one that predicts the answer's first token): only the answer's
  own tokens lose it, so only answer tokens after the first can change — a task whose choices are all one token
  cannot (the command says so). Without a prompt length (a bare forward) it is the sequence's last token, which
  nothing after it can attend to, so blocking it changes nothing.

The window slides over the LLM (stride 1 by default), and accuracy on the shapes world's test questions is
measured per window, with no intervention (the baseline) and with every layer blocked.

How the block is applied (stock transformers, no patched classes): a forward pre-hook on the top-level model reads
`input_ids` and builds the (batch, query, key) block; a forward pre-hook on each decoder layer's self-attention (found
through the adapter table) replaces its `attention_mask` keyword with one where those query → key entries are
masked. In transformers 5 the decoder layers pass the mask as a keyword: eager attention gets an additive float mask
(masked entries set to the dtype's minimum), sdpa a boolean one (False = masked), or None when it relies on
`is_causal` (no padding) — then a causal boolean mask is built first (and sdpa, given a mask, stops using
`is_causal`). Other attention backends (flash, flex) are switched to sdpa. A forward with a KV cache (as in
generation, where later calls see only the new tokens) is refused in blocked layers, so a blocked model is never
silently unblocked for generated tokens.

Scoring: no free generation. Each question's `choices` are scored by log-likelihood as the assistant's answer after
the chat-template prompt (the image, then the question) — the same prompt and rule as the `midtune_shapes_mc`
lmms-eval tasks — and the prediction is the choice with the lowest negative log-likelihood (summed over its
tokens); accuracy is exact match of that choice with `answer`. This is deterministic, needs no answer parsing, and
keeps the block in force for every scored token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Self, Sequence

import torch

from analysis.extract import AnalysisError, last_positions
from midtune.files import read_jsonl
from midtune.scoring import score_continuations

log = logging.getLogger("midtune.analysis")

QTYPES = ("color", "shape", "count", "position", "exists")
TARGETS = ("image", "last-image", "after-image", "last")
TARGET_TEXT = {
    "image": "attention from text positions after the image to image-token positions",
    "last-image": "attention from later positions to the last image token",
    "after-image": "attention from later positions to the token right after the image",
    "last": "attention from the answer's tokens to the prompt's last token (moves only answer tokens after the first)",
}


class Hooks:
    """Forward hooks (their handles in `_handles`) removed by `remove()` or at the end of a `with` block."""

    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AttentionKnockout(Hooks):
    """Forward hooks that block attention to `target` (see the module docstring) in the decoder layers `layers`.

    Usage::

        with AttentionKnockout(model, target="image") as knockout:
            knockout.layers = range(0, 4)      # decoder-layer indices; empty = no intervention
            logits = model(**inputs, use_cache=False).logits

    For target ``last``, `last_positions` (one index per row, set before the forward) names the prompt's last
    token; when None, each row's last non-padding token is taken.
    """

    def __init__(self, model, target: str = "image"):
        from midtune.adapters import family_of

        if target not in TARGETS:
            raise AnalysisError(f"knockout target {target!r} is not one of {', '.join(TARGETS)}")
        self.model, self.target = model, target
        self.last_positions: torch.Tensor | None = None
        family = family_of(model)
        parts = family.parts(model)
        self.num_layers = parts.num_layers
        self.image_token_id = family.image_token_id(model.config)
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ("eager", "sdpa"):
            model.set_attn_implementation("sdpa")
        self._layers: frozenset[int] = frozenset()
        self._block: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        for i in range(parts.num_layers):
            self._handles.append(parts.attention(i).register_forward_pre_hook(partial(self._mask, i), with_kwargs=True))
        self.applied = 0  # attention calls whose mask was replaced (tests check that the hooks fire)

    @property
    def layers(self) -> frozenset[int]:
        return self._layers

    @layers.setter
    def layers(self, value: Iterable[int]) -> None:
        value = frozenset(int(i) for i in value)
        bad = [i for i in value if not 0 <= i < self.num_layers]
        if bad:
            raise AnalysisError(f"knockout layers {sorted(bad)} out of range 0..{self.num_layers - 1}")
        self._layers = value

    # -- hooks -------------------------------------------------------------------------------------------------
    def _capture(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self._block = None
            return None
        last = self.last_positions
        if self.target == "last" and last is None:
            mask = kwargs.get("attention_mask")
            last = last_positions(mask) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
                torch.full((ids.shape[0],), ids.shape[1] - 1)
        self._block = knockout_block(ids, self.image_token_id, self.target, last)
        return None

    def _mask(self, index: int, module, args, kwargs):
        if index not in self._layers:
            return None
        if "attention_mask" not in kwargs:
            raise AnalysisError(f"{type(module).__name__} in layer {index} was not given attention_mask as a keyword; "
                                f"this transformers version is not supported by the knockout")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        block = self._block
        if block is None:
            raise AnalysisError("knockout: the model was called without input_ids, so image positions are unknown")
        mask = kwargs["attention_mask"]
        keys = mask.shape[-1] if isinstance(mask, torch.Tensor) else hidden.shape[1]
        if uses_cache(args, kwargs) or block.shape[1:] != (hidden.shape[1], keys):
            # With a cache, later calls see only the new tokens: their block would miss the image (and
            # generated tokens would attend to it unblocked). Score whole sequences instead.
            raise AnalysisError(f"knockout: layer {index} was called with a KV cache (as in generation); "
                                f"score full sequences with use_cache=False")
        kwargs["attention_mask"] = blocked_mask(mask, block.to(hidden.device), hidden.dtype,
                                                getattr(module.config, "_attn_implementation", "sdpa"))
        self.applied += 1
        return args, kwargs


def uses_cache(args, kwargs) -> bool:
    """Whether a layer call carries a KV cache, found by type: transformers renamed the keyword (`past_key_values`
    up to 5.23, `cache` from 5.24), and a decode step's sdpa mask can be None, so neither name nor shape shows it."""
    from transformers.cache_utils import Cache

    return any(isinstance(v, Cache) for v in (*args, *kwargs.values()))


def knockout_block(input_ids: torch.Tensor, image_token_id: int, target: str = "image",
                   last: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, query, key) bool: True where attention from a query to a key is blocked for `target`.

    ``image``: non-image positions after the first image token × image keys. The token targets: one key per row
    (the last image token, the token after it, or `last[row]`) × every strictly later query; a row without an
    image (or whose key lies outside the sequence) is left alone."""
    is_image = input_ids == image_token_id
    if target == "image":
        after = is_image.long().cumsum(dim=1) > 0
        query = after & ~is_image
        return query[:, :, None] & is_image[:, None, :]
    batch, n = input_ids.shape
    positions = torch.arange(n, device=input_ids.device)
    last_image = torch.where(is_image, positions, -1).max(dim=1).values
    if target == "last-image":
        key = last_image
    elif target == "after-image":
        key = torch.where(last_image >= 0, last_image + 1, -1)
    elif target == "last":
        if last is None:
            raise AnalysisError("knockout target 'last' needs each row's last prompt position")
        key = torch.as_tensor(last, device=input_ids.device).long()
    else:
        raise AnalysisError(f"knockout target {target!r} is not one of {', '.join(TARGETS)}")
    key = torch.where((key >= 0) & (key < n), key, -1)[:, None]
    keys = positions[None, :] == key  # (batch, key); all False where key is -1
    queries = (positions[None, :] > key) & (key >= 0)
    return queries[:, :, None] & keys[:, None, :]


def blocked_mask(mask: torch.Tensor | None, block: torch.Tensor, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """`mask` (None, 4-D bool with True = attend, or 4-D additive float) with the `block` entries masked."""
    _, q, k = block.shape
    blk = block[:, None]  # (batch, 1, query, key), broadcast over heads
    if mask is None:
        mask = torch.ones(q, k, dtype=torch.bool, device=block.device).tril()[None, None]
        if impl == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=block.device).masked_fill(~mask, torch.finfo(dtype).min)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (q, k):
        raise AnalysisError(f"knockout: unsupported attention mask {type(mask).__name__} "
                            f"{tuple(getattr(mask, 'shape', ()))} for {q} queries and {k} keys; use "
                            f"attn_implementation eager or sdpa without a cache")
    if mask.dtype == torch.bool:
        return mask & ~blk
    return mask.masked_fill(blk, torch.finfo(mask.dtype).min)


# ---------------------------------------------------------------------------------------------------------
# Questions and scoring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Question:
    task: str
    id: str
    image: Path
    question: str
    answer: str
    choices: list[str]


def read_questions(world: Path, tasks: Sequence[str], limit: int | None = None) -> list[Question]:
    """`<world>/test/<task>.jsonl` rows (first `limit` per task), images under `<world>/images`."""
    out = []
    for task in tasks:
        path = world / "test" / f"{task}.jsonl"
        if not path.is_file():
            have = sorted(p.stem for p in (world / "test").glob("*.jsonl")) if (world / "test").is_dir() else []
            raise AnalysisError(f"task {task!r}: {path} does not exist (tasks in this world: "
                                f"{', '.join(have) or 'none'})")
        rows = [row for _, row in read_jsonl(path, error=AnalysisError)]
        rows = rows[:limit] if limit else rows
        if not rows:
            raise AnalysisError(f"{path}: no questions")
        for i, row in enumerate(rows):
            missing = [k for k in ("id", "image", "question", "answer", "choices") if k not in row]
            if missing:
                raise AnalysisError(f"{path}: row {i + 1}: missing {', '.join(missing)}")
            if row["answer"] not in row["choices"]:
                raise AnalysisError(f"{path}: row {i + 1} (id={row['id']!r}): answer {row['answer']!r} is not "
                                    f"one of its choices")
            image = world / "images" / row["image"]
            if not image.is_file():
                raise AnalysisError(f"{path}: row {i + 1} (id={row['id']!r}): image {image} not found")
            out.append(Question(task, row["id"], image, row["question"], str(row["answer"]),
                                [str(c) for c in row["choices"]]))
    return out


class ChoiceScorer:
    """Encodes every (question, choice) once; `predict()` runs them under the knockout's current layers."""

    def __init__(self, model, processor, questions: Sequence[Question], batch_size: int = 16):
        from midtune.data import add_special_tokens_for, load_image, user_prompt
        from midtune.images import fit_images
        from midtune.scoring import continuation_length

        self.model, self.questions = model, list(questions)
        self.knockout: AttentionKnockout | None = None  # told each batch's prompt ends (target "last")
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        rows = []  # (question index, choice index, prompt + choice, image, continuation length)
        for qi, q in enumerate(self.questions):
            prompt = user_prompt(processor, q.question, 1)  # as eval asks it: the image first, then the question
            image = fit_images(processor, [load_image(str(q.image))])[0]  # shaped as the model trained
            for ci, choice in enumerate(q.choices):
                rows.append((qi, ci, prompt + choice, image, continuation_length(tokenizer, prompt, choice)))
        self.batches = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            enc = processor(text=[r[2] for r in chunk], images=[r[3] for r in chunk], padding=True,
                            padding_side="right", return_tensors="pt",
                            add_special_tokens=add_special_tokens_for(tokenizer, chunk[0][2]))
            enc = {k: (v.to(device).to(dtype) if v.is_floating_point() else v.to(device))
                   for k, v in enc.items() if isinstance(v, torch.Tensor)}
            self.batches.append((enc, [(r[0], r[1], r[4]) for r in chunk]))

    def nll(self) -> list[list[float]]:
        """NLL (summed over tokens) of every choice of every question."""
        scores = [[math.nan] * len(q.choices) for q in self.questions]
        for enc, meta in self.batches:
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            if self.knockout is not None:
                self.knockout.last_positions = torch.tensor([length - n - 1 for (_, _, n), length in
                                                             zip(meta, lengths)])
            try:
                with torch.no_grad():
                    logits = self.model(**enc, use_cache=False).logits
            finally:
                if self.knockout is not None:
                    self.knockout.last_positions = None
            scored = score_continuations(logits, enc["input_ids"], enc["attention_mask"], [n for _, _, n in meta])
            for (qi, ci, _), score in zip(meta, scored):
                scores[qi][ci] = score.nll
        return scores

    def predict(self, nll: list[list[float]] | None = None) -> list[str]:
        """The lowest-NLL choice of each question (from `nll` when the caller has scored them already)."""
        nll = self.nll() if nll is None else nll
        return [q.choices[min(range(len(s)), key=s.__getitem__)] for q, s in zip(self.questions, nll)]


def accuracy(questions: Sequence[Question], predictions: Sequence[str]) -> dict[str, float]:
    """Per task, and `mean`: the unweighted mean over tasks."""
    per_task: dict[str, list[bool]] = {}
    for q, p in zip(questions, predictions):
        per_task.setdefault(q.task, []).append(p == q.answer)
    acc = {task: sum(v) / len(v) for task, v in per_task.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def windows(num_layers: int, size: int, stride: int = 1) -> list[tuple[int, int]]:
    if not 1 <= size <= num_layers:
        raise AnalysisError(f"window {size}: must be between 1 and the number of LLM layers ({num_layers})")
    if stride < 1:
        raise AnalysisError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, num_layers - size + 1, stride))
    if starts[-1] != num_layers - size:  # always cover the top of the LLM
        starts.append(num_layers - size)
    return [(a, a + size) for a in starts]


def run_intervention(model, processor, questions: Sequence[Question], window: int | None = None, stride: int = 1,
                     batch_size: int = 16, progress: bool = True, target: str = "image") -> dict:
    """Accuracy with no intervention, per sliding window, and with every layer blocked."""
    from tqdm.auto import tqdm

    scorer = ChoiceScorer(model, processor, questions, batch_size)
    single = all(n <= 1 for _, meta in scorer.batches for _, _, n in meta)
    if target == "last" and single:
        log.warning("every choice is a single token: blocking attention to the prompt's last token cannot change "
                    "any score (the first answer token is predicted at that token itself)")
    with AttentionKnockout(model, target) as knockout:
        scorer.knockout = knockout
        n = knockout.num_layers
        size = window if window is not None else max(1, round(n / 4))
        spans = windows(n, size, stride)

        def run(layers: Iterable[int]) -> list[str]:
            knockout.layers = layers
            return scorer.predict()

        conditions = [("baseline", ())] + [(f"{a}-{b}", range(a, b)) for a, b in spans] + [("all", range(n))]
        preds = {}
        for name, layers in tqdm(conditions, desc="intervene", unit="window", disable=not progress):
            preds[name] = run(layers)

    def entry(name: str, **extra) -> dict:
        changed = sum(a != b for a, b in zip(preds[name], preds["baseline"])) / len(questions)
        return {**extra, "accuracy": accuracy(questions, preds[name]), "changed": changed}

    return {
        "num_layers": n, "window": size, "stride": stride,
        "tasks": list(dict.fromkeys(q.task for q in questions)),
        "n_questions": {t: sum(q.task == t for q in questions) for t in dict.fromkeys(q.task for q in questions)},
        "scoring": "log-likelihood of each choice as the answer (argmin NLL), exact match with `answer`",
        "target": target,
        "block": TARGET_TEXT[target],
        "single_token_choices": single,
        "baseline": entry("baseline"),
        "windows": [entry(f"{a}-{b}", start=a, end=b) for a, b in spans],
        "all_layers": entry("all", start=0, end=n),
        "predictions": {name: dict(zip((q.id for q in questions), p)) for name, p in preds.items()},
    }
