"""Hooks of the midtune_shapes tasks (loaded by lmms-eval from this file's path, as `utils`).

Documents are the rows of the shapes world's `test/<qtype>.jsonl`: `{id, image, question, answer, choices, qtype}`
(+ `category`, `negative_kind` for `exists`). `image` is relative to `data/images/` beside this file.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from PIL import Image

DATA_DIR = Path(__file__).resolve().parent / "data"
IMAGES_DIR = DATA_DIR / "images"

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed and stripped: 'Red.' → 'red'."""
    return _SPACE.sub(" ", _PUNCT.sub("", str(text).lower())).strip()


# -- documents ---------------------------------------------------------------------------------------------


def process_docs(dataset):
    """Refuse empty or broken task data with a message that names it (instead of an obscure failure later)."""
    if len(dataset) == 0:
        raise ValueError(f"midtune_shapes: the task data under {DATA_DIR} is empty; delete the directory and run "
                         f"again (python -m eval regenerates it) or call eval.tasks.ensure_shapes_data()")
    first = IMAGES_DIR / dataset[0]["image"]
    if not first.is_file():
        raise ValueError(f"midtune_shapes: image {first} of the task data is missing; delete {DATA_DIR} and run "
                         f"again, or call eval.tasks.ensure_shapes_data()")
    return dataset


def doc_to_visual(doc):
    with Image.open(IMAGES_DIR / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question, between an optional pre_prompt and post_prompt (both empty by default: the tiny shapes
    models only know the world's own words; real models may want post_prompt: "\\nAnswer with a single word.")."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    return list(doc["choices"])


# -- generation tasks: exact match after normalisation -----------------------------------------------------


def process_results(doc, results):
    pred = normalize(results[0] if results else "")
    return {"accuracy": float(pred == normalize(doc["answer"]))}


def exists_process_results(doc, results):
    """POPE-style yes/no scoring. A prediction that is neither yes nor no counts as wrong, and as not-yes."""
    pred = normalize(results[0] if results else "")
    gold = normalize(doc["answer"])
    record = {"id": doc["id"], "prediction": pred, "answer": gold, "negative_kind": doc.get("negative_kind")}
    return {"accuracy": float(pred == gold), "precision": record, "recall": record, "f1": record,
            "yes_ratio": record}


def _counts(records):
    tp = sum(r["prediction"] == "yes" and r["answer"] == "yes" for r in records)
    fp = sum(r["prediction"] == "yes" and r["answer"] == "no" for r in records)
    fn = sum(r["prediction"] != "yes" and r["answer"] == "yes" for r in records)
    return tp, fp, fn


def aggregate_precision(records):
    tp, fp, _ = _counts(records)
    return tp / (tp + fp) if tp + fp else 0.0


def aggregate_recall(records):
    tp, _, fn = _counts(records)
    return tp / (tp + fn) if tp + fn else 0.0


def aggregate_f1(records):
    p, r = aggregate_precision(records), aggregate_recall(records)
    return 2 * p * r / (p + r) if p + r else 0.0


def aggregate_yes_ratio(records):
    """Share of *predictions* that are "yes" (POPE's definition; 0.5 is balanced on this data)."""
    return sum(r["prediction"] == "yes" for r in records) / len(records) if records else 0.0
