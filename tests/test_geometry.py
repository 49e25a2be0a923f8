"""analysis.geometry: reference values from DADApy, invariances, duplicates and bad input.

The DADApy numbers come from tests/fixtures/geometry (see its README.md for how they were made).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import geometry
from analysis.geometry import (
    GeometryWarning,
    cka,
    gride_at,
    gride_scaling,
    id_correlation,
    knn,
    label_overlap,
    neighborhood_overlap,
    twonn,
    unique_pairs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "geometry"
REF = json.loads((FIXTURES / "reference.json").read_text())
MANIFOLDS = ["plane2_in_10", "gauss5_in_20", "swiss_roll", "sphere3_in_4"]
RTOL = 1e-6  # float64 inputs, exact float64 neighbour distances: we agree with DADApy to ~1e-8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These problems are tiny: with several threads, OpenMP start-up dominates (badly so on a
    # shared, busy machine). Restored afterwards for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inputs.npz", allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN in float64 numpy: direct differences, ties broken by the lower index."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    order = np.stack([np.lexsort((np.arange(len(x)), row))[:k] for row in d])
    return np.take_along_axis(d, order, 1), order


# ----------------------------------------------------------------------------- DADApy reference values


@pytest.mark.parametrize("method", ["base", "ml"])
@pytest.mark.parametrize("name", MANIFOLDS)
def test_twonn_matches_dadapy(data, name, method):
    assert twonn(data[name], method=method) == pytest.approx(REF["twonn"][name][method], rel=RTOL)


@pytest.mark.parametrize("name", MANIFOLDS)
def test_gride_matches_dadapy(data, name):
    ref = REF["gride"][name]
    ids, errors, scales = gride_scaling(data[name], range_max=ref["range_max"])
    # DADApy bisects to 1e-7 absolute in the ID; we solve to ~1e-12, hence agreement to ~1e-8.
    np.testing.assert_allclose(ids, ref["ids"], rtol=RTOL)
    np.testing.assert_allclose(errors, ref["errors"], rtol=RTOL)
    np.testing.assert_allclose(scales, ref["scales"], rtol=RTOL)


@pytest.mark.parametrize("key", sorted(REF["data_overlap"]))
def test_neighborhood_overlap_matches_dadapy(data, key):
    a, b, k = key.split("|")
    k = int(k.removeprefix("k="))
    ref = REF["data_overlap"][key]
    assert neighborhood_overlap(data[a], data[b], k=k) == pytest.approx(ref["mean"], rel=1e-12)
    if "per_point" in ref:
        np.testing.assert_array_equal(neighborhood_overlap(data[a], data[b], k=k, average=False), ref["per_point"])


DEMO_REF = json.loads((FIXTURES / "demo_reference.json").read_text())


@pytest.mark.parametrize("case", sorted(DEMO_REF["cases"]))
def test_authors_settings_match_dadapy_on_the_demo_models_arrays(case):
    """The demo's own representations (SmolLM2's last token, image + question vs its textual twin), under the
    authors' settings: their duplicate handling, overlap at k = 30, GRIDE with range_max = 100 read at n1 = 16,
    against DADApy's return_data_overlap and return_id_scaling_gride (tests/fixtures/geometry/README.md)."""
    ref, settings = DEMO_REF["cases"][case], DEMO_REF["settings"]
    with np.load(FIXTURES / "demo_inputs.npz", allow_pickle=False) as f:
        x, y = (f[f"{side}_{case.removeprefix('layer_')}" if case != "duplicates" else f"dup_{side}"].astype(np.float64)
                for side in ("visual", "textual"))
    keep = unique_pairs(x)
    assert keep.tolist() == ref["kept"] and (case != "duplicates" or len(keep) == len(x) - 3)
    x, y = x[keep], y[keep]
    chi = neighborhood_overlap(x, y, k=settings["k"], average=False)
    # Where a textual twin has an exact duplicate (two pairs with the same captions and question: pairs 6 and 53
    # here), DADApy's neighbour list may drop the duplicate as "itself" and keep the point; midtune's never holds
    # the point itself. Everywhere else the overlaps are equal; there they differ by at most one neighbour.
    d = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1)) + np.diag(np.full(len(y), np.inf))
    twinned = (d == 0).any(1)
    assert twinned.sum() == 2
    np.testing.assert_array_equal(chi[~twinned], np.asarray(ref["overlap_per_pair"])[~twinned])
    assert np.abs(chi[twinned] - np.asarray(ref["overlap_per_pair"])[twinned]).max() <= 1 / settings["k"] + 1e-12
    for side, z in (("visual", x), ("textual", y)):
        ids, errors, scales = gride_scaling(z, range_max=settings["range_max"])
        expected = ref[f"gride_{side}"]
        np.testing.assert_allclose(ids, expected["ids"], rtol=RTOL)
        # At n1 = 1 the twins have r1 = 0: midtune leaves them out of that scale, DADApy keeps them in the error's
        # Fisher information and the scale's mean distance (its outlier filter drops them from the fit, so the IDs
        # agree): the errors and scales differ there, by about 1.5 %.
        first = 1 if side == "textual" else 0
        np.testing.assert_allclose(errors[first:], expected["errors"][first:], rtol=RTOL)
        assert errors[0] == pytest.approx(expected["errors"][0], rel=0.02)
        assert scales[0] == pytest.approx(expected["scales"][0], rel=0.02)
        np.testing.assert_allclose(scales[first:], expected["scales"][first:], rtol=1e-5)  # sums of float16 values
        # the profile's value: one scale, from a neighbour search of 2·n1
        n1 = settings["n1"]
        assert gride_at(knn(z, 2 * n1), n1) == pytest.approx(expected[f"at_n1_{n1}"], rel=RTOL)


