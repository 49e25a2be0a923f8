"""Per-layer geometry profile of one extraction: how visual and textual representations relate, layer by layer.

What "visual" and "textual" are depends on the extraction's protocol (analysis.extract, docs/analysis.md):

* **authors**: the image with its question, and its textual twin (the captions written out, the same question), both
  read at the same `position` (the last token, the sequence mean or one drawn token); at each layer the pairs whose
  visual vectors are exact duplicates are dropped with their partners (`analysis.geometry.unique_pairs`);
* **describe**: the mean over the image tokens of the image with a fixed prompt, and the mean over the caption's
  tokens of the caption alone; `last` is the image prompt's last token.

For every hidden-state index l (0 = embeddings … num_layers = final norm; see analysis.extract) the k-nearest
neighbours of each representation are searched once (`analysis.geometry.knn`, k = max(k, 2·gride_rank)) and shared
by every neighbour-based metric:

=================  ======================================================================================
metric             meaning
=================  ======================================================================================
visual_id          TwoNN intrinsic dimension of the visual representations (DADApy's "base" fit, 90 % of μ)
textual_id         TwoNN ID of the textual representations
last_id            describe only: TwoNN ID of the image prompt's last token (from index 1: at index 0 it is the
                   same embedding for every pair, so last_id and last_t_overlap are NaN there, without a warning)
visual_id_gride    GRIDE ID of the visual representations at one fixed scale: the ML estimate from μ = r_2n/r_n
                   with n = gride_rank (the command's default: 16 under authors, as theirs; 8 under describe);
                   NaN with a warning when N − 2 < 2·gride_rank
textual_id_gride   the same for the textual representations
vt_overlap         neighbourhood overlap χ of visual and textual representations (k neighbours, Euclidean; the
                   fraction of an image's k nearest images whose partners are among its partner's k nearest)
last_t_overlap     describe only: the same between the prompt's last token and the caption means
label_overlap      fraction of each visual representation's k neighbours sharing its label (class-balanced, DADApy)
probe_acc          linear probe: LogisticRegression on the standardised visual representations → label, trained
                   on 70 %, accuracy on the held-out 30 % (stratified when every class has ≥ 2 pairs; fixed seed)
idcorr, idcorr_p   Intrinsic Dimension Correlation of visual vs textual representations and its permutation
                   p-value (`idcorr_shuffles` shuffles, default 3; p is NaN with 0). IdCorr standardises and
                   concatenates the two, so it runs its own neighbour searches.
=================  ======================================================================================

Undefined values (constant or NaN representations, a single class in the probe's training split, …) are NaN
and emit a GeometryWarning naming the model and layer; they never stop the other layers.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.extract import POSITIONS, AnalysisError
from analysis.geometry import (
    GeometryWarning,
    gride_at,
    gride_band,
    gride_scaling,
    id_correlation,
    knn,
    label_overlap,
    neighborhood_overlap,
    overlap_band,
    twonn,
    twonn_band,
    unique_pairs,
)
from midtune.files import atomic_file, write_json

METRICS = ("visual_id", "textual_id", "last_id", "visual_id_gride", "textual_id_gride", "vt_overlap",
           "last_t_overlap", "label_overlap", "probe_acc", "idcorr", "idcorr_p")
PLOTTED = ("visual_id", "textual_id", "last_id", "visual_id_gride", "textual_id_gride", "vt_overlap",
           "last_t_overlap", "label_overlap", "probe_acc", "idcorr")
TITLES = {
    "visual_id": "visual ID (TwoNN)", "textual_id": "textual ID (TwoNN)", "last_id": "last-token ID (TwoNN)",
    "visual_id_gride": "visual ID (GRIDE)", "textual_id_gride": "textual ID (GRIDE)",
    "vt_overlap": "visual↔textual overlap", "last_t_overlap": "last-token↔textual overlap",
    "label_overlap": "label overlap (visual)", "probe_acc": "linear probe accuracy (visual)",
    "idcorr": "IdCorr (visual, textual)", "idcorr_p": "IdCorr p-value",
}
# Every ID and overlap curve has a band: `<metric>_lo`, `<metric>_hi`, the 95 % percentile interval over resamples of
# the pairs (analysis.geometry.pair_band), `band_resamples` of them (0: no bands).
BANDED = ("visual_id", "textual_id", "last_id", "visual_id_gride", "textual_id_gride", "vt_overlap",
          "last_t_overlap")
COLUMNS = METRICS + tuple(f"{m}_{end}" for m in BANDED for end in ("lo", "hi"))
PROFILE_FORMAT = "midtune-profile/1"
AUTHORS_GRIDE_RANK = 16  # the authors' GRIDE scale: DADApy's return_id_scaling_gride at n1 = 16
TERMS_FILE = "overlap_terms.safetensors"  # per model: (hidden states, pairs) per-pair visual↔textual overlap


def gride_title(metric: str, rank: int) -> str:
    """A metric's title, the GRIDE ones with their scale (n1 = rank: μ = r_2n1 / r_n1)."""
    title = TITLES.get(metric, metric)
    return title.replace("(GRIDE)", f"(GRIDE, n1 = {rank})") if metric.endswith("_gride") else title


