"""Attention heads that write a concept: rank them over many samples, then scale them down or up.

After Head Pursuit (Basile et al. 2025): a head's output, read in the residual stream, is explained by a few
unembedding directions, and the heads whose directions are a concept's words (colours, shapes) are the ones that
write that concept. Editing about 1 % of them moves that concept in the output and leaves others largely intact.

Samples. Each pair's image, the prompt, and its caption as the answer (teacher-forced); every text position after the
image is a sample. There head h of layer l adds ``W_O[:, h] z_h`` to the residual stream, ``z_h`` being its slice
of the attention output projection's input (read by a forward pre-hook on the projection, found through the adapter
table). One head's samples span at most head_dim directions, so only their Gram matrix ``G = Σ z zᵀ`` is kept; with
``G = Q Λ Qᵀ``, ``X = Λ^½ Qᵀ W_O[:, h]ᵀ`` (head_dim × hidden) has the Gram matrix of the whole stack of samples,
and everything below depends on the samples only through it.

Dictionary. One atom per token: its unembedding row times the final norm's weight (the norm's linear part: what a
direction adds to that token's logit), less the mean of those rows (what raises every logit alike, which the softmax
ignores), scaled to unit length.

Selection. Simultaneous orthogonal matching pursuit, `atoms` steps per head: each step takes the atom with the most
correlation energy ``‖R d‖²`` with the residual R (at first X), then R = X minus its projection on the atoms taken.
The energy a step removes is its atom's share. A head's relevance to a concept is the share of its output energy
``‖X‖²`` removed by atoms that are the concept's tokens (see `analysis.lens.concept_tokens`); heads are ranked by it.
Most heads pick no concept atom (relevance 0); they are ranked after those that do by their *affinity*: the largest
share of their energy along any single concept atom (``‖X d‖² / ‖X‖²``), so "the top 5 %" is never filled up in
layer order.

Editing. A forward pre-hook on the output projection multiplies the chosen heads' slices of its input by `scale`
(0 suppresses, 2 enhances by default). The edit is scored on the shapes world's questions with the log-likelihood
rule of `intervene` (the choice with the lowest NLL): with no edit, with the top heads edited, and with as many
randomly drawn heads edited (a control that shows whether any edit of that size does the same).
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from analysis.extract import DEFAULT_PROMPT, AnalysisError, Extractor, ExtractSettings, Pair
from analysis.intervene import Hooks

log = logging.getLogger("midtune.analysis")

FORMAT = "midtune-heads/1"
EDITS = {"suppress": 0.0, "enhance": 2.0}  # default scale per edit


@dataclass
class HeadSettings:
    concept: str
    words: tuple[str, ...]
    atoms: int = 10  # matching-pursuit steps per head
    batch_size: int = 8
    prompt: str = DEFAULT_PROMPT

    def check(self) -> None:
        if not self.words:
            raise AnalysisError(f"concept {self.concept!r}: no words")
        if self.atoms < 1 or self.batch_size < 1:
            raise AnalysisError("--atoms and --batch-size must be >= 1")


def concept_words(pairs: Sequence[Pair], concept: str) -> tuple[str, ...]:
    """The words of `concept` in a pairs file: the values of every label named `concept` or ending in
    `_<concept>` (the shapes world's `dominant_color`, `first_color` for "color"), sorted."""
    words = {v for p in pairs for k, v in p.labels.items() if k == concept or k.endswith(f"_{concept}")}
    if not words:
        have = sorted({k for p in pairs for k in p.labels})
        raise AnalysisError(f"no label of the pairs is {concept!r} or ends in '_{concept}' (labels: "
                            f"{', '.join(have) or 'none'}); give the words with --words")
    return tuple(sorted(words))


# ---------------------------------------------------------------------------------------------------------
# Reading the heads
# ---------------------------------------------------------------------------------------------------------


class HeadOutputs(Hooks):
    """Forward pre-hooks on every layer's attention output projection that add each head's Σ z zᵀ over the
    positions in `positions` (a (batch, seq) bool mask, set before each forward)."""

    def __init__(self, model):
        from midtune.adapters import family_of

        parts = family_of(model).parts(model)
        self.num_layers, self.num_heads = parts.num_layers, parts.num_heads
        self.projections = [parts.attention_output(i) for i in range(self.num_layers)]
        width = self.projections[0].in_features
        if width % self.num_heads:
            raise AnalysisError(f"attention output width {width} is not a multiple of {self.num_heads} heads")
        self.head_dim = width // self.num_heads
        # one (heads, head_dim, head_dim) sum per layer, on that layer's device: no host sync in the forward
        self.gram = [torch.zeros(self.num_heads, self.head_dim, self.head_dim, dtype=torch.float64,
                                 device=proj.weight.device) for proj in self.projections]
        self.samples = 0
        self.positions: torch.Tensor | None = None
        self._handles = [proj.register_forward_pre_hook(partial(self._add, i)) for i, proj in
                         enumerate(self.projections)]

    def _add(self, layer: int, module, args):
        z = args[0]
        positions = self.positions.to(z.device)
        z = z[positions].float().view(-1, self.num_heads, self.head_dim)
        self.gram[layer] += torch.einsum("nhd,nhe->hde", z, z).double()
        if layer == 0:
            self.samples += z.shape[0]

    def head_matrix(self, layer: int, head: int) -> torch.Tensor:
        """X (head_dim × hidden) float64 on the CPU: the head's samples in the residual stream, compressed to their
        Gram matrix."""
        values, vectors = torch.linalg.eigh(self.gram[layer][head].cpu())
        root = values.clamp(min=0).sqrt()
        # only this head's columns leave the device (a 7B layer's whole projection is 100 MB in float64)
        w = self.projections[layer].weight.detach()[:, head * self.head_dim:(head + 1) * self.head_dim].cpu().double()
        return (root[:, None] * vectors.T) @ w.T


def dictionary(model) -> torch.Tensor:
    """(vocab, hidden) float32 unit rows, on the model's device: the unembedding times the final norm's weight,
    centred.

    Centring removes the mean row: a direction along it raises every logit alike, which the softmax ignores, and
    token embeddings share a large such component — without centring, heads that copy token embeddings (layer 0 of
    a model with tied embeddings) correlate with every atom, concept words included."""
    from midtune.adapters import family_of

    parts = family_of(model).parts(model)
    weight = parts.lm_head.weight.detach().float()
    gamma = getattr(parts.norm, "weight", None)
    if gamma is not None:
        weight = weight * gamma.detach().float().to(weight.device)
    weight = weight - weight.mean(dim=0, keepdim=True)
    return weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12)