@pytest.mark.parametrize("key", sorted(REF["label_overlap"]))
def test_label_overlap_matches_dadapy(data, key):
    k, weighted = key.split("|")
    value = label_overlap(
        data["clusters_x"], data["clusters_labels"], k=int(k.removeprefix("k=")), weighted=weighted == "weighted=True"
    )
    assert value == pytest.approx(REF["label_overlap"][key], rel=1e-12)


def test_label_overlap_weighting_is_per_class_mean(data):
    x, labels = data["clusters_x"], data["clusters_labels"]
    per_point = label_overlap(x, labels, k=10, average=False)
    per_class = [per_point[labels == c].mean() for c in np.unique(labels)]
    assert label_overlap(x, labels, k=10, weighted=True) == pytest.approx(np.mean(per_class), rel=1e-12)
    # Labels of any type: strings give the same answer as the integer codes.
    assert label_overlap(x, np.array([f"c{c}" for c in labels]), k=10) == label_overlap(x, labels, k=10)


@pytest.mark.parametrize(
    "name, true_id, tol",
    [("plane2_in_10", 2, 0.15), ("gauss5_in_20", 5, 0.5), ("swiss_roll", 2, 0.15), ("sphere3_in_4", 3, 0.2)],
)
def test_known_ids_recovered(data, name, true_id, tol):
    nb = knn(data[name], k=64)
    assert twonn(nb) == pytest.approx(true_id, abs=tol)
    assert twonn(nb, method="ml") == pytest.approx(true_id, abs=tol)
    ids, _, _ = gride_scaling(nb)
    assert np.median(ids) == pytest.approx(true_id, abs=tol)


# ----------------------------------------------------------------------------- knn


@pytest.mark.parametrize("chunk_size", [2048, 7, 37, 5000])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_knn_matches_brute_force(chunk_size, dtype):
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(dtype)
    nb = knn(x, k=12, chunk_size=chunk_size)
    ref_d, ref_i = brute_knn(x.astype(np.float64), 12)
    np.testing.assert_array_equal(nb.indices, ref_i)
    # float64 input: distances recomputed from differences. float32 input: the float32 expansion is
    # kept where it loses < 2 digits, i.e. relative error ~1e-6 (see knn's docstring).
    np.testing.assert_allclose(nb.distances, ref_d, rtol=1e-12 if dtype == np.float64 else 1e-5)
    assert nb.distances.dtype == np.float64 and nb.indices.dtype == np.int64 and nb.k == 12


def test_knn_accepts_torch_tensors():
    x = np.random.default_rng(1).standard_normal((100, 5))
    a, b = knn(x, 5), knn(torch.from_numpy(x), 5)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)


