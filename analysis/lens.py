"""Logit lens on image tokens: at which layer visual features become readable as the words they depict.

For every pair of a pairs file, the image and the prompt run once (extraction's pass 1: the chat template with one
user turn [image, prompt] and the assistant prefix) with all hidden states. Each hidden state is decoded the way the
model decodes its last one: ``lm_head(norm(h))``, with the model's own final norm and unembedding (found through the
adapter table). transformers returns the last hidden state already normed, so it goes through ``lm_head`` alone and
then equals the model's own logits (a test holds this). The unembedding runs in float32 (a float32 copy of a bf16
``lm_head``: 2.2 GB for a 152k × 3584 one), because bf16 logits tie often over a large vocabulary and ties would
flatter the ranks.

Readouts, per pair, hidden state and concept (a label of the pair, e.g. ``dominant_color`` = "red"):

* ``mean_image``: the mean of the image-token states, decoded;
* ``best_image_token``: each image token decoded on its own; the best rank over the image tokens and the largest
  probability.

A word's tokens are the first token of each spelling the tokenizer gives it ("red", " red", "Red", " Red") that is
itself the start of the word (so "r" does not stand for "red"). Rank = 1 + how many vocabulary entries score above
the word's best token (1 = the top token); probability = the softmax mass on the word's tokens. Per hidden state the
pairs are summarised by the median rank, the mean probability and the fraction of pairs with the word in the top k
(rank ≤ k); the first hidden state where that fraction reaches one half is the layer where the concept "enters the
top k".
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from analysis.extract import DEFAULT_PROMPT, AnalysisError, Extractor, ExtractSettings, Pair

log = logging.getLogger("midtune.analysis")

READOUTS = ("mean_image", "best_image_token")
FORMAT = "midtune-logit-lens/1"
# float32 logits decoded at once (512 MB): 2,730 image tokens of a 49k vocabulary, 883 of 152k
LOGITS_PER_CHUNK = 2 ** 27


@dataclass
class LensSettings:
    labels: tuple[str, ...] = ("dominant_color", "dominant_shape")
    top_k: int = 10
    examples: int = 3  # pairs whose top-k decoded tokens per layer are kept
    prompt: str = DEFAULT_PROMPT
    batch_size: int = 8

    def check(self) -> None:
        if not self.labels:
            raise AnalysisError("--labels is empty")
        if self.top_k < 1 or self.batch_size < 1 or self.examples < 0:
            raise AnalysisError("--top-k and --batch-size must be >= 1, --examples >= 0")


def concept_tokens(tokenizer, word: str) -> list[int]:
    """The first token of each spelling of `word` that starts the word itself (case-insensitive)."""
    ids = []
    for spelling in dict.fromkeys([word, " " + word, word.capitalize(), " " + word.capitalize()]):
        encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if not encoded:
            continue
        text = tokenizer.decode([encoded[0]]).strip().lower()
        if text and word.lower().startswith(text) and len(text) >= min(3, len(word)):
            ids.append(int(encoded[0]))
    return sorted(set(ids))


def word_tokens(tokenizer, words, what: str) -> dict[str, list[int]]:
    """word → `concept_tokens`; AnalysisError naming `what` and the word when one has none."""
    out = {}
    for word in words:
        out[word] = concept_tokens(tokenizer, word)
        if not out[word]:
            raise AnalysisError(f"{what}: the tokenizer has no token that starts the word {word!r}")
    return out


class LogitLens:
    """Decodes a hidden state (hidden-state index `index`: 0 = embeddings, num_layers = the final, normed one)."""

    def __init__(self, model):
        from midtune.adapters import family_of

        parts = family_of(model).parts(model)
        self.norm, self.lm_head, self.num_layers = parts.norm, parts.lm_head, parts.num_layers
        self.dtype = parts.lm_head.weight.dtype  # the norm runs in it, as in the model's own forward
        self.unembedding = parts.lm_head.weight.detach().float()  # no copy when the model is float32
        bias = getattr(parts.lm_head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    def logits(self, states: torch.Tensor, index: int) -> torch.Tensor:
        """float32 logits; the norm runs in the model's dtype, as in the model's own forward."""
        h = states.to(self.unembedding.device, self.dtype)
        with torch.no_grad():
            if index < self.num_layers:
                h = self.norm(h)
            return torch.nn.functional.linear(h.float(), self.unembedding, self.bias)


def rank_and_mass(logits: torch.Tensor, token_sets: torch.Tensor, logz: torch.Tensor | None = None) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the rank (1 = top) of the best of its tokens (`token_sets`: (rows, S) ids, -1 = none) and their
    softmax mass.
    `logz`: the rows' logsumexp, when the caller has it already (it is shared by every concept)."""
    valid = token_sets >= 0
    picked = logits.gather(1, token_sets.clamp(min=0))
    best = picked.masked_fill(~valid, float("-inf")).max(dim=1).values
    rank = 1 + (logits > best[:, None]).sum(dim=1, dtype=torch.int32)  # int32: half the time of the default int64
    logz = torch.logsumexp(logits, dim=-1) if logz is None else logz
    mass = (picked - logz[:, None]).exp().masked_fill(~valid, 0.0).sum(dim=1)
    return rank.long(), mass


