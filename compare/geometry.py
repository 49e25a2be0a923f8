"""The report's geometry section: the shape of the starting LLM's ID profile, how each run changes it, where the
visual↔textual overlap rises, and where the logit lens reads the image tokens as words. Computed from analysis's
profiles.json and lens.json. These are point estimates from one sample of pairs (no interval yet): the report
presents them as descriptions, not as verdicts.

The thresholds were set before the first run; one rule changed after it, and says why in `id_answers`: expansion
is measured from the lowest ID before the peak, no longer from the embeddings' ID.
"""

from __future__ import annotations

import math

EXPANSION = 1.25  # the ID peak is at least this many times the lowest ID before it ...
CONTRACTION = 0.8  # ... and a later minimum at most this fraction of the peak: Valeriani et al.'s shape
OVERLAP_RISE = 0.02  # mean change in overlap (a fraction of k neighbours) that counts as a rise


def _finite(per_layer: dict[int, dict], metric: str) -> dict[int, float]:
    return {layer: m[metric] for layer, m in per_layer.items() if math.isfinite(m.get(metric, math.nan))}


def _where(layer: int, n_states: int) -> str:
    """Which third of the depth a hidden-state index is in (0 = embeddings, n_states - 1 = last)."""
    frac = layer / (n_states - 1)
    return "early" if frac <= 1 / 3 else "late" if frac > 2 / 3 else "intermediate"


def id_answers(profiles: dict[str, dict[int, dict]], reference: str = "pretrained") -> list[str]:
    """The shape of the starting LLM's ID profile on captions, and how each trained model changes it."""
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
    text = (f"ID profile of {reference} on the captions (TwoNN, mean caption-token representation): ")
    text += f"{ids[0]:.1f} at the embeddings, " if 0 in ids else ""
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


def overlap_change(profiles: dict, after: str, before: str) -> dict | None:
    """Per-third mean change of the visual↔textual overlap from `before` to `after`, and the layer of the largest
    rise. Thirds of the hidden states 1..last (the embeddings, where image and text do not meet, left out)."""
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

    return {"thirds": means, "top": top, "top_change": change[top], "top_where": _where(top, n_states),
            "peak_before": peak(b), "peak_after": peak(a)}


def overlap_answers(profiles: dict[str, dict[int, dict]], steps: list[tuple[str, str, str]]) -> list[str]:
    """Does the overlap rise in the intermediate layers, for each (what, after, before) step (e.g. after the
    alignment stage: base vs pretrained; after each run: the run vs base)?"""
    out = []
    for what, after, before in steps:
        if after not in profiles or before not in profiles:
            continue
        c = overlap_change(profiles, after, before)
        if c is None:
            out.append(f"Visual↔textual overlap {what}: no finite values to compare.")
            continue
        t = c["thirds"]
        mid = t.get("intermediate", math.nan)
        rises = mid >= OVERLAP_RISE
        most = rises and all(mid >= v for v in t.values())
        verdict = ("rises in the intermediate layers, most there" if most else
                   "rises in the intermediate layers, but more elsewhere" if rises else
                   "does NOT rise in the intermediate layers")
        out.append(f"Visual↔textual overlap {what} ({after} vs {before}): {verdict} (mean change per third of the "
                   f"layers: " + ", ".join(f"{k} {v:+.3f}" for k, v in t.items())
                   + f"; largest rise {c['top_change']:+.3f} at hidden state {c['top']} ({c['top_where']}); peak at "
                   f"hidden state {c['peak_before']} before, {c['peak_after']} after).")
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


