"""Evaluation on every device: batch 1 and batch N give the same answers on the shapes tasks, and a data-parallel
`python -m eval` (2 CPU processes over gloo) gives the same per-document answers and scores as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "datasets_cache")  # both in conftest


# ---------------------------------------------------------------------------------------------------------
# How many processes python -m eval starts
# ---------------------------------------------------------------------------------------------------------


def test_the_process_count_follows_the_visible_gpus(monkeypatch):
    from eval import parallel
    from eval.parallel import LaunchError, processes_to_start

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(parallel, "visible_gpu_count", lambda: 4)
    assert processes_to_start("auto", "auto") == (4, False)  # every visible GPU
    assert processes_to_start("auto", "cuda") == (4, False)
    assert processes_to_start("auto", "cuda:1") == (1, False)  # one named GPU: one process
    assert processes_to_start("auto", "cpu") == (1, False)
    assert processes_to_start("2", "auto") == (2, False)
    assert processes_to_start("3", "cpu") == (3, True)  # CPU processes, over gloo
    with pytest.raises(LaunchError, match="4 GPU"):
        processes_to_start("8", "auto")
    with pytest.raises(LaunchError, match="cuda:1"):
        processes_to_start("2", "cuda:1")

    monkeypatch.setattr(parallel, "visible_gpu_count", lambda: 0)
    assert processes_to_start("auto", "auto") == (1, False)
    assert processes_to_start("2", "auto") == (2, True)  # no GPU: on the CPU

    monkeypatch.setenv("WORLD_SIZE", "2")  # under a launcher, which has started the processes
    assert processes_to_start("auto", "auto") == (1, False)
    assert processes_to_start("2", "cpu") == (1, False)
    with pytest.raises(LaunchError, match="launcher started 2"):
        processes_to_start("4", "cpu")


# ---------------------------------------------------------------------------------------------------------
# Batch 1 and batch N
# ---------------------------------------------------------------------------------------------------------


def shapes_requests(lm, names: list[str], limit: int) -> dict[str, list]:
    """The requests lmms-eval builds for `names` (groups allowed), by request type, as one list per type the way
    lmms-eval hands them to the model: every task's requests together."""
    from lmms_eval.evaluator_utils import get_task_list
    from lmms_eval.tasks import TaskManager, get_task_dict

    from eval.tasks import TASKS_DIR

    manager = TaskManager("ERROR", include_path=str(TASKS_DIR), include_defaults=False)
    by_type: dict[str, list] = {}
    for output in get_task_list(get_task_dict(names, manager)):
        task = output.task
        lm.task_dict[output.task_name] = task.dataset
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for instance in task.instances:
            by_type.setdefault(instance.request_type, []).append(instance)
    return by_type


def test_batch_1_and_batch_8_give_the_same_answers_on_the_shapes_tasks(tiny_dir, shapes_data):
    """Every shapes task, generation and multiple choice, float32: batches of 8 (midtune's old default; left-padded
    for generation, right-padded for the NLL) give exactly the answers of batch 1. Batches mix the tasks' prompts
    of different lengths, so padding is really there (measured on more documents and in bfloat16:
    docs/evaluation.md)."""
    from eval.lmms_plugin import Midtune

    lm = Midtune(pretrained=str(tiny_dir("llava")), device="cpu", dtype="float32", batch_size=1)
    requests = shapes_requests(lm, ["midtune_shapes", "midtune_shapes_mc"], limit=4)
    assert len(requests["generate_until"]) == 5 * 4 and len(requests["loglikelihood"]) > 5 * 4

    padded = {"left": 0, "right": 0}
    encode = lm._encode

    def counting_encode(texts, images, padding_side):
        batch = encode(texts, images, padding_side)
        padded[padding_side] += int((batch["attention_mask"] == 0).any())
        return batch

    lm._encode = counting_encode
    answers = {}
    for size in (1, 8):
        lm.batch_size_per_gpu = size
        answers[size] = (lm.generate_until(requests["generate_until"]), lm.loglikelihood(requests["loglikelihood"]))
    assert padded["left"] > 0 and padded["right"] > 0, padded  # batch 8 padded some batches (batch 1 never does)

    texts_1, scored_1 = answers[1]
    texts_8, scored_8 = answers[8]
    assert texts_8 == texts_1
    assert [r.nll for r in scored_8] == pytest.approx([r.nll for r in scored_1], abs=1e-5)
    assert [r.is_greedy for r in scored_8] == [r.is_greedy for r in scored_1]
    # the multiple-choice answer: the choice with the lowest NLL of each document's requests
    docs = [(r.task_name, r.doc_id) for r in requests["loglikelihood"]]

    def chosen(scored):
        best: dict = {}
        for doc, request, result in zip(docs, requests["loglikelihood"], scored):
            if doc not in best or result.nll < best[doc][0]:
                best[doc] = (result.nll, request.idx)
        return {doc: idx for doc, (_, idx) in best.items()}

    assert chosen(scored_8) == chosen(scored_1)