def _token_sets(tokenizer, pairs: Sequence[Pair], labels: Sequence[str]) -> tuple[dict, dict]:
    """label → (pairs, S) tensor of each pair's word's token ids (-1 padded); and word → token strings, for the
    record. Raises naming the pair and label when a pair lacks the label or a word has no token."""
    cache: dict[str, list[int]] = {}
    sets, used = {}, {}
    for label in labels:
        rows = []
        for p in pairs:
            if label not in p.labels:
                raise AnalysisError(f"pair {p.id!r} has no label {label!r} (it has: {', '.join(p.labels) or 'none'})")
            word = p.labels[label]
            if word not in cache:
                cache[word] = concept_tokens(tokenizer, word)
                if not cache[word]:
                    raise AnalysisError(f"label {label!r} of pair {p.id!r}: the tokenizer has no token that starts "
                                        f"the word {word!r}")
                used[word] = [tokenizer.decode([t]) for t in cache[word]]
            rows.append(cache[word])
        width = max(len(r) for r in rows)
        sets[label] = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
    return sets, used


def run_lens(model, processor, pairs: Sequence[Pair], settings: LensSettings, progress: bool = True) -> dict:
    """Ranks and probabilities of each pair's concept words per hidden state and readout, summarised."""
    from tqdm.auto import tqdm

    from analysis.extract import masked_means

    settings.check()
    extractor = Extractor(model, processor, ExtractSettings(prompt=settings.prompt, batch_size=settings.batch_size))
    lens = LogitLens(model)
    tokenizer = extractor.tokenizer
    sets, words = _token_sets(tokenizer, pairs, settings.labels)
    n, states_n = len(pairs), lens.num_layers + 1
    chunk = max(64, LOGITS_PER_CHUNK // lens.vocab_size)
    ranks = {(lab, r): np.zeros((n, states_n), dtype=np.int64) for lab in settings.labels for r in READOUTS}
    probs = {(lab, r): np.zeros((n, states_n), dtype=np.float64) for lab in settings.labels for r in READOUTS}
    examples = [{"id": p.id, "words": {lab: p.labels[lab] for lab in settings.labels}, "top_k": []}
                for p in pairs[:settings.examples]]
    bar = tqdm(total=n, desc="logit lens", unit="pair", disable=not progress)
    for start in range(0, n, settings.batch_size):
        batch = pairs[start:start + settings.batch_size]
        enc, image_mask = extractor.encode_images(batch)
        states = extractor.hidden_states(enc)
        means = masked_means(states, image_mask)  # (batch, states, hidden) float32
        device = lens.unembedding.device
        # what every layer reads the same way: each pair's word tokens, and the image tokens in chunks
        batch_sets = {label: sets[label][start:start + len(batch)].to(device) for label in settings.labels}
        rows, cols = image_mask.nonzero(as_tuple=True)  # every image token, row-major
        chunks = [(rows[c:c + chunk], rows[c:c + chunk].to(states[0].device), cols[c:c + chunk].to(states[0].device),
                   {label: sets[label][start + rows[c:c + chunk]].to(device) for label in settings.labels})
                  for c in range(0, len(rows), chunk)]
        examples_here = range(min(len(batch), max(0, len(examples) - start)))
        for index, h in enumerate(states):
            logits = lens.logits(means[:, index], index)
            logz = torch.logsumexp(logits, dim=-1)
            for label in settings.labels:
                rank, mass = rank_and_mass(logits, batch_sets[label], logz)
                ranks[label, "mean_image"][start:start + len(batch), index] = rank.cpu().numpy()
                probs[label, "mean_image"][start:start + len(batch), index] = mass.cpu().numpy()
            for i in examples_here:
                top = logits[i].topk(settings.top_k)
                examples[start + i]["top_k"].append([[tokenizer.decode([int(t)]), round(float(p), 4)] for t, p in
                                                     zip(top.indices, torch.softmax(logits[i], -1)[top.indices])])
            best_rank = {lab: torch.full((len(batch),), torch.iinfo(torch.int64).max) for lab in settings.labels}
            best_mass = {lab: torch.zeros(len(batch)) for lab in settings.labels}
            for owner, r, t, chunk_sets in chunks:
                token_logits = lens.logits(h[r.to(h.device), t.to(h.device)], index)  # no-op on one device
                token_logz = torch.logsumexp(token_logits, dim=-1)
                for label in settings.labels:
                    rank, mass = rank_and_mass(token_logits, chunk_sets[label], token_logz)
                    best_rank[label].scatter_reduce_(0, owner, rank.cpu(), "amin")
                    best_mass[label].scatter_reduce_(0, owner, mass.cpu().float(), "amax")
            for label in settings.labels:
                ranks[label, "best_image_token"][start:start + len(batch), index] = best_rank[label].numpy()
                probs[label, "best_image_token"][start:start + len(batch), index] = best_mass[label].numpy()
        bar.update(len(batch))
    bar.close()

    concepts = {}
    for label in settings.labels:
        concepts[label] = {}
        for readout in READOUTS:
            r, p = ranks[label, readout], probs[label, readout]
            median = np.median(r, axis=0)
            in_top_k = (r <= settings.top_k).mean(axis=0)
            entered = [i for i in range(states_n) if in_top_k[i] >= 0.5]
            concepts[label][readout] = {
                "median_rank": median.tolist(),
                "mean_probability": p.mean(axis=0).tolist(),
                "top_k_fraction": in_top_k.tolist(),
                "first_top_k_layer": entered[0] if entered else None,
                "best_layer": int(np.argmin(median)),
            }
    return {"num_layers": lens.num_layers, "vocab_size": lens.vocab_size, "n_pairs": n, "concepts": concepts,
            "words": words, "examples": examples}


def summary_lines(result: dict, top_k: int) -> list[str]:
    """One line per model and concept: where the word enters the top k, for each readout."""
    lines = []
    for name, model in result["models"].items():
        for label, readouts in model["concepts"].items():
            parts = []
            for readout, values in readouts.items():
                first = values["first_top_k_layer"]
                where = f"enters the top {top_k} at hidden state {first}" if first is not None else \
                    f"never in the top {top_k} (best median rank {min(values['median_rank']):.0f} at hidden " \
                    f"state {values['best_layer']})"
                parts.append(f"{readout.replace('_', ' ')}: {where}")
            lines.append(f"{name}, {label}: " + "; ".join(parts) + f" (of {model['num_layers']} layers)")
    return lines


def write_lens(out: Path, result: dict, settings: LensSettings) -> dict[str, Path]:
    """lens.json (everything), lens.csv (one row per model, concept, readout and hidden state), lens.png."""
    from analysis.plots import plot_lens
    from midtune.files import atomic_file, write_json

    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "settings": {**asdict(settings), "labels": list(settings.labels)}, **result,
           "summary": summary_lines(result, settings.top_k)}
    paths = {"json": out / "lens.json", "csv": out / "lens.csv", "png": out / "lens.png"}
    write_json(paths["json"], doc)
    with atomic_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "concept", "readout", "hidden_state", "median_rank", "mean_probability",
                         "top_k_fraction"])
        for name, model in result["models"].items():
            for label, readouts in model["concepts"].items():
                for readout, values in readouts.items():
                    for i, rank in enumerate(values["median_rank"]):
                        writer.writerow([name, label, readout, i, rank, f"{values['mean_probability'][i]:.6g}",
                                         f"{values['top_k_fraction'][i]:.4f}"])
    plot_lens(doc, paths["png"])
    return paths


def read_lens(path: str | Path) -> dict:
    path = Path(path)
    path = path / "lens.json" if path.is_dir() else path
    if not path.is_file():
        raise AnalysisError(f"{path}: no logit-lens result (run python -m analysis logit-lens)")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise AnalysisError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc
