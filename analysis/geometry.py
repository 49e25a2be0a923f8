"""Per-layer representation geometry: arrays in, numbers out.

Every function takes numpy arrays or torch tensors of shape (samples, features) and returns plain
floats or numpy arrays. The neighbour-based metrics (TwoNN, GRIDE, neighbourhood/label overlap) also
accept a precomputed :class:`Neighbours`, so that a layer's k-nearest-neighbour search — the only
expensive step — runs once and is shared by all of them::

    nb_img, nb_txt = knn(img, k=64), knn(txt, k=64)
    twonn(nb_img), gride_scaling(nb_img), neighborhood_overlap(nb_img, nb_txt, k=30)

Conventions shared by everything below:

* Neighbour lists exclude the point itself; column j holds the (j+1)-th nearest neighbour.
* Row i of A is paired with row i of B. Nothing here ever sorts, deduplicates or drops rows, so
  the pairing (e.g. image <-> caption) survives duplicates; see :func:`knn` for how ties are broken.
* The estimators follow DADApy (sissa-data-science/DADApy) and are tested against numbers produced
  by it (tests/fixtures/geometry); where DADApy fails on duplicate points, the docstring says what
  happens instead.
* Bad input (too few samples, NaN/inf, constant data, mismatched pairs) raises ``ValueError``
  naming the argument; a metric that is undefined for the given data returns NaN and emits a
  :class:`GeometryWarning`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq

__all__ = [
    "GeometryWarning",
    "Neighbours",
    "cka",
    "gride_at",
    "gride_band",
    "gride_scaling",
    "id_correlation",
    "knn",
    "label_overlap",
    "neighborhood_overlap",
    "overlap_band",
    "pair_band",
    "twonn",
    "twonn_band",
    "unique_pairs",
]

_EPS64 = np.finfo(np.float64).eps


class GeometryWarning(RuntimeWarning):
    """A metric is undefined (or only partly defined) for the data it was given."""


@dataclass(frozen=True)
class Neighbours:
    """k nearest neighbours of every point, self excluded, nearest first.

    ``distances[i, j]`` is the Euclidean distance from point i to its (j+1)-th neighbour
    ``indices[i, j]``; both have shape (N, k).
    """

    distances: np.ndarray
    indices: np.ndarray
    k: int

    def __post_init__(self):
        distances = np.asarray(self.distances, dtype=np.float64)
        indices = np.asarray(self.indices, dtype=np.int64)
        if distances.ndim != 2 or distances.shape != indices.shape or distances.shape[1] != self.k:
            raise ValueError(
                f"Neighbours: distances {distances.shape} and indices {indices.shape} must both be (N, k={self.k})"
            )
        object.__setattr__(self, "distances", distances)
        object.__setattr__(self, "indices", indices)

    @property
    def n(self) -> int:
        return self.distances.shape[0]


# ----------------------------------------------------------------------------- input checks


def _points(X, name: str, min_samples: int = 2) -> torch.Tensor:
    """X as a 2-D floating tensor (float64 stays float64, everything else becomes float32), validated."""
    if isinstance(X, Neighbours):
        raise TypeError(f"{name}: expected a (samples, features) array, got precomputed Neighbours")
    if isinstance(X, torch.Tensor):
        x = X.detach()
    else:
        # np.require copies read-only arrays (e.g. from np.load(mmap_mode="r")), which torch cannot wrap.
        x = torch.from_numpy(np.require(np.asarray(X), requirements=["C", "W"]))
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (samples, features) array, got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    n = x.shape[0]
    if n < min_samples:
        raise ValueError(f"{name}: {n} samples, but at least {min_samples} are needed")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: has no features")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if bool((x == x[:1]).all()):
        raise ValueError(f"{name}: is constant (all {n} samples identical, every distance is 0)")
    return x


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _neighbours(X, k: int, name: str) -> Neighbours:
    """Precomputed neighbours (truncated to k) or a fresh knn search."""
    if isinstance(X, Neighbours):
        if X.k < k:
            raise ValueError(f"{name}: precomputed Neighbours has k={X.k}, but this metric needs k >= {k}")
        if X.n < k + 2:
            raise ValueError(f"{name}: {X.n} samples, but at least k + 2 = {k + 2} are needed")
        return X if X.k == k else Neighbours(X.distances[:, :k], X.indices[:, :k], k)
    return _knn(_points(X, name, min_samples=k + 2), k)


def _length(X) -> int:
    return X.n if isinstance(X, Neighbours) else len(X)


def _same_length(n_a: int, n_b: int, what: str) -> None:
    if n_a != n_b:
        raise ValueError(f"mismatched lengths: A has {n_a} samples but B has {n_b} ({what} needs paired rows)")


def _undefined(message: str) -> float:
    warnings.warn(message, GeometryWarning, stacklevel=3)
    return float("nan")


# ----------------------------------------------------------------------------- nearest neighbours


def knn(X, k: int, chunk_size: int = 2048, device: str | torch.device | None = None) -> Neighbours:
    """Exact k nearest neighbours of every row of X (Euclidean, self excluded).

    1. *Selection*: squared distances ``||x||² + ||y||² − 2 x·y`` from float32 matrix products
       between (chunk_size × chunk_size) blocks of the data (centred first to limit cancellation),
       clamped at 0. The matrix is symmetric, so only blocks on and above the diagonal are
       computed, each serving both its rows and (transposed) its columns; running ``topk`` lists
       keep ``k + margin`` candidates per point. Memory: O(N·k + chunk_size²).
    2. *Refinement* where float32 is not enough: the candidates' distances are recomputed from
       differences, ``||x_i − x_j||``, in the input's precision. This is done for every point when X
       is float64 (float64 in, float64-accurate distances out), and otherwise for the points where
       the expansion would lose more than two digits: some candidate with ||x_i||² + ||x_j||² > 100 d²
       (near-duplicates, dense low-dimensional data). Elsewhere the float32 distances are kept
       (relative error ~1e-6): refining everything would triple the cost on high-dimensional data,
       since gathering the candidates' rows is memory-bound.
    3. The k best are taken in lexicographic order of (distance, index).

    Duplicates and ties: exact duplicates are at distance exactly 0 (their rows are always
    refined) and ties go to the lower index, so the result does not depend on chunking or device,
    and rows are never reordered or dropped (pairing with another representation survives). If a
    tie at rank k runs past the candidate list (many identical points), that point's candidate list
    is widened until the tie is resolved. The neighbour *set* is exact except for near-ties below
    float32 resolution.

    Args:
        X: (N, D) array or tensor; N >= k + 2.
        k: number of neighbours.
        chunk_size: edge of the blocks of the distance matrix computed at once.
        device: torch device for the computation; default CUDA when available, else CPU.

    Returns:
        Neighbours with float64 distances and int64 indices of shape (N, k), nearest first.
    """
    k = _check_k(k)
    return _knn(_points(X, "X", min_samples=k + 2), k, chunk_size, device)


_MAX_CANCELLATION = 100.0  # refine when (||x_i||² + ||x_j||²) / d² exceeds this (> 2 digits lost)


def _knn(x: torch.Tensor, k: int, chunk_size: int = 2048, device=None) -> Neighbours:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    exact = x.to(torch.device(device))
    centred = (exact - exact.mean(0)).to(torch.float32)
    sq_norms = centred.square().sum(1)
    n = len(exact)
    # The margin absorbs float32 misordering at the rank-k boundary before refinement.
    n_candidates = min(n - 1, k + max(8, k // 4))
    cand_d2, cand = _candidates(centred, sq_norms, n_candidates, chunk_size)

    distances = torch.empty(n, k, dtype=torch.float64, device=exact.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=exact.device)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=exact.device)
        rows_d2, rows_cand, m = cand_d2[rows], cand[rows], n_candidates
        while True:
            dist, idx = _rank_candidates(exact, sq_norms, rows, rows_d2, rows_cand)
            distances[rows], indices[rows] = dist[:, :k], idx[:, :k]
            if m == n - 1:
                break
            # A tie at rank k that reaches the last candidate may continue beyond it: widen those rows.
            unresolved = dist[:, k - 1] == dist[:, -1]
            if not bool(unresolved.any()):
                break
            rows, m = rows[unresolved], min(n - 1, 2 * m)
            d2 = _squared_distances(centred, sq_norms, rows, slice(None))
            d2[torch.arange(len(rows), device=d2.device), rows] = float("inf")  # exclude self
            rows_d2, rows_cand = d2.topk(m, dim=1, largest=False, sorted=False)

    return Neighbours(distances.cpu().numpy(), indices.cpu().numpy(), k)


def _squared_distances(centred: torch.Tensor, sq_norms: torch.Tensor, rows, cols) -> torch.Tensor:
    """float32 ||x||² + ||y||² − 2 x·y between centred[rows] and centred[cols], clamped at 0."""
    d2 = torch.addmm(sq_norms[cols][None, :], centred[rows], centred[cols].T, alpha=-2.0)
    return d2.add_(sq_norms[rows][:, None]).clamp_(min=0.0)


def _candidates(centred: torch.Tensor, sq_norms: torch.Tensor, m: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 squared distances and indices of the m nearest candidates of every point (unsorted)."""
    n = len(centred)
    starts = range(0, n, block)
    found = {i: ([], []) for i in starts}  # row block -> lists of (squared distances, indices)

    def keep(i: int, d2: torch.Tensor, first_col: int) -> None:
        d2, idx = d2.topk(min(m, d2.shape[1]), dim=1, largest=False, sorted=False)
        found[i][0].append(d2)
        found[i][1].append(idx + first_col)

    for i in starts:
        rows = slice(i, min(i + block, n))
        for j in starts[i // block :]:  # upper triangle only: the matrix is symmetric
            d2 = _squared_distances(centred, sq_norms, rows, slice(j, min(j + block, n)))
            if i == j:
                d2.fill_diagonal_(float("inf"))  # exclude self
            keep(i, d2, j)
            if i != j:
                keep(j, d2.T, i)

    best_d2, best_idx = [], []
    for i in starts:
        d2, idx = torch.cat(found[i][0], dim=1), torch.cat(found[i][1], dim=1)
        d2, pos = d2.topk(m, dim=1, largest=False, sorted=False)
        best_d2.append(d2)
        best_idx.append(idx.gather(1, pos))
        del found[i]
    return torch.cat(best_d2), torch.cat(best_idx)


def _rank_candidates(exact, sq_norms, rows, cand_d2, cand) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates' distances (refined where needed) and indices, sorted by (distance, index)."""
    dist = cand_d2.to(torch.float64).sqrt_()
    if exact.dtype == torch.float64:
        refine = torch.ones(len(rows), dtype=torch.bool, device=dist.device)
    else:
        refine = (sq_norms[rows, None] + sq_norms[cand] > _MAX_CANCELLATION * cand_d2).any(1)
    if bool(refine.any()):
        dist[refine] = _exact_distances(exact, rows[refine], cand[refine]).to(torch.float64)
    return _ranked(dist, cand)


def _exact_distances(points: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """||points[rows[i]] − points[cand[i, j]]|| computed from differences (no cancellation)."""
    m, dim = cand.shape[1], points.shape[1]
    # Gather in blocks of ~8 MiB: the gather is memory-bound and faster when the block stays in cache.
    block = max(1, 2**23 // (m * dim * points.element_size()))
    out = torch.empty(cand.shape, dtype=points.dtype, device=points.device)
    for s in range(0, len(rows), block):
        gathered = points.index_select(0, cand[s : s + block].reshape(-1)).view(-1, m, dim)
        gathered.sub_(points[rows[s : s + block], None, :])
        out[s : s + block] = torch.linalg.vector_norm(gathered, dim=-1)
    return out


def _ranked(dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, index): sort by index, then stable sort by distance."""
    idx, perm = idx.sort(dim=1)
    dist, perm = dist.gather(1, perm).sort(dim=1, stable=True)
    return dist, idx.gather(1, perm)


# ----------------------------------------------------------------------------- intrinsic dimension


def twonn(X, fraction: float = 0.9, method: str = "base") -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), as DADApy's ``compute_id_2NN``.

    With r1, r2 the distances to the first and second neighbour, μ_i = r2_i / r1_i is Pareto
    distributed, F(μ) = 1 − μ^(−d).

    * ``method="base"``: sort log μ ascending, keep the lowest ``n_eff = int(N · fraction)`` values
      x_i (i = 1..n_eff) and fit y_i = −log(1 − i/N) = d · x_i through the origin by least squares:
      d = Σ x_i y_i / Σ x_i². (DADApy fits the same line with ``curve_fit``; with ``fraction == 1``
      the last y is infinite, so DADApy — and this function — switch to "ml".)
    * ``method="ml"``: maximum likelihood, d = (N − 1) / Σ log μ_i over all points (``fraction``
      is ignored, as in DADApy).

    Duplicates: a point with r1 == 0 (an exact copy exists) has undefined μ. DADApy produces
    inf/NaN there; here such points are dropped from the μ statistics (N counts the remaining
    points) without touching anyone else (a point whose two nearest neighbours are copies of each
    other keeps its μ = 1). If fewer than 3 points remain, the result is NaN with a GeometryWarning
    — compute the ID on unique rows instead.

    Args:
        X: (N, D) array/tensor, or precomputed Neighbours with k >= 2.
        fraction: fraction of the smallest μ used by the linear fit.
        method: "base" (linear fit, DADApy's default) or "ml".
    """
    if method not in ("base", "ml"):
        raise ValueError(f"method must be 'base' or 'ml', got {method!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    log_mu = twonn_log_mu(X)
    if len(log_mu) < 3:
        return _undefined(
            f"TwoNN: only {len(log_mu)} of {_length(X)} points have a nonzero nearest-neighbour distance "
            "(the rest are duplicates); ID is undefined — compute it on unique rows"
        )
    return _twonn_from_log_mu(log_mu, fraction, method)


def twonn_log_mu(X) -> np.ndarray:
    """Each point's log μ = log(r2 / r1), TwoNN's data, for the points with r1 > 0 (see :func:`twonn`)."""
    nb = _neighbours(X, 2, "X")
    r1, r2 = nb.distances[:, 0], nb.distances[:, 1]
    keep = r1 > 0
    return np.log(r2[keep] / r1[keep])


def _twonn_from_log_mu(log_mu: np.ndarray, fraction: float, method: str) -> float:
    n = len(log_mu)
    if method == "base" and math.isclose(fraction, 1.0):
        method = "ml"
    if method == "ml":
        total = log_mu.sum()
        return float((n - 1) / total) if total > 0 else _undefined("TwoNN: all r2 == r1, ID is undefined")
    n_eff = int(n * fraction)
    x = np.sort(log_mu)[:n_eff]
    y = -np.log1p(-np.arange(1, n_eff + 1) / n)
    xx = x @ x
    return float(x @ y / xx) if xx > 0 else _undefined("TwoNN: all retained r2 == r1, ID is undefined")


def gride_scaling(X, range_max: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GRIDE intrinsic dimension at growing scales, as DADApy's ``return_id_scaling_gride``.

    For n1 = 1, 2, 4, … with n2 = 2·n1 ≤ min(range_max, N − 2), μ_i = r_{n2}(i) / r_{n1}(i) has the
    density (Denti et al. 2022)

        f(μ) = d (μ^d − 1)^(n2−n1−1) / (B(n2−n1, n1) μ^((n2−1)d + 1)),

    and d is its maximum-likelihood estimate: the root in [0.001, 1000] of the score
    Σ ((1 − n2 + n1)/(1 − μ^−d) + n2 − 1) log μ − (N − 1)/d. As in DADApy, μ == 1 is nudged by
    10·eps and μ above the outlier threshold q50 + 20 (q95 − q50) is excluded from the fit; the
    error is 1/sqrt(Fisher information) on all μ.

    Duplicates: points with r_{n1} == 0 are dropped from that scale (DADApy instead replaces the
    zero with machine epsilon, which its outlier filter then removes).

    Args:
        X: (N, D) array/tensor, or Neighbours. With Neighbours of k < range_max, the largest scale
           is limited to k (with a GeometryWarning, like DADApy with a short distance matrix).
        range_max: largest neighbour rank n2 considered.

    Returns:
        (ids, errors, scales): one entry per scale n1 = 1, 2, 4, …; ``scales`` is the mean of r_{n1}
        and r_{n2} over the points, i.e. DADApy's ``rs_scaling`` (the distance at which each ID
        is measured).
    """
    range_max = _check_k(range_max, "range_max")
    if range_max < 2:
        raise ValueError(f"range_max must be >= 2, got {range_max}")
    if isinstance(X, Neighbours):
        max_rank = min(range_max, X.n - 2)
        if X.k < max_rank:
            warnings.warn(
                f"GRIDE: precomputed Neighbours has k={X.k} < range_max={range_max}; scales limited to k",
                GeometryWarning,
                stacklevel=2,
            )
            max_rank = X.k
        nb = _neighbours(X, max_rank, "X")
    else:
        n = len(X)
        if n < 4:
            raise ValueError(f"X: {n} samples, but at least 4 are needed")
        # Need max_rank neighbours and knn needs N >= k + 2.
        nb = _neighbours(X, min(range_max, n - 2), "X")
        max_rank = nb.k
    if max_rank < 2:
        raise ValueError("GRIDE needs at least 2 neighbours per point")

    ranks = 2 ** np.arange(int(math.log2(max_rank)) + 1)
    ids, errors, scales = [], [], []
    for n1 in ranks[:-1]:
        r_near, r_far = nb.distances[:, n1 - 1], nb.distances[:, 2 * n1 - 1]
        keep = r_near > 0
        mus = gride_mus(nb, int(n1))
        id_, err = _gride_single_scale(mus, n1, 2 * n1)
        ids.append(id_)
        errors.append(err)
        scales.append(np.mean([r_near[keep], r_far[keep]]) if keep.any() else float("nan"))
    return np.array(ids), np.array(errors), np.array(scales)


def gride_mus(nb: Neighbours, n1: int) -> np.ndarray:
    """Each point's μ = r_{2·n1} / r_{n1}, GRIDE's data at scale n1, for the points with r_{n1} > 0 (μ == 1
    nudged by 10·eps, as DADApy does)."""
    r_near, r_far = nb.distances[:, n1 - 1], nb.distances[:, 2 * n1 - 1]
    keep = r_near > 0
    mus = r_far[keep] / r_near[keep]
    mus[mus == 1] += 10 * _EPS64
    return mus


def gride_at(nb: Neighbours, n1: int) -> float:
    """GRIDE's ML ID at the one scale n1 (μ = r_{2·n1} / r_{n1}): the entry of :func:`gride_scaling` for n1."""
    return _gride_single_scale(gride_mus(nb, n1), n1, 2 * n1)[0]


def _gride_single_scale(mus: np.ndarray, n1: int, n2: int, d0: float = 1e-3, d1: float = 1e3) -> tuple[float, float]:
    if len(mus) < 3:
        return _undefined(f"GRIDE (n1={n1}): fewer than 3 points with nonzero r_n1"), float("nan")
    q95, q50 = np.percentile(mus, [95, 50])
    fit = mus[mus < q50 + 20 * (q95 - q50)]  # DADApy's filter against overlapping points
    log_mu = np.log(fit)

    def score(d):  # negative derivative of the log-likelihood (DADApy's _neg_dloglik_did)
        one_m = np.maximum(1.0 - fit ** (-d), 2 * 1e-7)
        return np.sum(((1 - n2 + n1) / one_m + n2 - 1.0) * log_mu) - (len(fit) - 1) / d

    try:
        id_ = brentq(score, d0, d1, xtol=1e-12, rtol=1e-13)
    except ValueError:  # no sign change: the likelihood has no maximum inside [d0, d1]
        return _undefined(f"GRIDE (n1={n1}): no ML estimate of the ID in [{d0}, {d1}]"), float("nan")

    # Fisher information, evaluated on all μ as DADApy does.
    one_m = np.maximum(1.0 - mus ** (-id_), 5 * _EPS64)
    fisher = len(mus) / id_**2 + np.sum((n2 - n1 - 1) * (np.log(mus) / one_m) ** 2 * mus ** (-id_))
    return float(id_), float(fisher**-0.5)


# ----------------------------------------------------------------------------- overlaps


def unique_pairs(A) -> np.ndarray:
    """Indices of the rows to keep so that A has no exact duplicate rows: the first of each group of equal rows,
    in their original order. Index both arrays of a pair with them (A[keep], B[keep]), so every kept row keeps
    its partner. This is the authors' handling (luisfpal/LLaVA_Representations_Analysis: np.unique over the
    first array, its partners taken by the same indices; duplicates of the second array stay). DADApy assumes
    every point is its own first neighbour, which duplicates break; the functions here do not need it (see
    :func:`knn`), so nothing here calls this implicitly: the authors' protocol does (docs/analysis.md)."""
    rows = A.detach().cpu().numpy() if isinstance(A, torch.Tensor) else np.asarray(A)
    if rows.ndim != 2:
        raise ValueError(f"A: expected a 2-D (samples, features) array, got shape {rows.shape}")
    _, first = np.unique(rows, axis=0, return_index=True)
    return np.sort(first)


def neighborhood_overlap(A, B, k: int = 30, average: bool = True):
    """Neighbourhood overlap χ between two representations of the same points.

    χ_i = |kNN_A(i) ∩ kNN_B(i)| / k (self excluded), χ = mean_i χ_i — DADApy's
    ``return_data_overlap``. Row i of A and row i of B are the same item.

    Args:
        A, B: (N, D_A) and (N, D_B) arrays/tensors, or Neighbours with at least k neighbours.
        k: neighbourhood size.
        average: return the mean (float) or the per-point χ_i (array of shape (N,)).
    """
    k = _check_k(k)
    _same_length(_length(A), _length(B), "neighborhood_overlap")  # before the expensive search
    nb_a, nb_b = _neighbours(A, k, "A"), _neighbours(B, k, "B")
    # Each row's k indices are distinct, so a shared neighbour appears exactly twice in the merged row.
    merged = np.sort(np.concatenate([nb_a.indices, nb_b.indices], axis=1), axis=1)
    overlap = (merged[:, 1:] == merged[:, :-1]).sum(axis=1) / k
    return float(overlap.mean()) if average else overlap


def label_overlap(X, labels, k: int = 30, weighted: bool = True, average: bool = True):
    """Fraction of each point's k nearest neighbours that share its label.

    χ_i = |{j ∈ kNN(i) : label_j = label_i}| / k (self excluded). DADApy's
    ``return_label_overlap``: with ``weighted=True`` the average weights point i by
    1 / (size of its class), i.e. it is the plain mean of the per-class mean overlaps, so a
    large class cannot dominate; ``weighted=False`` is the plain mean over points.

    Args:
        X: (N, D) array/tensor, or Neighbours with at least k neighbours.
        labels: length-N sequence of class labels (any comparable type).
        k: neighbourhood size.
        weighted: inverse-class-frequency weighting (DADApy's default).
        average: return the (weighted) mean, or the per-point χ_i.
    """
    k = _check_k(k)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D sequence, got shape {labels.shape}")
    if len(labels) != _length(X):
        raise ValueError(f"mismatched lengths: X has {_length(X)} samples but labels has {len(labels)}")
    nb = _neighbours(X, k, "X")
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    overlap = (codes[nb.indices] == codes[:, None]).mean(axis=1)
    if not average:
        return overlap
    return float(np.average(overlap, weights=1.0 / counts[codes] if weighted else None))


# ----------------------------------------------------------------------------- cross-representation


def id_correlation(A, B, n_shuffles: int = 100, seed: int = 0) -> tuple[float, float]:
    """Intrinsic Dimension Correlation (Basile et al. 2024) with a permutation p-value.

    IdCorr = (ID_A + ID_B − ID_[A,B]) / (ID_A + ID_B − min(ID_A, ID_B)), TwoNN ("base") IDs, where
    [A, B] concatenates the features (columns) of paired rows. Independent representations give
    ID_[A,B] ≈ ID_A + ID_B (IdCorr ≈ 0); B a function of A gives ID_[A,B] ≈ max(ID_A, ID_B)
    (IdCorr ≈ 1). As in the authors' code, each representation is first standardised per feature
    and then L2-normalised per row, so neither block dominates the joint distances.

    The p-value tests the pairing: B's rows are permuted ``n_shuffles`` times (numpy RNG seeded
    with ``seed``) and p = (1 + #{IdCorr_shuffled >= IdCorr}) / (1 + n_shuffles); NaN when
    ``n_shuffles == 0``.

    Returns:
        (idcorr, p_value)
    """
    a, b = _points(A, "A", min_samples=4), _points(B, "B", min_samples=4)
    _same_length(len(a), len(b), "id_correlation")
    if n_shuffles < 0:
        raise ValueError(f"n_shuffles must be >= 0, got {n_shuffles}")
    a, b = _standardise(a), _standardise(b)
    id_a, id_b = twonn(a), twonn(b)
    lower = min(id_a, id_b)

    def corr(b_rows: torch.Tensor) -> float:
        return (id_a + id_b - twonn(torch.cat([a, b_rows], dim=1))) / (id_a + id_b - lower)

    observed = corr(b)
    if not np.isfinite(observed):
        return _undefined("IdCorr: an intrinsic dimension is undefined"), float("nan")
    rng = np.random.default_rng(seed)
    shuffled = [corr(b[torch.from_numpy(rng.permutation(len(b)))]) for _ in range(n_shuffles)]
    p_value = (1 + np.sum(np.asarray(shuffled) >= observed)) / (1 + n_shuffles) if n_shuffles else float("nan")
    return float(observed), float(p_value)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    return torch.nn.functional.normalize(x, dim=1)


def cka(A, B, unbiased: bool = False) -> float:
    """Linear Centered Kernel Alignment between paired representations.

    With Gram matrices K = A Aᵀ and L = B Bᵀ, CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

    * ``unbiased=False``: HSIC(K, L) = tr(K H L H), H = I − 11ᵀ/N (Kornblith et al. 2019), i.e.
      ||A_cᵀ B_c||²_F with column-centred A_c, B_c.
    * ``unbiased=True``: the unbiased estimator (Song et al. 2012, eq. 5; Nguyen et al. 2021), as
      minyoungg/platonic-rep's ``unbiased_cka``: with K̃, L̃ the Grams with zeroed diagonals,
      HSIC = [⟨K̃, L̃⟩ + 1ᵀK̃1 · 1ᵀL̃1 / ((N−1)(N−2)) − 2/(N−2) · 1ᵀK̃L̃1] / (N(N−3)).

    Both are computed in float64 from feature-space products (no N×N matrix when N > D). Invariant
    to orthogonal transforms and isotropic scaling of either side; NaN with a warning if a
    self-HSIC is not positive (possible for the unbiased estimator on tiny samples).
    """
    min_samples = 4 if unbiased else 2  # the unbiased estimator divides by N(N − 3)
    a, b = _points(A, "A", min_samples), _points(B, "B", min_samples)
    _same_length(len(a), len(b), "cka")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Centring changes neither estimator (both are translation invariant) but avoids cancellation.
    a = a.to(device, torch.float64)
    b = b.to(device, torch.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    hsic = _hsic_unbiased if unbiased else _frobenius_inner
    ab, aa, bb = hsic(a, b), hsic(a, a), hsic(b, b)
    if aa <= 0 or bb <= 0:
        return _undefined(f"CKA: self-HSIC not positive (HSIC(A,A)={aa:.3g}, HSIC(B,B)={bb:.3g})")
    return ab / math.sqrt(aa * bb)


def _frobenius_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨A Aᵀ, B Bᵀ⟩_F = ||Aᵀ B||²_F, through whichever of the two products is cheaper."""
    n, da, db = a.shape[0], a.shape[1], b.shape[1]
    if da * db <= n * (da + db):
        return float((a.T @ b).square().sum())
    total = 0.0
    for s in range(0, n, 1024):  # row blocks of the N×N Grams
        total += float(((a[s : s + 1024] @ a.T) * (b[s : s + 1024] @ b.T)).sum())
    return total


def _hsic_unbiased(a: torch.Tensor, b: torch.Tensor) -> float:
    n = a.shape[0]
    diag_k, diag_l = a.square().sum(1), b.square().sum(1)  # diagonals of K and L
    kl = _frobenius_inner(a, b) - float(diag_k @ diag_l)  # ⟨K̃, L̃⟩
    k_rows = a @ a.sum(0) - diag_k  # K̃ 1
    l_rows = b @ b.sum(0) - diag_l  # L̃ 1
    middle = float(k_rows.sum() * l_rows.sum()) / ((n - 1) * (n - 2))
    last = 2.0 * float(k_rows @ l_rows) / (n - 2)
    return (kl + middle - last) / (n * (n - 3))


# ----------------------------------------------------------------------------- bands from resampling the pairs


def pair_band(terms: np.ndarray, estimate, n_resamples: int = 200, seed: int = 0,
              level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `estimate(terms[idx])` over `n_resamples` resamples idx of the pairs, with
    replacement: the band of a per-layer curve.

    `terms` holds one value per pair that the estimate is a function of: χ_i for an overlap (estimate: the mean),
    log μ_i for TwoNN, μ_i at n1 for GRIDE. Each pair's neighbours stay those of the whole sample (resampling the
    points themselves would put copies at distance 0, which no neighbour-based estimator survives), so the band
    is the sampling uncertainty of the estimate given the neighbourhoods. Resamples whose estimate is undefined
    are left out; NaN when more than a tenth are."""
    terms = np.asarray(terms)
    if n_resamples < 1 or len(terms) < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an undefined resample is counted below, not reported one by one
        for b in range(n_resamples):
            values[b] = estimate(terms[rng.integers(0, len(terms), len(terms))])
    finite = values[np.isfinite(values)]
    if len(finite) < 0.9 * n_resamples:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def overlap_band(chi: np.ndarray, **kwargs) -> tuple[float, float]:
    """Band of a neighbourhood overlap from its per-pair χ_i (``neighborhood_overlap(..., average=False)``)."""
    return pair_band(chi, np.mean, **kwargs)


def twonn_band(X, fraction: float = 0.9, method: str = "base", **kwargs) -> tuple[float, float]:
    """Band of :func:`twonn` (same arguments) from resampling the pairs' log μ."""
    return pair_band(twonn_log_mu(X), lambda x: _twonn_from_log_mu(x, fraction, method), **kwargs)


def gride_band(nb: Neighbours, n1: int, **kwargs) -> tuple[float, float]:
    """Band of :func:`gride_at` from resampling the pairs' μ at scale n1."""
    return pair_band(gride_mus(nb, n1), lambda m: _gride_single_scale(m, n1, 2 * n1)[0], **kwargs)