@pytest.mark.parametrize("dtype, offset, rtol", [(np.float64, 1e-4, 1e-9), (np.float32, 1e-2, 1e-5)])
def test_knn_refines_distances_lost_to_float32_cancellation(dtype, offset, rtol):
    # Close pairs far from the origin: ||x||² + ||y||² − 2x·y in float32 cannot resolve them, even
    # after centring (float32 input: offsets of 1e-2 so that the pairs stay distinct at |x| = 1e3).
    rng = np.random.default_rng(2)
    base = 1e3 + rng.standard_normal((100, 3))
    x = np.concatenate([base, base + offset * rng.standard_normal((100, 3))]).astype(dtype)
    nb = knn(x, k=3)
    ref_d, ref_i = brute_knn(x.astype(np.float64), 3)
    np.testing.assert_array_equal(nb.indices, ref_i)
    np.testing.assert_allclose(nb.distances, ref_d, rtol=rtol)
    assert (nb.distances[:, 0] > 0).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_knn_duplicates_zero_distance_lowest_index_first(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 3)).astype(dtype)
    # 30 copies of row 0 spread through the data: a tie group far larger than the candidate margin.
    x = np.insert(x, rng.integers(0, 200, 30), x[0], axis=0)
    for chunk_size in [2048, 16]:
        nb = knn(x, k=10, chunk_size=chunk_size)
        ref_d, ref_i = brute_knn(x.astype(np.float64), 10)
        np.testing.assert_array_equal(nb.indices, ref_i)
        np.testing.assert_allclose(nb.distances, ref_d, rtol=1e-12 if dtype == np.float64 else 1e-5)
    copies = np.flatnonzero((x == x[0]).all(1))
    assert (nb.distances[copies] == 0).all()
    assert (nb.indices[copies[-1]] == copies[:10]).all()  # ties go to the lowest indices
    assert not (nb.indices == np.arange(len(x))[:, None]).any()  # never itself


# ----------------------------------------------------------------------------- reuse of neighbours


def test_precomputed_neighbours_give_identical_results_without_recomputing(data, monkeypatch):
    a, b = data["pair_a"], data["pair_b_rotated"]
    x, labels = data["clusters_x"], data["clusters_labels"]
    expected = [
        twonn(a),
        twonn(a, method="ml"),
        gride_scaling(a),
        neighborhood_overlap(a, b, k=30),
        label_overlap(x, labels, k=30),
    ]
    nb_a, nb_b, nb_x = knn(a, 64), knn(b, 64), knn(x, 64)

    def no_search(*args, **kwargs):
        raise AssertionError("knn recomputed although Neighbours were given")

    monkeypatch.setattr(geometry, "_knn", no_search)
    got = [
        twonn(nb_a),
        twonn(nb_a, method="ml"),
        gride_scaling(nb_a),
        neighborhood_overlap(nb_a, nb_b, k=30),
        label_overlap(nb_x, labels, k=30),
    ]
    assert got[:2] == expected[:2] and got[3:] == expected[3:]
    for g, e in zip(got[2], expected[2]):
        np.testing.assert_array_equal(g, e)


def test_neighbours_with_too_few_neighbours_are_rejected(data):
    nb = knn(data["pair_a"], 10)
    with pytest.raises(ValueError, match="precomputed Neighbours has k=10"):
        neighborhood_overlap(nb, nb, k=30)
    with pytest.warns(GeometryWarning, match="k=10 < range_max=64"):
        ids, _, _ = gride_scaling(nb, range_max=64)
    assert len(ids) == 3  # n1 = 1, 2, 4 (n2 <= 10)


# ----------------------------------------------------------------------------- duplicates


def test_duplicates_keep_pairing_and_leave_other_points_alone(data):
    a, b = data["pair_a"], data["pair_b_rotated"]
    k, sources, positions = 10, np.array([3, 50, 700]), np.array([10, 500, 1000])
    a_dup, b_dup = np.insert(a, positions, a[sources], axis=0), np.insert(b, positions, b[sources], axis=0)
    new_index = np.delete(np.arange(len(a_dup)), positions + np.arange(len(positions)))  # original row -> new row
    np.testing.assert_array_equal(a_dup[new_index], a)

    before, after = knn(a, k), knn(a_dup, k)
    before_b, after_b = knn(b, k), knn(b_dup, k)
    overlap_before = neighborhood_overlap(before, before_b, k=k, average=False)
    overlap_after = neighborhood_overlap(after, after_b, k=k, average=False)
    assert np.isfinite(overlap_after).all()

    # Points that had no duplicated point among their neighbours see exactly the same neighbours
    # (renumbered) and therefore keep their overlap; the data were not reordered.
    untouched = ~np.isin(before.indices, sources).any(1) & ~np.isin(before_b.indices, sources).any(1)
    untouched[sources] = False
    assert untouched.mean() > 0.9
    np.testing.assert_array_equal(after.indices[new_index[untouched]], new_index[before.indices[untouched]])
    np.testing.assert_array_equal(overlap_after[new_index[untouched]], overlap_before[untouched])
    # A duplicated point and its copy are each other's nearest neighbour in both spaces.
    for source, pos in zip(sources, positions + np.arange(len(positions))):
        assert after.indices[pos, 0] == new_index[source] and after.distances[pos, 0] == 0


