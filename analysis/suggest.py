"""Which contiguous block of LLM layers to train, read off a geometry profile.

The block has round(F · num_layers) layers (F = `--fraction`, default 0.5; rounded half up, exactly as the layer
spec's `middle:F`). Where it sits is decided by one of two rules, both on the hidden-state profile without the
embeddings (indices 1..num_layers; index h is the output of decoder layer h − 1, so a feature found at index h
centres the block on decoder layer h − 1). Profiles of 6 or more points are smoothed with a centred 3-point moving
average first.

* ``id_valley`` (default) — after the seed papers' reading of ID profiles (Valeriani et al. 2023; Cheng et al.
  2024, as in *Visual Instruction Tuning Aligns Modalities through Abstraction*): the visual ID rises to an early
  peak and then falls into the phase where representations are abstract/semantic. The block is centred on the
  first local minimum of the visual TwoNN ID after its peak, the peak being the maximum over the first two thirds
  of the layers. Needs a peak followed by a descent that stops before the top layer.
* ``overlap_peak`` — centre on the layer where image and caption neighbourhoods agree most (the maximum of the
  visual↔textual neighbourhood overlap).

Degenerate profiles fall back to the middle block (the same layers as `middle:F`), and the snippet says why: fewer
than 3 finite values, NaN inside the range, a flat profile (relative spread below 5 % for the ID, absolute spread
below 0.02 for the overlap), no early peak, or an ID that keeps falling to the top layer. The block is centred on
its layer c: it starts at c − (size − 1) // 2 (an even size puts the extra layer above) and is shifted to fit
inside the LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.extract import AnalysisError

RULES = ("id_valley", "overlap_peak")


@dataclass
class Suggestion:
    start: int  # first decoder layer of the block
    end: int  # last decoder layer (inclusive)
    num_layers: int
    rule: str  # the rule asked for
    fallback: bool  # True: the profile was degenerate and the middle block was used
    reason: str

    @property
    def spec(self) -> str:
        return f"{self.start}-{self.end}"

    def yaml(self, header: list[str] | None = None) -> str:
        """A config snippet (`trainable.layers`) with comment lines saying why."""
        lines = [f"# {line}" for line in (header or [])]
        lines += [f"# {line}" for line in self.reason.splitlines()]
        lines += ["trainable:", f'  layers: "{self.spec}"', ""]
        return "\n".join(lines)


def block_size(fraction: float, num_layers: int) -> int:
    from midtune.spec import SpecError, resolve_layers

    try:
        return len(resolve_layers(f"middle:{fraction}", num_layers, where="--fraction"))
    except SpecError as e:
        raise AnalysisError(str(e)) from None


def _smooth(values: np.ndarray) -> np.ndarray:
    if len(values) < 6:
        return values
    padded = np.concatenate([values[:1], values, values[-1:]])
    return np.convolve(padded, np.ones(3) / 3, mode="valid")


def suggest_block(profile: dict[int, dict[str, float]], num_layers: int, fraction: float = 0.5,
                  rule: str = "id_valley") -> Suggestion:
    """The block to train from one model's profile ({hidden-state index: {metric: value}})."""
    if rule not in RULES:
        raise AnalysisError(f"rule {rule!r} is not one of {', '.join(RULES)}")
    if num_layers < 1:
        raise AnalysisError(f"num_layers must be >= 1, got {num_layers}")
    size = block_size(fraction, num_layers)
    metric = "visual_id" if rule == "id_valley" else "vt_overlap"
    indices = list(range(1, num_layers + 1))
    values = np.array([profile.get(h, {}).get(metric, math.nan) for h in indices], dtype=float)
    shown = " ".join("nan" if not math.isfinite(v) else f"{v:.3g}" for v in values)
    profile_line = f"{metric} at hidden-state indices 1..{num_layers}: {shown}"

    centre, why = _find_centre(values, rule)
    if centre is None:
        from midtune.spec import resolve_layers

        middle = resolve_layers(f"middle:{fraction}", num_layers)
        reason = (f"rule {rule}: {why}; fell back to the middle block (= middle:{fraction:g})\n{profile_line}\n"
                  f"block of round({fraction:g} x {num_layers}) = {size} layers: {middle[0]}-{middle[-1]}")
        return Suggestion(middle[0], middle[-1], num_layers, rule, True, reason)
    layer = centre  # hidden-state index h = indices[i] = i + 1 is the output of decoder layer i
    start = min(max(0, layer - (size - 1) // 2), num_layers - size)
    reason = (f"rule {rule}: {why} → centred on decoder layer {layer} (whose output is hidden-state index "
              f"{layer + 1})\n{profile_line}\nblock of round({fraction:g} x {num_layers}) = {size} layers: "
              f"{start}-{start + size - 1}")
    return Suggestion(start, start + size - 1, num_layers, rule, False, reason)


def _find_centre(values: np.ndarray, rule: str) -> tuple[int | None, str]:
    """(position in `values` to centre on, explanation) or (None, why the profile is degenerate)."""
    finite = np.isfinite(values)
    if finite.sum() < 3:
        return None, f"only {int(finite.sum())} finite values in the profile"
    if not finite.all():
        bad = [i + 1 for i in np.flatnonzero(~finite)]
        return None, f"NaN at hidden-state indices {bad}"
    smooth = _smooth(values)
    spread = float(smooth.max() - smooth.min())
    if rule == "overlap_peak":
        if spread < 0.02:
            return None, f"flat profile (overlap spread {spread:.3g} < 0.02)"
        i = int(np.argmax(smooth))
        return i, f"visual-textual overlap peaks at hidden-state index {i + 1} ({values[i]:.3g})"
    scale = max(abs(float(np.median(smooth))), 1e-12)
    if spread / scale < 0.05:
        return None, f"flat profile (relative ID spread {spread / scale:.3g} < 0.05)"
    search = max(2, math.ceil(2 * len(smooth) / 3))
    peak = int(np.argmax(smooth[:search]))
    while peak + 1 < len(smooth) and np.isclose(smooth[peak + 1], smooth[peak]):  # a flat top: its last point
        peak += 1
    if peak + 1 >= len(smooth) or smooth[peak + 1] >= smooth[peak]:
        return None, f"no early peak (the ID does not fall after its maximum at hidden-state index {peak + 1})"
    j = peak + 1
    while j + 1 < len(smooth) and smooth[j + 1] < smooth[j]:
        j += 1
    if j + 1 >= len(smooth):
        return None, (f"the ID falls from its peak at hidden-state index {peak + 1} all the way to the top layer "
                      f"(no valley)")
    return j, (f"visual ID peaks at hidden-state index {peak + 1} ({values[peak]:.3g}); first local minimum "
               f"after it at index {j + 1} ({values[j]:.3g})")