def column_title(column: str) -> str:
    for end, word in (("_lo", "low"), ("_hi", "high")):
        if column.endswith(end) and column[:-len(end)] in BANDED:
            return f"{TITLES[column[:-len(end)]]}: 95 % band, {word} end (pairs resampled)"
    return TITLES[column]


@dataclass
class ProfileSettings:
    k: int = 30
    label: str = "dominant_color"
    gride_rank: int = 8
    idcorr_shuffles: int = 3
    idcorr: bool = True
    test_size: float = 0.3
    seed: int = 0
    band_resamples: int = 200
    position: str = "last"  # authors' protocol: which of its readings is profiled (last | mean | token)
    gride_range_max: int = 100  # the whole GRIDE curve, n1 = 1, 2, 4, … with 2·n1 ≤ this (the authors': 100); 0: off

    def check(self, n_pairs: int | None = None) -> None:
        if self.position not in POSITIONS:
            raise AnalysisError(f"position {self.position!r} is not one of {', '.join(POSITIONS)}")
        if self.k < 1:
            raise AnalysisError(f"k must be >= 1, got {self.k}")
        if self.gride_rank < 1 or self.gride_rank & (self.gride_rank - 1):
            raise AnalysisError(f"gride rank must be a power of two (1, 2, 4, 8, …), got {self.gride_rank}")
        if self.gride_range_max < 0 or self.gride_range_max == 1:
            raise AnalysisError(f"gride range max must be 0 (off) or >= 2, got {self.gride_range_max}")
        if self.band_resamples < 0:
            raise AnalysisError(f"band resamples must be >= 0, got {self.band_resamples}")
        if self.idcorr_shuffles < 0:
            raise AnalysisError(f"idcorr shuffles must be >= 0, got {self.idcorr_shuffles}")
        if n_pairs is not None and n_pairs < self.k + 2:
            raise AnalysisError(f"{n_pairs} pairs, but k = {self.k} needs at least k + 2 = {self.k + 2} "
                                f"(use more pairs or a smaller k)")


def roles(protocol: str, position: str, layer: int) -> dict[str, str]:
    """Which stored representation plays which part at hidden-state index `layer`: `visual` and `textual` (every
    metric), `last` (the describe protocol's prompt-last-token metrics). Empty where nothing can be measured: the
    last token at index 0 is the same embedding (the assistant prefix's last token) for every pair."""
    if protocol == "authors":
        if position == "last" and layer == 0:
            return {}
        return {"visual": f"visual_{position}", "textual": f"textual_{position}"}
    # At index 0 the prompt's last token is one and the same embedding for every pair: not measured there.
    return {"visual": "image_mean", "textual": "caption_mean", **({"last": "image_last"} if layer > 0 else {})}


