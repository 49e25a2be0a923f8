"""The report's statistics: intervals for scores and differences that cover question sampling and seed-to-seed
variation, verdicts judged against a margin fixed in advance, and how many more questions or seeds would decide.

The design (docs/compare.md, "How the verdicts are reached"):

* **Questions.** Every score is an aggregate of per-question results (lmms-eval's sample logs). Its sampling
  variance comes from a cluster bootstrap: questions that share a cluster (an image) are drawn together, and a
  cluster shared by several tasks is drawn for all of them at once, so the mean over tasks sees the correlation
  too. Every model is resampled with the *same* draws: a difference is paired on the questions. Metrics that are
  not a per-question mean (F1, precision, ...) are re-aggregated inside every draw.
* **Seeds.** With k > 1 trainings of a configuration, the between-seed variance of the per-seed estimates (the
  per-seed *differences* where run and reference share their seeds: same seed, same data order) adds to the
  questions' variance. The interval is then Welch–Satterthwaite's: estimate ± t(df) · SE, df from the two
  variance components, so three seeds with a large seed effect give a wide interval, not a falsely narrow one.
  With one seed the interval covers question sampling only, and the report says so.
* **Verdicts** compare the difference's interval [lo, hi] with a margin m fixed in the experiment file:
  better (lo > 0), keeps (−m ≤ lo ≤ 0), loses (hi < −m), worse (lo < −m ≤ hi < 0), inconclusive (lo < −m, hi ≥ 0).

Everything here is numpy and scipy; nothing reads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

LEVEL = 0.95
POWER = 0.80  # the sample-size hints: the size at which the interval would decide with this probability
N_BOOT = 2000
VERDICTS = ("better", "keeps", "worse", "loses", "inconclusive")
COST_VERDICTS = ("cheaper", "same", "costlier", "inconclusive")

# (per-question records, weights) → the metric. The weights are one per question, or a matrix with one row per
# resample: the metric is then one value per row (every resample in one matrix product, not a Python loop per draw).
Aggregate = Callable[[list, np.ndarray], "float | np.ndarray"]


@dataclass
class TaskResults:
    """One task's per-question results for every model, on the questions all of them answered (joined on doc_id).
    `values[model]` is a float array (a per-question mean metric) or a list of records that `aggregate` turns into
    the metric, given one weight per question."""

    task: str
    metric: str
    doc_ids: list
    clusters: list
    values: dict[str, object]
    aggregate: Aggregate | None = None
    scale: float = 100.0  # points: metrics in [0, 1] are reported × 100
    key: str = ""  # how the Resampler names it (default: the task; the report uses "task/metric")

    def __post_init__(self):
        self.key = self.key or self.task

    @property
    def n(self) -> int:
        return len(self.doc_ids)


@dataclass
class Estimate:
    """An estimate with its interval and what went into it; `var_questions`/`var_seeds` drive the size hints."""

    estimate: float
    ci: tuple[float, float]
    n_questions: int
    n_seeds: int
    method: str
    se: float
    var_questions: float
    var_seeds: float | None  # None: one seed, seed variation not measured
    df: float
    n_clusters: int = 0

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "ci": list(self.ci), "se": self.se, "n_questions": self.n_questions,
                "n_seeds": self.n_seeds, "n_clusters": self.n_clusters, "df": self.df, "method": self.method,
                "seed_variation": "measured" if self.var_seeds is not None else "not measured (one seed)"}


# ---------------------------------------------------------------------------------------------------------
# The cluster bootstrap, shared by every model and task of one report
# ---------------------------------------------------------------------------------------------------------


class Resampler:
    """Draws the same cluster resamples for every model: `weights[task]` is [n_boot, n_questions], how often each
    question is drawn. Tasks that share clusters (the same images) are drawn together; the others each on their
    own (a stratified bootstrap), so a task's question count stays what it is."""

    def __init__(self, tasks: Sequence[TaskResults], n_boot: int = N_BOOT, seed: int = 0):
        self.n_boot = n_boot
        self.tasks = {t.key: t for t in tasks}
        rng = np.random.default_rng(seed)
        self.weights: dict[str, np.ndarray] = {}
        self.n_clusters: dict[str, int] = {}
        for group in _strata(tasks):
            ids = sorted({c for t in group for c in t.clusters}, key=str)
            index = {c: i for i, c in enumerate(ids)}
            counts = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot).astype(np.float64)
            for t in group:
                self.weights[t.key] = counts[:, [index[c] for c in t.clusters]]
                self.n_clusters[t.key] = len(set(t.clusters))
        self._cache: dict[tuple[str, str], tuple[float, np.ndarray]] = {}

    def statistic(self, model: str, task: str) -> tuple[float, np.ndarray]:
        """A model's metric on a task: (on all questions, on each resample)."""
        key = (model, task)
        if key not in self._cache:
            t = self.tasks[task]
            w = self.weights[task]
            values = t.values[model]
            if t.aggregate is None:
                x = np.asarray(values, dtype=np.float64)
                point = float(x.mean())
                with np.errstate(invalid="ignore", divide="ignore"):
                    boot = (w @ x) / w.sum(axis=1)
            else:
                point = float(t.aggregate(values, np.ones(len(values))))
                boot = np.asarray(t.aggregate(values, w), dtype=np.float64)
            self._cache[key] = (t.scale * point, t.scale * boot)
        return self._cache[key]

    def mean_over(self, model: str, tasks: Sequence[str]) -> tuple[float, np.ndarray]:
        """The unweighted mean over tasks (each task counts once, as lmms-eval's group scores do)."""
        parts = [self.statistic(model, t) for t in tasks]
        return float(np.mean([p for p, _ in parts])), np.mean([b for _, b in parts], axis=0)

    def scale(self, tasks: Sequence[str]) -> float:
        return max(self.tasks[t].scale for t in tasks)

    def questions(self, tasks: Sequence[str]) -> int:
        return sum(self.tasks[t].n for t in tasks)

    def clusters(self, tasks: Sequence[str]) -> int:
        return sum(self.n_clusters[t] for t in tasks)


