"""Layer specs and the freezing plan: which parameters of a VLM train.

A spec is the `trainable:` block of a config:

    trainable:
      layers: "middle:0.5"   # LLM decoder layers (grammar below)
      vision_tower: false    # true / "all": the whole tower; "last:N": only its last N layers
      projector: true
      embeddings: false
      lm_head: false
      norm: false

Layer grammar (`resolve_layers`), for a model with n LLM layers; negative indices count from the end:
    "8-23"        inclusive range; "-8--1" = the last 8, "4--1" = 4 to the end
    [3, 5, 7]     a list of indices (also the string "3,5,7"); a bare int 5 (or "5") is one layer
    "first:4"     the first 4 layers; "last:4" the last 4
    "middle:0.5"  a centred contiguous block of round(0.5 * n) layers (halves round up, at least 1). The
                  leftover frozen layers are split evenly below and above; when the leftover is odd the extra
                  frozen layer goes at the top (the block starts at leftover // 2). middle:0.5 of 32 → 8..23,
                  of 7 → 4 layers 1..4.
    "all"         every layer; "none" / null / [] → no LLM layers

`resolve_plan(model, spec)` assigns every parameter to exactly one row of a `FreezePlan` by the LONGEST matching
path prefix from the family adapter (so Qwen's `visual.merger` is projector although it sits inside `visual`,
and `llm.layers.<i>` comes from the language model's own layer list, never from a name pattern that would also
match vision blocks). Anything unmatched lands in the always-frozen `other` row. Every requested part must own at
least one parameter: other tools silently ignore names that match nothing, which trains less than you asked for.
The plan is the single source of truth for `requires_grad`: `plan.apply(model)`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from midtune.adapters import ModelParts, family_of, unwrap


class SpecError(ValueError):
    """A trainable spec that is malformed, out of range for the model, or would train nothing it names."""


COMPONENTS = ("vision_tower", "projector", "embeddings", "lm_head", "norm")
SPEC_KEYS = ("layers",) + COMPONENTS
FLAGS = ("projector", "embeddings", "lm_head", "norm")  # the plain on/off components
LAYER_FORMS = '"all", "none", 5, "8-23", "-8--1", [3, 5, 7], "3,5,7", "first:N", "last:N" or "middle:F" (0 < F <= 1)'

# Row names. LLM and vision layer rows are f"{LLM_LAYERS}.{i}" and f"{VISION_LAYERS}.{j}".
LLM_LAYERS = "llm.layers"
VISION_LAYERS = "vision_tower.layers"
OTHER = "other"


# ---------------------------------------------------------------------------------------------------------
# Layer grammar. Parsing needs no model (so a config fails before any weights load); resolving needs the count.
# ---------------------------------------------------------------------------------------------------------

_INT = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")


@dataclass(frozen=True)
class _Selection:
    kind: str  # "all" | "none" | "first" | "last" | "middle" | "range" | "list"
    args: tuple = ()


def _parse_layers(layers, where: str) -> _Selection:
    malformed = SpecError(f"{where}: cannot read {layers!r} as a layer selection; expected {LAYER_FORMS}")
    if layers is None:
        return _Selection("none")
    if isinstance(layers, bool):  # bool is an int subclass: `layers: true` must not mean layer 1
        raise SpecError(f'{where}: {layers!r} is not a layer selection; write "all" or "none" (expected {LAYER_FORMS})')
    if isinstance(layers, int):
        return _Selection("list", (layers,))
    if isinstance(layers, (list, tuple)):
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, int):
                raise SpecError(f"{where}: list entry {x!r} in {list(layers)} is not an integer layer index")
        return _list_selection(tuple(layers), layers, where)
    if not isinstance(layers, str):
        raise malformed

    text = layers.strip().lower()
    if text in ("all", "none"):
        return _Selection(text)
    if text == "":
        raise SpecError(f'{where}: empty string; write "none" for no LLM layers (expected {LAYER_FORMS})')
    if ":" in text:
        kind, _, arg = (s.strip() for s in text.partition(":"))
        if kind in ("first", "last"):
            if not _INT.match(arg):
                raise SpecError(f"{where}: {layers!r}: N in {kind}:N must be a whole number")
            if int(arg) < 1:
                raise SpecError(f"{where}: {layers!r} selects no layers ({kind}:N needs N >= 1)")
            return _Selection(kind, (int(arg),))
        if kind == "middle":
            try:
                frac = float(arg)
            except ValueError:
                raise SpecError(f"{where}: {layers!r}: F in middle:F must be a number in (0, 1]") from None
            if not 0 < frac <= 1:  # also rejects nan
                empty = " and selects no layers" if frac <= 0 else ""
                raise SpecError(
                    f"{where}: {layers!r}: fraction {arg} is outside (0, 1]{empty} "
                    "(middle:F trains the centred fraction F of the layers; for a count use first:N / last:N)"
                )
            return _Selection("middle", (frac,))
        close = difflib.get_close_matches(kind, ["first", "last", "middle"], n=1)
        hint = f"; did you mean '{close[0]}:'?" if close else ""
        raise SpecError(f"{where}: unknown form {layers!r} (expected {LAYER_FORMS}){hint}")
    if _INT.match(text):
        return _Selection("list", (int(text),))
    if m := _RANGE.match(text):
        return _Selection("range", (int(m.group(1)), int(m.group(2))))
    if "," in text:
        items = [s.strip() for s in text.split(",")]
        if not all(_INT.match(s) for s in items):
            raise malformed
        return _list_selection(tuple(int(s) for s in items), layers, where)
    raise malformed


def _list_selection(items: tuple[int, ...], raw, where: str) -> _Selection:
    if not items:
        return _Selection("none")
    for i, x in enumerate(items):
        if x in items[:i]:
            raise SpecError(f"{where}: layer {x} is listed twice in {raw!r}")
    return _Selection("list", items)


def _index(i: int, n: int, where: str, unit: str) -> int:
    if not -n <= i < n:
        valid = f"valid: 0..{n - 1} or -{n}..-1" if n else "it has none"
        raise SpecError(f"{where}: layer {i} is out of range for a model with {n} {unit} ({valid})")
    return i % n


def _resolve(sel: _Selection, raw, n: int, where: str, unit: str) -> list[int]:
    if sel.kind == "none":
        return []
    if sel.kind == "all":
        return list(range(n))
    if sel.kind in ("first", "last"):
        (k,) = sel.args
        if k > n:
            raise SpecError(f"{where}: {raw!r} asks for {k} layers but the model has {n} {unit} (valid: 1..{n})")
        return list(range(k)) if sel.kind == "first" else list(range(n - k, n))
    if sel.kind == "middle":
        (frac,) = sel.args
        count = max(1, math.floor(frac * n + 0.5 + 1e-9))  # round half up (Python's round() is half-even)
        start = (n - count) // 2  # an odd leftover puts the extra frozen layer at the top
        return list(range(start, start + count))
    if sel.kind == "range":
        lo, hi = (_index(i, n, where, unit) for i in sel.args)
        if lo > hi:
            raise SpecError(f"{where}: {raw!r} selects no layers (start {lo} is after end {hi}; model has {n} {unit})")
        return list(range(lo, hi + 1))
    # list
    seen: dict[int, int] = {}
    for i in sel.args:
        j = _index(i, n, where, unit)
        if j in seen:
            raise SpecError(f"{where}: {seen[j]} and {i} in {raw!r} are the same layer (model has {n} {unit})")
        seen[j] = i
    return sorted(seen)


def resolve_layers(layers, num_layers: int, *, where: str = "trainable.layers", unit: str = "LLM layers") -> list[int]:
    """The sorted, unique layer indices `layers` selects in a stack of `num_layers` (grammar: module docstring).

    Raises SpecError naming the value and the valid range for malformed, out-of-range, duplicate or empty selections.
    """
    return _resolve(_parse_layers(layers, where), layers, num_layers, where, unit)


def _parse_vision(value, where: str) -> _Selection:
    """vision_tower: false/"none" → none, true/"all" → the whole tower, "last:N" → only its last N layers."""
    text = value.strip().lower() if isinstance(value, str) else None
    if value is None or value is False or text in ("none", "false"):
        return _Selection("none")
    if value is True or text in ("all", "true"):
        return _Selection("all")
    if text is not None and text.startswith("last:"):
        return _parse_layers(text, where)
    raise SpecError(
        f'{where}: {value!r} is not valid; use true / "all" (whole tower), false / "none", '
        'or "last:N" (only the last N vision layers train; the rest of the tower stays frozen)'
    )


def _parse_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # command-line overrides
        return value.strip().lower() == "true"
    raise SpecError(f"{where}: expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainableSpec:
    layers: object = None  # raw layer selection, kept as written (see module docstring)
    vision_tower: bool | str = False  # bool, "all", "none" or "last:N"
    projector: bool = False
    embeddings: bool = False
    lm_head: bool = False
    norm: bool = False

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "trainable") -> TrainableSpec:
        """Build and validate (syntax only; ranges need the model) a spec from a config mapping."""
        if isinstance(d, TrainableSpec):
            d.validate(where)
            return d
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {type(d).__name__}")
        for key in d:
            if key not in SPEC_KEYS:
                close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SpecError(f"{where}: unknown key {key!r} (valid keys: {', '.join(SPEC_KEYS)}){hint}")
        values = dict(d)
        for key in FLAGS:
            if key in values:
                values[key] = _parse_bool(values[key], f"{where}.{key}")
        if isinstance(values.get("vision_tower"), str) and values["vision_tower"].strip().lower() in ("true", "false"):
            values["vision_tower"] = values["vision_tower"].strip().lower() == "true"
        spec = cls(**values)
        spec.validate(where)
        return spec

    def validate(self, where: str = "trainable") -> None:
        """Raise SpecError for malformed values or a spec under which nothing would train."""
        layers = _parse_layers(self.layers, f"{where}.layers")
        vision = _parse_vision(self.vision_tower, f"{where}.vision_tower")
        for key in FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"{where}.{key}: expected true or false, got {getattr(self, key)!r}")
        if layers.kind == "none" and vision.kind == "none" and not any(getattr(self, k) for k in FLAGS):
            raise SpecError(
                f"{where}: nothing would train (no LLM layers and every component off); select layers "
                f'(e.g. layers: "middle:0.5") or turn on one of {", ".join(COMPONENTS)}'
            )

    def to_dict(self) -> dict:
        layers = list(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        return {"layers": layers, **{k: getattr(self, k) for k in COMPONENTS}}


# ---------------------------------------------------------------------------------------------------------
# Parameter ownership
# ---------------------------------------------------------------------------------------------------------


def owner_table(parts: ModelParts) -> dict[str, str]:
    """Dotted path (module or parameter) → row name, for longest-prefix lookup."""
    table = {}
    for component, paths in parts.component_paths().items():
        for path in paths:
            table[path] = component
    for j in range(parts.num_vision_layers):
        table[f"{parts.vision_layers_path}.{j}"] = f"{VISION_LAYERS}.{j}"
    for i in range(parts.num_layers):
        table[f"{parts.language_layers_path}.{i}"] = f"{LLM_LAYERS}.{i}"
    return table


def _lookup(name: str, table: Mapping[str, str]) -> str:
    # Longest prefix first: the name itself (a bare parameter like image_newline), then each enclosing module.
    path = name
    while True:
        if path in table:
            return table[path]
        if "." not in path:
            return OTHER
        path = path.rsplit(".", 1)[0]


def parameter_owner(name: str, parts: ModelParts) -> str:
    """The plan row a parameter name belongs to: a component, `llm.layers.<i>`, `vision_tower.layers.<j>` or `other`."""
    return _lookup(name, owner_table(parts))


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    name: str  # "embeddings", "vision_tower", "vision_tower.layers.<j>", "projector", "llm.layers.<i>", ...
    trainable: bool
    names: list[str] = field(default_factory=list)  # the parameter names it owns, in model order
    num_params: int = 0  # elements
    sizes: list[int] = field(default_factory=list)  # elements per name
    # In a trainable row, train only the tensors whose name contains this (LoRA: "lora_"; the base weights of
    # the block stay frozen). None: the whole row trains.
    only: str | None = None

    @property
    def trainable_names(self) -> list[str]:
        if not self.trainable:
            return []
        return [n for n in self.names if self.only is None or self.only in n]

    @property
    def num_trainable(self) -> int:
        if not self.trainable:
            return 0
        return sum(size for n, size in zip(self.names, self.sizes) if self.only is None or self.only in n)

    @property
    def num_frozen(self) -> int:
        return self.num_params - self.num_trainable

    @property
    def group(self) -> str | None:
        """ "llm.layers" / "vision_tower.layers" for layer rows (whose index is `index`), else None."""
        for g in (LLM_LAYERS, VISION_LAYERS):
            if self.name.startswith(g + "."):
                return g
        return None

    @property
    def index(self) -> int | None:
        return int(self.name.rsplit(".", 1)[1]) if self.group else None


def human_count(n: int) -> str:
    """1234 → "1.23K", 1_234_567 → "1.23M"; below 1000 as is."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale * 0.9995:  # so 999_999 reads 1.00M, not 1000.00K
            return f"{n / scale:.2f}{unit}"
    return str(n)