def compute_profile(extraction, labels: Sequence[str], settings: ProfileSettings | None = None,
                    name: str = "model", progress: bool = False,
                    overlap_terms: dict[int, np.ndarray] | None = None,
                    scaling: dict[int, dict] | None = None) -> dict[int, dict[str, float]]:
    """{hidden-state index: {metric: value}} for one extraction (anything with `layer(kind, l)`, `num_states`).

    Under the authors' protocol (`extraction.protocol`) the pairs whose visual representations are exact
    duplicates are dropped at each layer, their partners with them, as the authors do (`unique_pairs`). With
    `overlap_terms`, each layer's per-pair visual↔textual overlap (NaN for a dropped pair) is stored there, for
    intervals on differences between models (the same pairs resampled in both). With `scaling`, each layer's whole
    GRIDE curve of the visual and textual representations is stored there ({role: {n1, ids, errors, scales}}, up to
    `gride_range_max`), for the scale plot."""
    settings = settings or ProfileSettings()
    labels = np.asarray(labels)
    n = len(labels)
    settings.check(n)
    protocol = getattr(extraction, "protocol", "describe")
    from tqdm.auto import tqdm

    out: dict[int, dict[str, float]] = {}
    for layer in tqdm(range(extraction.num_states), desc=f"profile {name}", unit="layer", disable=not progress):
        where = f"model {name!r}, layer {layer}"
        reps = {role: extraction.layer(kind, layer) for role, kind in roles(protocol, settings.position, layer).items()}
        for role, x in reps.items():
            if len(x) != n:
                raise AnalysisError(f"{where}: the {role} representations have {len(x)} rows for {n} labels")
        keep = unique_pairs(reps["visual"]) if reps and protocol == "authors" else np.arange(n)
        curves = scaling.setdefault(layer, {}) if scaling is not None and settings.gride_range_max and reps else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[layer], chi = _measured_layer({r: x[keep] for r, x in reps.items()}, labels[keep], settings, n,
                                              curves)
        for w in caught:  # re-emitted with the model and layer named
            if issubclass(w.category, (RuntimeWarning, UserWarning)):  # GeometryWarning is a RuntimeWarning
                warnings.warn(f"{where}: {w.message}", GeometryWarning, stacklevel=2)
        if overlap_terms is not None:
            overlap_terms[layer] = np.full(n, np.nan, dtype=np.float32)
            if chi is not None:
                overlap_terms[layer][keep] = chi
    return out


def _measured_layer(reps: dict, labels: np.ndarray, s: ProfileSettings, n: int,
                    curves: dict | None) -> tuple[dict[str, float], np.ndarray | None]:
    """One layer's metrics and per-pair overlaps: all NaN where nothing is measured (no representations, or
    fewer distinct pairs than k + 2 of the `n`)."""
    if not reps:
        return dict.fromkeys(COLUMNS, math.nan), None
    kept = len(labels)
    if kept < s.k + 2:
        warnings.warn(f"{kept} distinct visual representations of {n}, but k = {s.k} needs k + 2: not measured",
                      GeometryWarning, stacklevel=2)
        return dict.fromkeys(COLUMNS, math.nan), None
    # the neighbours every metric shares; the GRIDE curve's range only where the curve is wanted
    k_search = min(max(s.k, 2 * s.gride_rank, s.gride_range_max if curves is not None else 0), kept - 2)
    return _layer_metrics(reps, labels, s, k_search, curves)