def _strata(tasks: Sequence[TaskResults]) -> list[list[TaskResults]]:
    """Groups of tasks linked by a shared cluster id (union-find over tasks)."""
    parent = list(range(len(tasks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict = {}
    for i, t in enumerate(tasks):
        for c in set(t.clusters):
            if c in owner:
                parent[root(i)] = root(owner[c])
            else:
                owner[c] = i
    groups: dict[int, list[TaskResults]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(root(i), []).append(t)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------
# Scores and paired differences
# ---------------------------------------------------------------------------------------------------------


def _interval(point: float, var_q: float, q_df: int, seed_parts: list[tuple[float, int]]) -> tuple:
    """estimate ± t(df)·SE with SE² = the questions' variance + the seeds' (Welch–Satterthwaite df)."""
    var_s = sum(v for v, _ in seed_parts) if seed_parts else None
    total = var_q + (var_s or 0.0)
    parts = [(var_q, max(q_df, 1)), *seed_parts]
    denominator = sum(v * v / d for v, d in parts if d > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    se = math.sqrt(total)
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se if se > 0 else 0.0
    return (point - half, point + half), se, var_s, df


def _question_variance(boot: np.ndarray, rs: Resampler, tasks: Sequence[str]) -> float:
    """The resamples' variance, but never below the rule of three's: a bootstrap of n identical answers (every
    question right, or two models that agree on all of them) has no spread at all, yet n questions bound a rate
    only to about 3/n (95 %). Without the floor, 6 questions of two models that agree would "keep" the score."""
    floor = (rs.scale(tasks) * 3 / (stats.norm.ppf(0.5 + LEVEL / 2) * max(1, rs.clusters(tasks)))) ** 2
    return max(float(np.nanvar(boot, ddof=1)), floor)


def _seed_variance(points: Sequence[float]) -> list[tuple[float, int]]:
    """The variance of a mean over k seeds (one component, k − 1 degrees of freedom); none for one seed."""
    k = len(points)
    return [(float(np.var(points, ddof=1)) / k, k - 1)] if k > 1 else []


def score(rs: Resampler, models: Sequence[str], tasks: Sequence[str]) -> Estimate:
    """A configuration's score (mean over its seeds' models) on one task or the mean over several."""
    per_seed = [rs.mean_over(m, tasks) for m in models]
    point = float(np.mean([p for p, _ in per_seed]))
    boot = np.mean([b for _, b in per_seed], axis=0)
    var_q = _question_variance(boot, rs, tasks)
    n_clusters = rs.clusters(tasks)
    ci, se, var_s, df = _interval(point, var_q, n_clusters - 1, _seed_variance([p for p, _ in per_seed]))
    if all(rs.tasks[t].aggregate is not None or rs.tasks[t].scale == 100.0 for t in tasks):
        ci = (max(0.0, ci[0]), min(rs.scale(tasks), ci[1]))  # a score in points lies in [0, 100]
    return Estimate(point, ci, rs.questions(tasks), len(models), _method(len(models), paired=False), se, var_q,
                    var_s, df, n_clusters)


def difference(rs: Resampler, models: dict[str, str], reference: dict[str, str], tasks: Sequence[str]) -> Estimate:
    """models − reference, paired on the questions (the same resamples) and, where both trained with the same
    seeds, on the seeds: `models`/`reference` map seed → model name."""
    paired = len(models) > 1 and set(models) == set(reference)
    if paired:
        seeds = sorted(models, key=str)
        per_seed = [(rs.mean_over(models[s], tasks), rs.mean_over(reference[s], tasks)) for s in seeds]
        diffs = [a[0] - b[0] for a, b in per_seed]
        point = float(np.mean(diffs))
        boot = np.mean([a[1] - b[1] for a, b in per_seed], axis=0)
        seed_parts = _seed_variance(diffs)
    else:
        mine = [rs.mean_over(m, tasks) for m in models.values()]
        theirs = [rs.mean_over(m, tasks) for m in reference.values()]
        point = float(np.mean([p for p, _ in mine]) - np.mean([p for p, _ in theirs]))
        boot = np.mean([b for _, b in mine], axis=0) - np.mean([b for _, b in theirs], axis=0)
        seed_parts = _seed_variance([p for p, _ in mine]) + _seed_variance([p for p, _ in theirs])
    var_q = _question_variance(boot, rs, tasks)
    n_clusters = rs.clusters(tasks)
    ci, se, var_s, df = _interval(point, var_q, n_clusters - 1, seed_parts)
    k = min(len(models), len(reference)) if paired else max(len(models), len(reference))
    return Estimate(point, ci, rs.questions(tasks), k, _method(k, paired=True, seeds_paired=paired), se, var_q,
                    var_s, df, n_clusters)


def _method(k: int, paired: bool, seeds_paired: bool = False) -> str:
    what = "paired difference on the same questions" if paired else "score"
    questions = "cluster bootstrap over questions (an image's questions drawn together)"
    if k == 1:
        return f"{what}; {questions}; one seed: seed variation not measured; t interval"
    seeds = (f"between-seed variance of the {k} per-seed differences (same seed, same data order)" if seeds_paired
             else f"between-seed variance over {k} seeds")
    return f"{what}; {questions} + {seeds}; Welch–Satterthwaite t interval"


# ---------------------------------------------------------------------------------------------------------
# Verdicts and how much more data would decide them
# ---------------------------------------------------------------------------------------------------------


def verdict(ci: tuple[float, float], margin: float) -> str:
    """The difference's interval against the margin (points): exactly one of VERDICTS."""
    lo, hi = ci
    if lo > 0:
        return "better"
    if lo >= -margin:
        return "keeps"
    if hi < -margin:
        return "loses"
    if hi < 0:
        return "worse"
    return "inconclusive"


def _needed_se(distance: float) -> float:
    """The SE at which an interval centred `distance` from a boundary excludes it with probability POWER."""
    return distance / (stats.norm.ppf(0.5 + LEVEL / 2) + stats.norm.ppf(POWER))


def size_hint(e: Estimate, margin: float) -> dict | None:
    """For `worse` and `inconclusive`: about how many questions (per task, × the current count) or seeds would
    decide, at the observed variances (the paired power calculation of Miller 2024 and lmms-eval's
    power_analysis, on the variance components measured here)."""
    v = verdict(e.ci, margin)
    if v not in ("worse", "inconclusive"):
        return None
    d = e.estimate
    # inconclusive: exclude -m from below (→ keeps/better) or 0 from above (→ worse/loses), whichever is nearer;
    # worse: tell "more than m below" from "at most m below": the distance to -m.
    distance = max(d + margin, -d) if v == "inconclusive" else abs(d + margin)
    hint: dict = {"verdict": v, "power": POWER}
    if distance <= 0:
        hint["text"] = "the estimate sits on the boundary: no sample size decides it"
        return hint
    target = _needed_se(distance) ** 2
    var_s = e.var_seeds or 0.0
    if e.var_questions > 0 and target > var_s:
        hint["questions_factor"] = e.var_questions / (target - var_s)
    if e.var_seeds is not None and e.var_seeds > 0 and target > e.var_questions:
        hint["seeds"] = math.ceil(e.n_seeds * e.var_seeds / (target - e.var_questions))
    hint["text"] = _hint_text(hint, e)
    return hint


def _hint_text(hint: dict, e: Estimate) -> str:
    parts = []
    if "questions_factor" in hint:
        factor = hint["questions_factor"]
        parts.append(f"about {factor:.1f}× the questions ({math.ceil(factor * e.n_questions)} instead of "
                     f"{e.n_questions})" + (" at the same seeds" if e.var_seeds is not None else ""))
    elif e.var_questions > 0:
        parts.append("more questions alone would not decide it (the seeds' variance is too large)")
    if "seeds" in hint:
        parts.append(f"about {hint['seeds']} seeds (now {e.n_seeds}) at the same questions")
    elif e.var_seeds is not None and e.var_seeds > 0:
        parts.append("more seeds alone would not decide it (the questions' variance is too large)")
    text = " or ".join(parts) or "no variance measured"
    if e.var_seeds is None:
        text += "; seed variation not measured (one seed), so this is a lower bound"
    return f"to decide with {POWER:.0%} probability: {text}"


# ---------------------------------------------------------------------------------------------------------
# Cost: the ratio of step times from an interleaved probe
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Ratio:
    estimate: float
    ci: tuple[float, float]
    n_pairs: int
    method: str
    se_log: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "ci": list(self.ci), "n_pairs": self.n_pairs, "method": self.method,
                **self.extra}


def step_ratio(run_times: Sequence[float], reference_times: Sequence[float]) -> Ratio:
    """run / reference from step times taken alternately (step i of each, adjacent in time): the geometric mean
    of the per-pair ratios with a t interval on their logarithms. Adjacent steps share the machine's state, so
    its drift cancels in each pair."""
    a, b = np.log(np.asarray(run_times, float)), np.log(np.asarray(reference_times, float))
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError(f"a step-time ratio needs at least 2 pairs of timed steps, got {n}")
    logs = a[:n] - b[:n]
    mean, se = float(logs.mean()), float(logs.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * se
    return Ratio(math.exp(mean), (math.exp(mean - half), math.exp(mean + half)), n,
                 f"geometric mean of {n} alternated step pairs; t interval on the log ratios", se)


def cost_verdict(ci: tuple[float, float], margin: float) -> str:
    """cheaper (hi < 1), costlier (lo > 1), same (1 inside and the interval within [1 − m, 1 + m]), else
    inconclusive."""
    lo, hi = ci
    if hi < 1:
        return "cheaper"
    if lo > 1:
        return "costlier"
    if lo >= 1 - margin and hi <= 1 + margin:
        return "same"
    return "inconclusive"


def pairs_hint(r: Ratio, margin: float) -> str | None:
    """For an inconclusive cost verdict: about how many step pairs would decide it."""
    if cost_verdict(r.ci, margin) != "inconclusive" or r.se_log <= 0:
        return None
    log_estimate = math.log(r.estimate)
    # the nearer decision: exclude 1 (cheaper/costlier), or fit inside [1-m, 1+m] (same)
    distance = max(abs(log_estimate), min(math.log(1 + margin) - log_estimate, log_estimate - math.log(1 - margin)))
    if distance <= 0:
        return "the estimate sits on the boundary: no number of steps decides it"
    n = math.ceil(r.n_pairs * (r.se_log / _needed_se(distance)) ** 2)
    return f"to decide with {POWER:.0%} probability: about {n} alternated step pairs (now {r.n_pairs})"


# ---------------------------------------------------------------------------------------------------------
# Metrics that are not a per-question mean, re-aggregated inside every resample
# ---------------------------------------------------------------------------------------------------------


def _yes_no(records: list, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted true positives, false positives, false negatives of "yes", and the weighted count of yes
    predictions, from records holding a prediction and the answer (midtune's `answer`, POPE's `ground_truth`).
    `weights` is one weight per question, or one row of them per resample: each count is then one per row."""
    pred = np.array([str(r.get("prediction", "")).strip().lower() == "yes" for r in records], dtype=np.float64)
    gold = np.array([str(r.get("answer", r.get("ground_truth", ""))).strip().lower() == "yes" for r in records],
                    dtype=np.float64)
    w = np.asarray(weights, float)
    return w @ (pred * gold), w @ (pred * (1 - gold)), w @ ((1 - pred) * gold), w @ pred


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> float | np.ndarray:
    """num / den where den > 0, else `empty`; a float for one set of weights, an array for a row per resample."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)
    return float(out) if out.ndim == 0 else out


def weighted_precision(records: list, weights: np.ndarray) -> float | np.ndarray:
    tp, fp, _, _ = _yes_no(records, weights)
    return _ratio(tp, tp + fp)


def weighted_recall(records: list, weights: np.ndarray) -> float | np.ndarray:
    tp, _, fn, _ = _yes_no(records, weights)
    return _ratio(tp, tp + fn)


def weighted_f1(records: list, weights: np.ndarray) -> float | np.ndarray:
    tp, fp, fn, _ = _yes_no(records, weights)
    return _ratio(2 * tp, 2 * tp + fp + fn)  # 2PR / (P + R), from one pass over the records


def weighted_yes_ratio(records: list, weights: np.ndarray) -> float | np.ndarray:
    return _ratio(_yes_no(records, weights)[3], np.asarray(weights, float).sum(axis=-1))


def weighted_score_mean(records: list, weights: np.ndarray) -> float | np.ndarray:
    """POPE's accuracy: records carrying a per-question `score`."""
    x = np.array([float(r["score"]) for r in records])
    w = np.asarray(weights, float)
    return _ratio(w @ x, w.sum(axis=-1), empty=math.nan)


def weighted_correct_mean(records: list, weights: np.ndarray) -> float | np.ndarray:
    """MMVP's accuracy: records carrying `is_correct`."""
    x = np.array([float(bool(r["is_correct"])) for r in records])
    w = np.asarray(weights, float)
    return _ratio(w @ x, w.sum(axis=-1), empty=math.nan)


def weighted_pair_accuracy(records: list, weights: np.ndarray) -> float | np.ndarray:
    """MMVP's pair accuracy: a pair (the records sharing a `pair_index`) counts as right only when both of its
    questions are, and only a whole pair counts (as lmms-eval's mmvp_aggregate_pair_results; --limit can cut one).
    A pair weighs the mean of its questions' weights: the report clusters a pair's two questions together, so they
    are resampled as one and carry the same weight."""
    members: dict = {}
    for k, r in enumerate(records):
        members.setdefault(r["pair_index"], []).append(k)
    whole = [ks for ks in members.values() if len(ks) == 2]
    w = np.asarray(weights, float)
    if not whole:
        return math.nan if w.ndim == 1 else np.full(w.shape[0], math.nan)
    both = np.array([all(bool(records[k]["is_correct"]) for k in ks) for ks in whole], dtype=np.float64)
    pair_weights = w[..., np.array(whole)].mean(axis=-1)
    return _ratio(pair_weights @ both, pair_weights.sum(axis=-1), empty=math.nan)


# A task's aggregation function (by the name lmms-eval's results record for it) → its weighted re-aggregation.
# midtune's shapes tasks (eval/tasks/midtune_shapes/utils.py) and lmms-eval's POPE use these names.
RECORD_AGGREGATES: dict[str, Aggregate] = {
    "aggregate_precision": weighted_precision, "pope_aggregate_precision": weighted_precision,
    "aggregate_recall": weighted_recall, "pope_aggregate_recall": weighted_recall,
    "aggregate_f1": weighted_f1, "pope_aggregate_f1_score": weighted_f1,
    "aggregate_yes_ratio": weighted_yes_ratio, "pope_aggregate_yes_ratio": weighted_yes_ratio,
    "pope_aggregate_accuracy": weighted_score_mean,
    "mmvp_aggregate_results": weighted_correct_mean, "mmvp_aggregate_pair_results": weighted_pair_accuracy,
}
