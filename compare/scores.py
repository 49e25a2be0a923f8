"""Per-question results of every evaluated model, read from lmms-eval's sample logs
(`eval/<model>/samples_<task>.jsonl`, written by `python -m eval`) and joined on `doc_id`: what the report's intervals
are computed from.

A metric whose aggregation is a mean (accuracy, exact match, ...) keeps its per-question values; a metric that is
aggregated otherwise (precision, recall, F1, ...) keeps the per-question records lmms-eval logged, for the known
aggregations in `compare.stats.RECORD_AGGREGATES`. Anything else has no per-question form: the report shows its
score without an interval and says why.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from compare.stats import RECORD_AGGREGATES, TaskResults
from midtune.files import read_jsonl

IMAGE_FIELDS = ("image", "image_id", "image_path", "img_id", "image_name")


class PerQuestion:
    """Reads and caches the sample logs of the models under one eval directory."""

    def __init__(self, eval_dir: Path, cluster_by: str = "image"):
        self.eval_dir = Path(eval_dir)
        self.cluster_by = cluster_by
        self._samples: dict[tuple[str, str], dict | None] = {}
        self._results: dict[str, dict] = {}

    def samples(self, model: str, task: str) -> dict | None:
        """doc_id → the logged sample, or None when the model has no sample log for the task."""
        key = (model, task)
        if key not in self._samples:
            path = self.eval_dir / model / f"samples_{task}.jsonl"
            self._samples[key] = ({row["doc_id"]: row for _, row in read_jsonl(path)} if path.is_file() else None)
        return self._samples[key]

    def results(self, model: str) -> dict:
        if model not in self._results:
            path = self.eval_dir / model / "results.json"
            self._results[model] = json.loads(path.read_text()) if path.is_file() else {}
        return self._results[model]

    def aggregation(self, model: str, task: str, metric: str) -> str | None:
        """The task's aggregation of `metric` as lmms-eval recorded it: "mean", a function's name, or None."""
        config = (self.results(model).get("configs") or {}).get(task) or {}
        for entry in config.get("metric_list") or []:
            if entry.get("metric") == metric:
                agg = str(entry.get("aggregation", "mean"))
                found = re.match(r"<function (\w+)", agg)
                return found.group(1) if found else agg
        return None

    def task_results(self, task: str, metric: str, models: list[str], scale: float) -> TaskResults | str:
        """The joined per-question results of `models`, or the reason there are none."""
        logs = {m: self.samples(m, task) for m in models}
        missing = [m for m, s in logs.items() if not s]
        if missing:
            return f"no per-question results (no sample log of {', '.join(missing)})"
        aggregation = self.aggregation(models[0], task, metric)
        aggregate = None
        if aggregation not in (None, "mean"):
            aggregate = RECORD_AGGREGATES.get(aggregation)
            if aggregate is None:
                return f"not a per-question mean (aggregation {aggregation}, unknown to the report): no interval"
        doc_ids = sorted(set.intersection(*(set(s) for s in logs.values())), key=_sort_key)
        if len(doc_ids) < 2:
            return "fewer than 2 questions answered by every model"
        if any(metric not in logs[m][d] for m in models for d in doc_ids[:1]):
            return f"the sample logs hold no per-question {metric!r}"
        values = {}
        for m in models:
            column = [logs[m][d][metric] for d in doc_ids]
            values[m] = column if aggregate is not None else np.asarray(column, dtype=np.float64)
        clusters = [self.cluster(task, logs[models[0]][d], metric) for d in doc_ids]
        return TaskResults(task, metric, doc_ids, clusters, values, aggregate, scale, key=f"{task}/{metric}")

    def cluster(self, task: str, sample: dict, metric: str | None = None):
        """What a question shares with others: its image (default), a field of the document, or nothing. A
        question scored as one of a pair (MMVP's records carry a `pair_index`) is clustered with its pair whatever
        else is asked: the pair is what its metric scores, so the two are resampled together."""
        doc = sample.get("doc") or {}
        record = sample.get(metric) if metric else None
        if isinstance(record, dict) and "pair_index" in record:
            return (task, "pair", record["pair_index"])
        if self.cluster_by == "question":
            return (task, sample["doc_id"])
        if self.cluster_by != "image":
            value = doc.get(self.cluster_by)
            return (task, sample["doc_id"]) if value is None else str(value)
        media = sample.get("input_media")
        if isinstance(media, list) and media and all(isinstance(x, str) for x in media):
            return "|".join(media)
        for name in IMAGE_FIELDS:
            if isinstance(doc.get(name), (str, int)):
                return str(doc[name])
        return (task, sample["doc_id"])

    def clustering(self, task: str, models: list[str]) -> str:
        """How the task's questions were clustered, for the report's method line."""
        logs = self.samples(models[0], task) or {}
        sample = next(iter(logs.values()), {})
        if any(isinstance(v, dict) and "pair_index" in v for v in sample.values()):
            return "by pair"
        key = self.cluster(task, sample) if sample else None
        if isinstance(key, tuple):
            return "each question on its own"
        return "by image" if self.cluster_by == "image" else f"by {self.cluster_by}"


def _sort_key(doc_id):
    return (0, doc_id, "") if isinstance(doc_id, (int, float)) and not isinstance(doc_id, bool) \
        else (1, math.inf, str(doc_id))


def check_against_lmms_eval(t: TaskResults, scores: dict[str, float | None], resampled) -> str | None:
    """The per-question estimate must reproduce lmms-eval's own score (points): a mismatch means the logs are not
    what the score was computed from (another limit, a partial run), and the interval would describe something
    else."""
    for model, expected in scores.items():
        if expected is None or model not in t.values:
            continue
        point, _ = resampled.statistic(model, t.key)
        if point is not None and abs(point - expected) > 1e-6 * max(1.0, abs(expected)) + 1e-9:
            return (f"the sample logs of {model} give {point:.4f}, lmms-eval's results {expected:.4f} (different "
                    f"questions?): no interval")
    return None