def pursuit(x: torch.Tensor, atoms: torch.Tensor, steps: int, dict_t: torch.Tensor | None = None) \
        -> tuple[list[int], list[float]]:
    """Simultaneous orthogonal matching pursuit of the rows of `x` (r × hidden) over unit `atoms` (V × hidden), on
    the atoms' device: the atoms taken, in order, and the energy each removed (their sum ≤ ‖x‖²)."""
    x = x.to(atoms.device, torch.float32)
    dict_t = atoms.T if dict_t is None else dict_t
    corr0 = x @ dict_t  # (r, V): correlations of the samples with every atom
    basis: list[torch.Tensor] = []  # orthonormal span of the atoms taken
    xq = torch.zeros(x.shape[0], 0, device=x.device)
    qd = torch.zeros(0, atoms.shape[0], device=x.device)
    taken, energies = [], []
    for _ in range(steps):
        corr = corr0 - xq @ qd  # the residual's correlations
        score = corr.square().sum(dim=0)
        if taken:
            score[taken] = -1.0
        j = int(score.argmax())
        q = atoms[j].clone()
        for b in basis:
            q -= (q @ b) * b
        norm = q.norm()
        if norm < 1e-6:  # the atom lies in the span already: nothing left to explain with it
            break
        q /= norm
        basis.append(q)
        xq = torch.cat([xq, (x @ q)[:, None]], dim=1)
        qd = torch.cat([qd, (q @ dict_t)[None]], dim=0)
        taken.append(j)
        energies.append(float((x @ q).square().sum()))
    return taken, energies