@dataclass
class FreezePlan:
    spec: TrainableSpec
    model_class: str
    family: str
    num_layers: int
    num_vision_layers: int
    # In order: embeddings, vision_tower, vision_tower.layers.*, projector, llm.layers.*, norm, lm_head, other.
    rows: list[PlanRow]

    def row(self, name: str) -> PlanRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def trainable_names(self) -> set[str]:
        return {n for r in self.rows for n in r.trainable_names}

    @property
    def trainable_layers(self) -> list[int]:
        """LLM layer indices that train (sorted)."""
        return [r.index for r in self.rows if r.group == LLM_LAYERS and r.trainable]

    @property
    def trainable_vision_layers(self) -> list[int]:
        return [r.index for r in self.rows if r.group == VISION_LAYERS and r.trainable]

    @property
    def first_trainable_layer(self) -> int | None:
        """Lowest trainable LLM layer. Only about LLM layers: see `trains_below_llm` for the parts under them."""
        return min(self.trainable_layers, default=None)

    @property
    def trains_below_llm(self) -> bool:
        """Whether anything feeding the LLM layers trains (embeddings, vision tower or projector): then gradients
        must flow below `first_trainable_layer`."""
        below = ("embeddings", "vision_tower", "projector")
        return any(r.trainable and (r.name in below or r.group == VISION_LAYERS) for r in self.rows)

    @property
    def num_trainable(self) -> int:
        return sum(r.num_trainable for r in self.rows)

    @property
    def num_total(self) -> int:
        return sum(r.num_params for r in self.rows)

    def apply(self, model: nn.Module) -> nn.Module:
        """Set requires_grad: True for exactly the planned trainable parameters, False for all others."""
        params = dict(unwrap(model).named_parameters(remove_duplicate=True))
        planned = {n for r in self.rows for n in r.names}
        if set(params) != planned:
            diff = sorted(set(params) ^ planned)
            raise SpecError(
                f"this plan was made for a different model ({self.model_class}): {len(diff)} parameter names "
                f"differ, e.g. {diff[0]!r}"
            )
        trainable = self.trainable_names
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        return model

    def _display_rows(self) -> list[tuple[str, int, int]]:
        # Consecutive layer rows with the same status collapse into one ("llm.layers.0-7"): a 32-layer model
        # stays readable, and every boundary between trained and frozen layers is still visible.
        out: list[tuple[str, int, int]] = []
        run: list[PlanRow] = []

        def flush():
            if run:
                a, b = run[0].index, run[-1].index
                label = f"{run[0].group}.{a}" + (f"-{b}" if b != a else "")
                out.append((label, sum(r.num_trainable for r in run), sum(r.num_frozen for r in run)))
                run.clear()

        for r in self.rows:
            if r.group and run and (r.group != run[-1].group or r.trainable != run[-1].trainable):
                flush()
            if r.group:
                run.append(r)
                continue
            flush()
            if r.name == OTHER and not r.names:
                continue  # nothing unmatched: no row
            out.append((r.name, r.num_trainable, r.num_frozen))
        flush()
        return out

    def table(self) -> str:
        """Fixed-width text table: component / layer | trainable | frozen, then TOTAL and the trainable share."""
        rows = self._display_rows()
        w = max([len("component / layer"), len("TOTAL")] + [len(label) for label, _, _ in rows])
        header = f"{'component / layer':<{w}}  {'trainable':>10}  {'frozen':>10}"
        lines = [header, "-" * len(header)]
        lines += [f"{label:<{w}}  {human_count(t):>10}  {human_count(f):>10}" for label, t, f in rows]
        total, trainable = self.num_total, self.num_trainable
        pct = 100.0 * trainable / total if total else 0.0
        lines.append("-" * len(header))
        lines.append(
            f"{'TOTAL':<{w}}  {human_count(trainable):>10}  {human_count(total - trainable):>10}  "
            f"({pct:.2f}% of {human_count(total)} trainable)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable summary for run.json (parameter names only for the trainable ones)."""
        return {
            "family": self.family,
            "model_class": self.model_class,
            "spec": self.spec.to_dict(),
            "num_layers": self.num_layers,
            "num_vision_layers": self.num_vision_layers,
            "trainable_layers": self.trainable_layers,
            "trainable_vision_layers": self.trainable_vision_layers,
            "first_trainable_layer": self.first_trainable_layer,
            "num_trainable": self.num_trainable,
            "num_total": self.num_total,
            "trainable_fraction": self.num_trainable / self.num_total if self.num_total else 0.0,
            "rows": [
                {
                    "name": r.name,
                    "trainable": r.trainable,
                    "num_trainable": r.num_trainable,
                    "num_frozen": r.num_frozen,
                    "num_tensors": len(r.names),
                }
                for r in self.rows
            ],
            "trainable_names": sorted(self.trainable_names),
        }


def resolve_plan(
    model: nn.Module, spec: TrainableSpec | Mapping, where: str = "trainable", adapter_marker: str | None = None
) -> FreezePlan:
    """Assign every parameter of `model` (unwrapped) to one row and decide from `spec` which rows train.

    `adapter_marker` (e.g. "lora_" for a PEFT LoRA model): in the selected LLM layers only tensors whose name
    contains it train, and adapter tensors anywhere else are an error."""
    spec = TrainableSpec.from_dict(spec, where)  # validates; passes a TrainableSpec through
    model = unwrap(model)
    family = family_of(model)
    parts = family.parts(model)
    cls = type(model).__name__

    layers = set(resolve_layers(spec.layers, parts.num_layers, where=f"{where}.layers"))
    vision = _parse_vision(spec.vision_tower, f"{where}.vision_tower")
    vision_layers = set(
        _resolve(vision, spec.vision_tower, parts.num_vision_layers, f"{where}.vision_tower", "vision layers")
    )
    whole_tower = vision.kind == "all"

    rows: dict[str, PlanRow] = {}

    def add(name: str, trainable: bool):
        rows[name] = PlanRow(name, trainable)

    add("embeddings", spec.embeddings)
    add("vision_tower", whole_tower)  # with "last:N" the rest of the tower (patch embeddings, norms) stays frozen
    for j in range(parts.num_vision_layers):
        add(f"{VISION_LAYERS}.{j}", j in vision_layers)
    add("projector", spec.projector)
    for i in range(parts.num_layers):
        add(f"{LLM_LAYERS}.{i}", i in layers)
        rows[f"{LLM_LAYERS}.{i}"].only = adapter_marker
    add("norm", spec.norm)
    add("lm_head", spec.lm_head)
    add(OTHER, False)

    table = owner_table(parts)
    owner_by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        row = rows[_lookup(name, table)]
        row.names.append(name)
        size = numel(p)
        row.sizes.append(size)
        row.num_params += size
        if adapter_marker and adapter_marker in name and not (row.group == LLM_LAYERS and row.trainable):
            raise SpecError(f"{where}: adapter tensor {name!r} lies outside the selected LLM layers")
        owner_by_id[id(p)] = name

    # Every requested part must own something; a silent no-op would train less than the spec says.
    def require(row_names: list[str], key: str, what: str = ""):
        if not any(rows[n].names for n in row_names):
            hint = _tied_hint(key, parts, owner_by_id, table) if key in COMPONENTS else ""
            raise SpecError(f"{where}.{key}: {what}matched no parameters in {cls}{hint}")

    for key in FLAGS:
        if getattr(spec, key):
            require([key], key)
    if whole_tower:
        require(["vision_tower"] + [f"{VISION_LAYERS}.{j}" for j in range(parts.num_vision_layers)], "vision_tower")
    for j in sorted(vision_layers):
        require([f"{VISION_LAYERS}.{j}"], "vision_tower", f"vision layer {j} ")
    for i in sorted(layers):
        require([f"{LLM_LAYERS}.{i}"], "layers", f"layer {i} ")

    return FreezePlan(
        spec=spec,
        model_class=cls,
        family=family.name,
        num_layers=parts.num_layers,
        num_vision_layers=parts.num_vision_layers,
        rows=list(rows.values()),
    )


def numel(p) -> int:
    """Elements of a parameter, also under DeepSpeed ZeRO-3, where each rank holds a partitioned stand-in whose
    own numel() is 0 and the real count is `ds_numel`."""
    return getattr(p, "ds_numel", None) or p.numel()


def _tied_hint(component: str, parts: ModelParts, owner_by_id: dict[int, str], table: Mapping[str, str]) -> str:
    """Explain an empty component whose parameters are shared with (and so listed under) another one."""
    for path in parts.component_paths()[component]:
        obj = parts.family.get(parts.model, path)
        if isinstance(obj, nn.Parameter):
            params = [obj]
        else:  # remove_duplicate=False: the tied tensor is exactly the one listed under another name
            params = [p for _, p in obj.named_parameters(remove_duplicate=False)]
        for p in params:
            if id(p) in owner_by_id:
                other = owner_by_id[id(p)]
                return (
                    f" (its parameters are tied to {other}, which the plan counts under "
                    f"{_lookup(other, table)!r}; train that instead)"
                )
    return ""
