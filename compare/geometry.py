"""The report's geometry section: the shape of the starting LLM's ID profile, how each run changes it, where the
visual↔textual overlap rises, and where the logit lens reads the image tokens as words. Computed from analysis's
profiles.json, overlap_terms.safetensors and lens.json. The overlap's change after a training step has a 95 %
interval from resampling the pairs (the same pairs in both models) and a verdict that can say "inconclusive"; the ID
shape and the logit lens are point estimates from one sample of pairs, which the report presents as descriptions,
not verdicts (the profile's figure draws each ID curve's band).

The thresholds were set before the first run; one rule changed after it, and says why in `id_answers`: expansion
is measured from the lowest ID before the peak, no longer from the embeddings' ID.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from compare.stats import LEVEL, N_BOOT

EXPANSION = 1.25  # the ID peak is at least this many times the lowest ID before it ...
CONTRACTION = 0.8  # ... and a later minimum at most this fraction of the peak: Valeriani et al.'s shape
OVERLAP_RISE = 0.02  # mean change in overlap (a fraction of k neighbours) that counts as a rise


def _finite(per_layer: dict[int, dict], metric: str) -> dict[int, float]:
    return {layer: m[metric] for layer, m in per_layer.items() if math.isfinite(m.get(metric, math.nan))}


def _where(layer: int, n_states: int) -> str:
    """Which third of the depth a hidden-state index is in (0 = embeddings, n_states - 1 = last)."""
    frac = layer / (n_states - 1)
    return "early" if frac <= 1 / 3 else "late" if frac > 2 / 3 else "intermediate"


def id_answers(profiles: dict[str, dict[int, dict]], reference: str = "pretrained",
               representation: str = "mean caption-token representation") -> list[str]:
    """The shape of the starting LLM's ID profile on captions (`representation`: what the textual vectors are),
    and how each trained model changes it."""
    ids = _finite(profiles[reference], "textual_id")
    if len(ids) < 3:
        return [f"ID profile: too few finite ID estimates ({len(ids)}) to describe its shape."]
    layers = sorted(ids)
    n_states = len(profiles[reference])
    peak = max(layers, key=ids.get)
    after = [layer for layer in layers if layer > peak]
    low = min(after, key=ids.get) if after else None
    # Expansion is measured from the lowest ID before the peak, not from the embeddings: the mean of a caption's
    # token embeddings is no representation the network built (SmolLM2: 8.8 there, 7.3 two layers up, then 10.8).
    before = min((layer for layer in layers if layer < peak), key=ids.get, default=peak)
    text = f"ID profile of {reference} on the captions (TwoNN, {representation}): "
    text += f"{ids[0]:.1f} at the embeddings, " if 0 in ids else "not measured at the embeddings, "
    text += f"lowest {ids[before]:.1f} at hidden state {before} before the peak, " if before != peak else ""
    text += f"peak {ids[peak]:.1f} at hidden state {peak} ({_where(peak, n_states)})"
    if low is not None:
        text += (f", then down to a minimum of {ids[low]:.1f} at hidden state {low} ({_where(low, n_states)}), "
                 f"{ids[layers[-1]]:.1f} at the last")
    expands = ids[peak] >= EXPANSION * ids[before]
    contracts = low is not None and ids[low] <= CONTRACTION * ids[peak]
    rule = f"peak ≥ {EXPANSION}× the lowest ID before it, later minimum ≤ {CONTRACTION}× the peak"
    if expands and contracts:
        shape = f"the expansion–contraction shape of Valeriani et al. 2023: reproduced ({rule})"
    else:
        missing = [w for w, ok in (("no expansion", expands), ("no contraction after the peak", contracts)) if not ok]
        shape = (f"the expansion–contraction shape of Valeriani et al. 2023: NOT reproduced ({', '.join(missing)}; "
                 f"{rule})")
    out = [text + "; " + shape + "."]
    for name, per_layer in profiles.items():
        if name == reference:
            continue
        other = _finite(per_layer, "textual_id")
        common = [layer for layer in layers if layer in other]
        if not common:
            continue
        change = {layer: other[layer] - ids[layer] for layer in common}
        top = max(common, key=lambda layer: abs(change[layer]))
        if abs(change[top]) < 1e-6:
            out.append(f"ID profile of {name}: identical to {reference}'s (the LLM did not change).")
            continue
        out.append(f"ID profile of {name}: largest change {change[top]:+.1f} at hidden state {top} "
                   f"({_where(top, n_states)}); mean change over the layers {sum(change.values()) / len(change):+.1f}.")
    return out


THIRDS = ("early", "intermediate", "late")


def _per_pair_thirds(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """(pairs, 3): each pair's mean overlap change over the hidden states of each third (1..last; the embeddings,
    where image and text do not meet, left out). NaN where a pair has no value in a third."""
    n_states = after.shape[0]
    diff = after - before
    out = np.full((after.shape[1], 3), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN thirds of dropped pairs stay NaN
        for t, third in enumerate(THIRDS):
            rows = [layer for layer in range(1, n_states) if _where(layer, n_states) == third]
            if rows:
                out[:, t] = np.nanmean(diff[rows], axis=0)
    return out


def _resampled_means(d: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each column of `d` (pairs, c) and its (n_boot, c) resamples, the pairs drawn with replacement
    (the same draw for every column, so their differences are paired too)."""
    d = d[~np.isnan(d).all(axis=1)]
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(d, axis=0), np.nanmean(d[idx], axis=1)