def _layer_metrics(reps: dict, labels: np.ndarray, s: ProfileSettings, k_search: int,
                   scaling: dict | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    """The metrics of one layer, and the per-pair visual↔textual overlap (None where it is undefined). With
    `scaling`, the visual and textual GRIDE curves go there."""
    nan = float("nan")
    values = dict.fromkeys(COLUMNS, nan)
    bands = {"n_resamples": s.band_resamples, "seed": s.seed}

    def safe(what: str, fn):
        try:
            return fn()
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
            warnings.warn(f"{what}: {e} — NaN", GeometryWarning, stacklevel=2)
            return None

    nb = {role: safe(role, lambda x=x: knn(x, k_search)) for role, x in reps.items()}
    img, txt, last = nb["visual"], nb["textual"], nb.get("last")
    def band(metric: str, fn):
        if s.band_resamples and math.isfinite(values[metric]):
            values[f"{metric}_lo"], values[f"{metric}_hi"] = safe(f"{metric} band", fn) or (nan, nan)

    for metric, neighbours in (("visual_id", img), ("textual_id", txt), ("last_id", last)):
        if neighbours is not None:
            values[metric] = _num(safe(metric, lambda nb_=neighbours: twonn(nb_)))
            band(metric, lambda nb_=neighbours: twonn_band(nb_, **bands))
    for role, neighbours in (("visual", img), ("textual", txt)):
        if scaling is not None and neighbours is not None:
            curve = safe(f"{role} GRIDE curve", lambda nb_=neighbours: gride_scaling(nb_, s.gride_range_max))
            if curve is not None:
                ids, errors, scales = curve
                scaling[role] = {"n1": [2 ** i for i in range(len(ids))], "ids": ids.tolist(),
                                 "errors": errors.tolist(), "scales": scales.tolist()}
    for metric, neighbours in (("visual_id_gride", img), ("textual_id_gride", txt)):
        if neighbours is not None:
            values[metric] = _num(safe(metric, lambda nb_=neighbours: _gride_at(nb_, s.gride_rank)))
            band(metric, lambda nb_=neighbours: gride_band(nb_, s.gride_rank, **bands))
    terms = None
    for metric, a in (("vt_overlap", img), ("last_t_overlap", last)):
        if a is not None and txt is not None:
            chi = safe(metric, lambda a_=a: neighborhood_overlap(a_, txt, s.k, average=False))
            if chi is not None:
                values[metric] = float(chi.mean())
                band(metric, lambda chi_=chi: overlap_band(chi_, **bands))
                terms = np.asarray(chi, dtype=np.float32) if metric == "vt_overlap" else terms
    if img is not None:
        values["label_overlap"] = _num(safe("label_overlap", lambda: label_overlap(img, labels, s.k)))
        values["probe_acc"] = _num(safe("probe_acc", lambda: probe_accuracy(reps["visual"], labels,
                                                                           s.test_size, s.seed)))
    if s.idcorr and img is not None and txt is not None:
        result = safe("idcorr", lambda: id_correlation(reps["visual"], reps["textual"],
                                                       n_shuffles=s.idcorr_shuffles, seed=s.seed))
        if result is not None:
            values["idcorr"], values["idcorr_p"] = _num(result[0]), _num(result[1])
    return values, terms


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _gride_at(nb, rank: int) -> float:
    """GRIDE's ML ID at scale n1 = rank (μ = r_2n1 / r_n1)."""
    max_rank = min(nb.k, nb.n - 2)
    if 2 * rank > max_rank:
        warnings.warn(f"GRIDE at rank {rank} needs {2 * rank} neighbours, but only {max_rank} are available "
                      f"({nb.n} pairs)", GeometryWarning, stacklevel=2)
        return float("nan")
    return gride_at(nb, rank)


def probe_accuracy(X: np.ndarray, labels: np.ndarray, test_size: float = 0.3, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (standardised features) for `labels`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise ValueError("representation contains NaN or infinite values")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"probe: only one class ({classes[0]!r}) in the labels")
    n_test = math.ceil(test_size * len(labels))
    stratify = labels if counts.min() >= 2 and n_test >= len(classes) and len(labels) - n_test >= len(classes) \
        else None
    X_train, X_test, y_train, y_test = train_test_split(X, labels, test_size=test_size, random_state=seed,
                                                        stratify=stratify)
    if len(np.unique(y_train)) < 2:
        raise ValueError("probe: the training split holds a single class")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X_train, y_train)
    return float((probe.predict(X_test) == y_test).mean())


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _json_value(v: float):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def write_profiles(out_dir: Path, profiles: dict[str, dict[int, dict[str, float]]], info: dict[str, dict],
                   settings: ProfileSettings, extra: dict | None = None,
                   overlap_terms: dict[str, dict[int, np.ndarray]] | None = None,
                   scaling: dict[str, dict[int, dict]] | None = None) -> dict[str, Path]:
    """profiles.json (`profiles[model][layer][metric]`, NaN → null), profiles.csv (a row per model and layer),
    profile.png (a panel per metric, a line per model), and with `overlap_terms` ({model: {layer: per-pair
    overlap}}) overlap_terms.safetensors: a (hidden states, pairs) float32 tensor per model, the pairs in the
    order of profiles.json's settings.ids, so that a difference between two models can be resampled by pair; with
    `scaling` ({model: {layer: {role: curve}}}) gride_scaling.json and gride_scaling.png: the GRIDE ID at every
    scale n1, a line per layer (the profile's GRIDE curves are its column at n1 = gride_rank)."""
    from analysis.plots import plot_profiles

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": PROFILE_FORMAT,
        "settings": {**asdict(settings), **(extra or {})},
        "metrics": {m: gride_title(m, settings.gride_rank) if m in METRICS else column_title(m) for m in COLUMNS},
        "layers": "hidden_states index: 0 = embeddings, l = output of decoder layer l-1, last = final norm",
        "models": info,
        "profiles": {name: {str(layer): {m: _json_value(v) for m, v in metrics.items()}
                            for layer, metrics in per_layer.items()} for name, per_layer in profiles.items()},
    }
    paths = {"json": out_dir / "profiles.json", "csv": out_dir / "profiles.csv", "png": out_dir / "profile.png"}
    write_json(paths["json"], doc)
    with atomic_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "layer", *COLUMNS])
        for name, per_layer in profiles.items():
            for layer, metrics in per_layer.items():
                writer.writerow([name, layer, *("" if not math.isfinite(metrics.get(m, math.nan))
                                                else f"{metrics[m]:.6g}" for m in COLUMNS)])
    plot_profiles(profiles, paths["png"], gride_rank=settings.gride_rank)
    if scaling and any(scaling.values()):
        from analysis.plots import plot_gride_scaling

        paths["scaling_json"], paths["scaling_png"] = out_dir / "gride_scaling.json", out_dir / "gride_scaling.png"
        write_json(paths["scaling_json"], {
            "format": PROFILE_FORMAT, "gride_rank": settings.gride_rank, "range_max": settings.gride_range_max,
            "curves": "models[model][layer][visual|textual] = {n1, ids, errors, scales}: GRIDE ID at scale n1 "
                      "(μ = r_2n1 / r_n1), its error, the mean distance of the two neighbours",
            "models": {name: {str(layer): curves for layer, curves in per_layer.items() if curves}
                       for name, per_layer in scaling.items()}})
        plot_gride_scaling(scaling, settings.gride_rank, paths["scaling_png"])
    if overlap_terms:
        from safetensors.numpy import save_file

        paths["terms"] = out_dir / TERMS_FILE
        tensors = {name: np.stack([per_layer[layer] for layer in sorted(per_layer)]).astype(np.float32)
                   for name, per_layer in overlap_terms.items()}
        with atomic_file(paths["terms"]) as tmp:
            save_file(tensors, str(tmp), metadata={"format": PROFILE_FORMAT, "rows": "hidden-state index",
                                                   "columns": "pairs, in the order of profiles.json settings.ids"})
    return paths


def read_profiles(path: str | Path) -> dict:
    """profiles.json → its document, with `profiles[model][int layer][metric]` as floats (null → NaN)."""
    path = Path(path)
    if path.is_dir():
        path = path / "profiles.json"
    if not path.is_file():
        raise AnalysisError(f"profile {str(path)!r} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"{path}: not valid JSON ({e})") from None
    if doc.get("format") != PROFILE_FORMAT:
        raise AnalysisError(f"{path}: not a midtune profile (format {doc.get('format')!r})")
    doc["profiles"] = {name: {int(layer): {m: float("nan") if v is None else float(v) for m, v in metrics.items()}
                              for layer, metrics in per_layer.items()} for name, per_layer in doc["profiles"].items()}
    return doc