# ---------------------------------------------------------------------------------------------------------
# Data parallel: 2 processes on the CPU against 1
# ---------------------------------------------------------------------------------------------------------


def run_eval(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def per_document(out: Path, task: str) -> dict:
    rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
    return {"doc_ids": [row["doc_id"] for row in rows],  # written in document order, whoever answered
            "answers": {row["doc_id"]: row["filtered_resps"] for row in rows}}


@pytest.mark.two_ranks
@pytest.mark.slow
def test_two_processes_give_the_answers_and_scores_of_one(tiny_dir, shapes_data, tmp_path):
    """`python -m eval --num-processes 2 --device cpu`: two processes over gloo, lmms-eval splitting the documents
    (5 of them: the ranks get 3 and 2, so the shorter rank runs a padding request) and gathering them on rank 0,
    which alone writes the files and prints the table. Answers, scores and stderrs equal one process's."""
    tasks = ["midtune_shapes_count", "midtune_shapes_mc_color"]
    common = ["--model", f"m={tiny_dir('llava')}", "--tasks", ",".join(tasks), "--limit", "5", "--device", "cpu",
              "--dtype", "float32"]
    one = run_eval(*common, "--output_dir", str(tmp_path / "one"), "--num-processes", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_eval(*common, "--output_dir", str(tmp_path / "two"), "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| task | metric | n | m |") == 1  # printed by rank 0 only

    results = {n: json.loads((tmp_path / n / "m" / "results.json").read_text()) for n in ("one", "two")}
    assert {t: v["processes"] for t, v in results["two"]["midtune"]["tasks"].items()} == {t: 2 for t in tasks}
    assert {t: v["processes"] for t, v in results["one"]["midtune"]["tasks"].items()} == {t: 1 for t in tasks}
    for task in tasks:
        assert results["two"]["n-samples"][task]["effective"] == 5
        assert results["two"]["results"][task] == results["one"]["results"][task]  # scores and stderrs
        docs_two, docs_one = per_document(tmp_path / "two" / "m", task), per_document(tmp_path / "one" / "m", task)
        assert docs_two["doc_ids"] == [0, 1, 2, 3, 4]  # each document once: the padding request is dropped
        assert docs_two["answers"] == docs_one["answers"]
    assert (tmp_path / "two" / "comparison.md").read_text() == (tmp_path / "one" / "comparison.md").read_text()

    # bad input under 2 processes: exit 2, one line, printed once (by rank 0), no torchrun traceback after it
    bad = run_eval(*common[:2], "--tasks", "midtune_shapes_colour", "--device", "cpu", "--num-processes", "2",
                   "--output_dir", str(tmp_path / "bad"))
    assert bad.returncode == 2, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown task: 'midtune_shapes_colour'" in errors[0]
    assert bad.stderr.strip().splitlines()[-1] == errors[0]