def overlap_change(profiles: dict, after: str, before: str, terms: dict | None = None, n_boot: int = N_BOOT,
                   seed: int = 0) -> dict | None:
    """Per-third mean change of the visual↔textual overlap from `before` to `after`, and the layer of the largest
    rise. Thirds of the hidden states 1..last (the embeddings, where image and text do not meet, left out).

    With `terms` (analysis's overlap_terms.safetensors: per model a (hidden states, pairs) array of per-pair
    overlaps), every third's change gets a 95 % interval from resampling the pairs — the same pairs in both models
    — and so do the intermediate third's margins over the other two."""
    a, b = _finite(profiles[after], "vt_overlap"), _finite(profiles[before], "vt_overlap")
    n_states = len(profiles[before])
    change = {layer: a[layer] - b[layer] for layer in sorted(set(a) & set(b)) if layer > 0}
    if not change:
        return None
    thirds: dict[str, list[float]] = {"early": [], "intermediate": [], "late": []}
    for layer, v in change.items():
        thirds[_where(layer, n_states)].append(v)
    means = {k: sum(v) / len(v) for k, v in thirds.items() if v}
    top = max(change, key=change.get)

    def peak(values: dict[int, float]) -> int:
        return max((layer for layer in values if layer > 0), key=values.get)

    out = {"thirds": means, "top": top, "top_change": change[top], "top_where": _where(top, n_states),
           "peak_before": peak(b), "peak_after": peak(a), "intervals": None}
    if terms is not None and after in terms and before in terms:
        d = _per_pair_thirds(np.asarray(terms[after], float), np.asarray(terms[before], float))
        mid = THIRDS.index("intermediate")
        margins = np.stack([d[:, mid] - d[:, t] for t in range(3) if t != mid], axis=1)
        point, boot = _resampled_means(np.concatenate([d, margins], axis=1), n_boot, seed)
        lo, hi = np.nanpercentile(boot, [50 * (1 - LEVEL), 50 * (1 + LEVEL)], axis=0)
        cis = [(float(p), float(x), float(y)) for p, x, y in zip(point, lo, hi)]
        out["thirds"] = {third: cis[t][0] for t, third in enumerate(THIRDS) if math.isfinite(cis[t][0])}
        out["intervals"] = {third: cis[t][1:] for t, third in enumerate(THIRDS) if math.isfinite(cis[t][0])}
        out["margins"] = {other: cis[3 + i][1:] for i, other in enumerate(t for t in THIRDS if t != "intermediate")}
        out["n_pairs"], out["n_boot"] = int((~np.isnan(d).all(axis=1)).sum()), n_boot
    return out


def overlap_verdict(ci: tuple[float, float], margin: float = OVERLAP_RISE) -> str:
    """The intermediate third's change against 0 and a margin fixed in advance: rises (lo > 0), falls (hi < 0),
    unchanged (the interval within ±margin), else inconclusive."""
    lo, hi = ci
    return ("rises" if lo > 0 else "falls" if hi < 0 else "unchanged" if -margin <= lo and hi <= margin
            else "inconclusive")