def test_twonn_drops_points_with_zero_r1(data):
    a = data["pair_a"][:300]
    a_dup = np.concatenate([a, a[:40]])
    d, _ = brute_knn(a_dup, 2)
    keep = d[:, 0] > 0
    assert keep.sum() == 300 - 40
    # Independent TwoNN "base" on the surviving points.
    log_mu = np.sort(np.log(d[keep, 1] / d[keep, 0]))
    n = len(log_mu)
    x, y = log_mu[: int(0.9 * n)], -np.log(1 - np.arange(1, int(0.9 * n) + 1) / n)
    assert twonn(a_dup) == pytest.approx(x @ y / (x @ x), rel=1e-12)
    ids, _, _ = gride_scaling(a_dup)
    assert np.isfinite(ids).all()


def test_twonn_all_duplicates_is_nan_with_warning(data):
    a = data["pair_a"][:100]
    with pytest.warns(GeometryWarning, match="duplicates"):
        assert math.isnan(twonn(np.concatenate([a, a])))


# ----------------------------------------------------------------------------- CKA


def platonic_cka(a: np.ndarray, b: np.ndarray, unbiased: bool) -> float:
    """minyoungg/platonic-rep's cka(kernel_metric="ip"), written out on N×N Gram matrices."""
    k_mat, l_mat = a @ a.T, b @ b.T
    n = len(a)

    def hsic(k, m):
        if not unbiased:
            h = np.eye(n) - 1 / n
            return np.trace(k @ h @ m @ h)
        k, m = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
        return ((k * m.T).sum() + k.sum() * m.sum() / ((n - 1) * (n - 2)) - 2 * (k @ m).sum() / (n - 2)) / (n * (n - 3))

    return hsic(k_mat, l_mat) / np.sqrt(hsic(k_mat, k_mat) * hsic(l_mat, l_mat))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n, dims", [(120, (5, 7)), (40, (90, 60))])  # both feature- and Gram-space paths