def rank_heads(model, processor, pairs: Sequence[Pair], settings: HeadSettings, progress: bool = True) -> dict:
    """Relevance of every (layer, head) to the concept, the ranking, and each head's atoms."""
    from tqdm.auto import tqdm

    from analysis.lens import word_tokens

    settings.check()
    extractor = Extractor(model, processor, ExtractSettings(prompt=settings.prompt, batch_size=settings.batch_size))
    tokenizer = extractor.tokenizer
    concept_ids = word_tokens(tokenizer, settings.words, f"concept {settings.concept!r}")
    concept_set = {t for ids in concept_ids.values() for t in ids}

    with HeadOutputs(model) as heads:
        bar = tqdm(total=len(pairs), desc="head outputs", unit="pair", disable=not progress)
        for start in range(0, len(pairs), settings.batch_size):
            batch = pairs[start:start + settings.batch_size]
            enc, image_mask = extractor.encode_images(batch, suffixes=[p.caption for p in batch])
            after_image = image_mask.long().cumsum(dim=1) > 0
            heads.positions = after_image & ~image_mask & enc["attention_mask"].bool()
            extractor.forward(enc)  # only the hooks' sums are wanted
            bar.update(len(batch))
        bar.close()

    atoms = dictionary(model)
    dict_t = atoms.T.contiguous()
    concept_atoms = atoms[torch.tensor(sorted(concept_set), device=atoms.device)]
    scores = np.zeros((heads.num_layers, heads.num_heads))
    explained, affinity = np.zeros_like(scores), np.zeros_like(scores)
    table = []
    for layer in tqdm(range(heads.num_layers), desc="head pursuit", unit="layer", disable=not progress):
        for head in range(heads.num_heads):
            x = heads.head_matrix(layer, head).to(atoms.device, torch.float32)
            total = float(x.square().sum())
            if total <= 0:  # a head that never wrote anything
                table.append({"layer": layer, "head": head, "relevance": 0.0, "affinity": 0.0, "explained": 0.0,
                              "atoms": []})
                continue
            taken, energies = pursuit(x, atoms, settings.atoms, dict_t)
            share = [e / total for e in energies]
            scores[layer, head] = sum(s for j, s in zip(taken, share) if j in concept_set)
            explained[layer, head] = sum(share)
            affinity[layer, head] = float((x @ concept_atoms.T).square().sum(dim=0).max()) / total
            table.append({"layer": layer, "head": head, "relevance": float(scores[layer, head]),
                          "affinity": float(affinity[layer, head]), "explained": float(explained[layer, head]),
                          "atoms": [[tokenizer.decode([j]), round(s, 4)] for j, s in zip(taken, share)]})
    table.sort(key=lambda r: (-r["relevance"], -r["affinity"]))
    return {"concept": settings.concept, "words": list(settings.words),
            "tokens": {w: [tokenizer.decode([t]) for t in ids] for w, ids in concept_ids.items()},
            "num_layers": heads.num_layers, "num_heads": heads.num_heads, "head_dim": heads.head_dim,
            "samples": heads.samples, "atoms": settings.atoms, "relevance": scores.tolist(),
            "affinity": affinity.tolist(), "explained": explained.tolist(), "ranked": table}


# ---------------------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------------------