def overlap_answers(profiles: dict[str, dict[int, dict]], steps: list[tuple[str, str, str]],
                    terms: dict | None = None, n_boot: int = N_BOOT) -> list[str]:
    """Does the overlap rise in the intermediate layers, for each (what, after, before) step (e.g. after the
    alignment stage: base vs pretrained; after each run: the run vs base)? A verdict only with the per-pair
    overlaps (`terms`) behind an interval; without them the changes are given as point estimates, no verdict."""
    out = []
    for what, after, before in steps:
        if after not in profiles or before not in profiles:
            continue
        c = overlap_change(profiles, after, before, terms, n_boot)
        if c is None:
            out.append(f"Visual↔textual overlap {what}: no finite values to compare.")
            continue
        t, cis = c["thirds"], c["intervals"]
        where = (f"largest rise {c['top_change']:+.3f} at hidden state {c['top']} ({c['top_where']}); peak at hidden "
                 f"state {c['peak_before']} before, {c['peak_after']} after")
        if cis is None or "intermediate" not in cis:
            out.append(f"Visual↔textual overlap {what} ({after} vs {before}): no verdict — no per-pair overlaps to "
                       f"resample (mean change per third, point estimates: "
                       + ", ".join(f"{k} {v:+.3f}" for k, v in t.items()) + f"; {where}).")
            continue
        verdict = overlap_verdict(cis["intermediate"])
        most = verdict == "rises" and all(lo > 0 for lo, _ in c["margins"].values())
        words = {"rises": "rises in the intermediate layers" + (", most there" if most else ""),
                 "falls": "FALLS in the intermediate layers",
                 "unchanged": f"does NOT change in the intermediate layers beyond ±{OVERLAP_RISE}",
                 "inconclusive": "inconclusive in the intermediate layers"}[verdict]
        thirds = ", ".join(f"{k} {v:+.3f} [{cis[k][0]:+.3f}, {cis[k][1]:+.3f}]" for k, v in t.items())
        out.append(f"Visual↔textual overlap {what} ({after} vs {before}): **{verdict}** — {words} (mean change per "
                   f"third of the layers, 95 % interval over {c['n_boot']} resamples of the {c['n_pairs']} pairs: "
                   f"{thirds}; {where}).")
    return out


def lens_answers(doc: dict) -> list[str]:
    """(e): where each model's image tokens decode to the depicted words (in the top k for half the pairs or more),
    and whether they do in the intermediate third of the depth, where the paper places the abstraction."""
    k = doc["settings"]["top_k"]
    out, intermediate = [], []
    for label in doc["settings"]["labels"]:
        parts = []
        for name, model in doc["models"].items():
            n_states = model["num_layers"] + 1
            middle = [i for i in range(n_states) if _where(i, n_states) == "intermediate"]
            texts = []
            for readout, text in (("mean_image", "mean image state"), ("best_image_token", "best image token")):
                values = model["concepts"][label][readout]
                first = values["first_top_k_layer"]
                texts.append(f"{text} from hidden state {first}" if first is not None else f"{text} never")
                ranks, share = values["median_rank"], values["top_k_fraction"]
                at = min(middle, key=lambda i: (-share[i], ranks[i]))
                intermediate.append((-share[at], ranks[at], name, label, readout, at, middle))
            parts.append(f"{name}: {', '.join(texts)}")
        out.append(f"{label}: the word is in the top {k} for half the images or more — " + "; ".join(parts) + ".")
    neg_share, rank, name, label, readout, at, middle = min(intermediate)
    span = f"hidden states {middle[0]}–{middle[-1]}"
    where = f"{name}, {label}, {readout.replace('_', ' ')}, hidden state {at}"
    if -neg_share >= 0.5:
        out.append(f"Visual features readable as the words they depict in the intermediate layers ({span}): yes — "
                   f"in the top {k} for {-neg_share:.0%} of the images ({where}; median rank {rank:.0f}).")
    else:
        out.append(f"Visual features readable as the words they depict in the intermediate layers ({span}): NOT "
                   f"reproduced — at its best intermediate hidden state the word is in the top {k} for "
                   f"{-neg_share:.0%} of the images (median rank {rank:.0f}: {where}); the words surface only in "
                   f"the late layers, if at all.")
    return out