def test_cka_matches_platonic_rep_formula(unbiased, n, dims):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((n, dims[0])) + 3.0
    b = np.tanh(a @ rng.standard_normal((dims[0], dims[1]))) + 0.5 * rng.standard_normal((n, dims[1]))
    assert cka(a, b, unbiased=unbiased) == pytest.approx(platonic_cka(a, b, unbiased), rel=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariances(unbiased):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    assert cka(a, a @ q, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert cka(a, 3.7 * a, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert cka(a, torch.from_numpy(a @ q * 0.1), unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    independent = cka(rng.standard_normal((2000, 5)), rng.standard_normal((2000, 5)), unbiased=unbiased)
    assert abs(independent) < (0.02 if unbiased else 0.05)


# ----------------------------------------------------------------------------- IdCorr


def test_id_correlation_paired_vs_independent():
    rng = np.random.default_rng(6)
    latent = rng.standard_normal((400, 3))
    a = latent @ rng.standard_normal((3, 10))
    b = np.tanh(latent @ rng.standard_normal((3, 12)))  # a nonlinear function of the same latent
    corr, p = id_correlation(a, b, n_shuffles=30, seed=1)
    assert corr > 0.6 and p == pytest.approx(1 / 31)
    assert id_correlation(a, b, n_shuffles=30, seed=1) == (corr, p)  # seeded

    unrelated = rng.standard_normal((400, 3)) @ rng.standard_normal((3, 12))
    corr, p = id_correlation(a, unrelated, n_shuffles=30, seed=1)
    assert abs(corr) < 0.25 and p > 0.05


# ----------------------------------------------------------------------------- bad input


def _x(n=50, d=4, seed=7):
    return np.random.default_rng(seed).standard_normal((n, d))


def _with(value):
    x = _x()
    x[3, 1] = value
    return x


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: knn(_x(n=11), k=10), "X: 11 samples, but at least 12"),
        (lambda: twonn(_x(n=3)), "at least 4"),
        (lambda: gride_scaling(_x(n=3)), "at least 4"),
        (lambda: twonn(_with(np.nan)), "NaN or infinite"),
        (lambda: twonn(_with(np.inf)), "NaN or infinite"),
        (lambda: neighborhood_overlap(_x(), _with(-np.inf)), "B: contains NaN or infinite"),
        (lambda: cka(_x(), _with(np.nan)), "B: contains NaN"),
        (lambda: twonn(np.ones((50, 4))), "constant"),
        (lambda: cka(np.ones((50, 4)), _x()), "A: is constant"),
        (lambda: neighborhood_overlap(_x(n=50), _x(n=60), k=5), "mismatched lengths"),
        (lambda: cka(_x(n=50), _x(n=60)), "mismatched lengths"),
        (lambda: id_correlation(_x(n=50), _x(n=60)), "mismatched lengths"),
        (lambda: label_overlap(_x(n=50), np.zeros(49), k=5), "mismatched lengths"),
        (lambda: knn(np.arange(10.0), k=2), "2-D"),
        (lambda: knn(_x(), k=0), "positive integer"),
        (lambda: twonn(_x(), method="mle"), "method"),
        (lambda: twonn(_x(), fraction=0), "fraction"),
        (lambda: cka(_x(n=3), _x(n=3), unbiased=True), "at least 4"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_undefined_metrics_warn_instead_of_crashing():
    # Three distinct points, each repeated: every point has a copy, so r1 == 0 everywhere.
    x = np.repeat(_x(n=3), 4, axis=0)
    with pytest.warns(GeometryWarning, match="unique rows"):
        assert math.isnan(twonn(x))
    with pytest.warns(GeometryWarning):
        ids, errors, _ = gride_scaling(x, range_max=4)
    assert np.isnan(ids).all() and np.isnan(errors).all()


def test_unique_pairs_keeps_the_first_of_equal_rows_with_its_partner_as_the_authors_do():
    from analysis.geometry import unique_pairs

    rng = np.random.default_rng(0)
    A = rng.normal(size=(8, 3))
    A[5] = A[1]  # two duplicates of row 1 (say, the same image twice) and one of row 2
    A[7] = A[1]
    A[6] = A[2]
    B = rng.normal(size=(8, 4))  # their partners differ (different questions about the same image)
    B[3] = B[0]  # duplicates in the second array stay
    keep = unique_pairs(A)
    assert keep.tolist() == [0, 1, 2, 3, 4]
    assert np.unique(A[keep], axis=0).shape[0] == len(keep)
    np.testing.assert_array_equal(B[keep], B[:5])
    assert unique_pairs(torch.tensor(A, dtype=torch.float16)).tolist() == [0, 1, 2, 3, 4]
    assert unique_pairs(np.ones((4, 2))).tolist() == [0]  # all equal: one row left (the metrics then say why)


def test_pair_bands_hold_the_estimate_narrow_with_more_pairs_and_repeat_with_their_seed():
    from analysis.geometry import gride_at, gride_band, overlap_band, pair_band, twonn_band

    def gauss(n, seed):  # a 5-D Gaussian in 20-D
        rng = np.random.default_rng(seed)
        return rng.normal(size=(n, 5)) @ np.linalg.qr(rng.normal(size=(20, 20)))[0][:5]

    widths = {}
    for n in (100, 800):
        x = gauss(n, 1)
        nb = knn(x, 32)
        lo, hi = twonn_band(nb)
        assert lo < twonn(nb) < hi and lo < 5 < hi + 0.6, (n, lo, hi)
        glo, ghi = gride_band(nb, 8)
        assert glo < gride_at(nb, 8) < ghi
        noisy = x + np.random.default_rng(1).normal(scale=0.5, size=x.shape)
        chi = neighborhood_overlap(nb, knn(noisy, 32), k=10, average=False)
        olo, ohi = overlap_band(chi)
        assert olo < chi.mean() < ohi
        widths[n] = (hi - lo, ghi - glo, ohi - olo)
    for small, big in zip(widths[100], widths[800]):
        assert small > 1.8 * big  # ~ sqrt(8) = 2.8 narrower for 8x the pairs
    chi = np.random.default_rng(0).random(50)
    assert overlap_band(chi, seed=3) == overlap_band(chi, seed=3) != overlap_band(chi, seed=4)
    assert overlap_band(chi, n_resamples=0) != overlap_band(chi, n_resamples=0)  # (nan, nan): no band
    assert all(math.isnan(v) for v in pair_band(chi, lambda t: float("nan")))  # undefined resamples: no band