class HeadEdit(Hooks):
    """Scales the outputs of `heads` ((layer, head) pairs) by `scale` while in use::

        with HeadEdit(model, [(12, 3)], scale=0.0):
            logits = model(**inputs).logits
    """

    def __init__(self, model, heads: Iterable[tuple[int, int]], scale: float):
        from midtune.adapters import family_of

        parts = family_of(model).parts(model)
        self.num_heads = parts.num_heads
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            if not (0 <= layer < parts.num_layers and 0 <= head < self.num_heads):
                raise AnalysisError(f"head {layer}.{head} does not exist ({parts.num_layers} layers × "
                                    f"{self.num_heads} heads)")
            by_layer.setdefault(layer, []).append(head)
        self.scale = scale
        self._handles = [parts.attention_output(layer).register_forward_pre_hook(partial(self._edit, sorted(hs)))
                         for layer, hs in by_layer.items()]

    def _edit(self, heads: list[int], module, args):
        z = args[0]
        shape = z.shape
        z = z.reshape(*shape[:-1], self.num_heads, shape[-1] // self.num_heads).clone()
        z[..., heads, :] *= self.scale
        return (z.reshape(shape), *args[1:])


def top_heads(ranking: dict, fraction: float) -> list[tuple[int, int]]:
    """The `fraction` of all heads ranked highest (at least one)."""
    count = max(1, round(fraction * ranking["num_layers"] * ranking["num_heads"]))
    return [(r["layer"], r["head"]) for r in ranking["ranked"][:count]]


def score_edit(model, processor, questions, heads: list[tuple[int, int]], scale: float, seed: int = 0,
               batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy and mean probability of the right choice per task: no edit, the heads edited, and as many random
    heads (not among them) edited."""
    from tqdm.auto import tqdm

    from analysis.intervene import ChoiceScorer, accuracy
    from midtune.adapters import family_of

    parts = family_of(model).parts(model)
    everyone = [(layer, head) for layer in range(parts.num_layers) for head in range(parts.num_heads)]
    rest = [h for h in everyone if h not in set(heads)]
    control = sorted(random.Random(seed).sample(rest, min(len(heads), len(rest))))
    scorer = ChoiceScorer(model, processor, questions, batch_size)
    conditions = {"none": [], "edited": heads, "random": control}
    out = {}
    for name, chosen in tqdm(conditions.items(), desc="edit", unit="condition", disable=not progress):
        with HeadEdit(model, chosen, scale):
            nll = scorer.nll()
        predictions = scorer.predict(nll)
        p_answer: dict[str, list[float]] = {}
        for q, s in zip(questions, nll):
            logp = -np.asarray(s)
            p = np.exp(logp - logp.max())
            p_answer.setdefault(q.task, []).append(float(p[q.choices.index(q.answer)] / p.sum()))
        out[name] = {"heads": [f"{layer}.{head}" for layer, head in chosen],
                     "accuracy": accuracy(questions, predictions),
                     "p_answer": {task: float(np.mean(v)) for task, v in p_answer.items()}}
    return out


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def edit_table(edit: dict) -> str:
    """Markdown: a row per condition, accuracy and mean p(answer) per task."""
    tasks = [t for t in edit["conditions"]["none"]["accuracy"] if t != "mean"]
    head = "| heads edited | " + " | ".join(f"{t} acc. (%)" for t in tasks) + " | " + \
        " | ".join(f"{t} p(answer)" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(tasks))]
    names = {"none": "none", "edited": f"top {len(edit['conditions']['edited']['heads'])} for "
                                       f"{edit['concept']} (× {edit['scale']:g})",
             "random": f"{len(edit['conditions']['random']['heads'])} random (× {edit['scale']:g})"}
    for key, label in names.items():
        c = edit["conditions"][key]
        lines.append(f"| {label} | " + " | ".join(f"{100 * c['accuracy'][t]:.1f}" for t in tasks) + " | " +
                     " | ".join(f"{c['p_answer'][t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def write_heads(out: Path, result: dict) -> dict[str, Path]:
    """heads.json (everything), heads.csv (a row per head, ranked), heads.png (relevance heat map), and with an
    edit edit.md (its table)."""
    from analysis.plots import plot_heads
    from midtune.files import atomic_file, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "heads.json", "csv": out / "heads.csv", "png": out / "heads.png"}
    write_json(paths["json"], {"format": FORMAT, **result})
    with atomic_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "layer", "head", "relevance", "affinity", "explained", "top_atoms"])
        for i, r in enumerate(result["ranked"], 1):
            writer.writerow([i, r["layer"], r["head"], f"{r['relevance']:.6g}", f"{r['affinity']:.6g}",
                             f"{r['explained']:.6g}",
                             " ".join(repr(a) for a, _ in r["atoms"][:5])])
    plot_heads(result, paths["png"])
    if "edit" in result:
        paths["md"] = out / "edit.md"
        write_text(paths["md"], edit_table(result["edit"]))
    return paths


def summary_lines(result: dict) -> list[str]:
    top = result["ranked"][:5]
    lines = [f"heads most relevant to {result['concept']} ({', '.join(result['words'])}) over {result['samples']} "
             f"positions: " + ", ".join(f"{r['layer']}.{r['head']} ({r['relevance']:.2f})" for r in top)]
    if "edit" in result:
        edit = result["edit"]
        for key in ("none", "edited", "random"):
            c = edit["conditions"][key]
            lines.append(f"  {key:>6}: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in c["accuracy"].items()
                                                     if t != "mean"))
    return lines

