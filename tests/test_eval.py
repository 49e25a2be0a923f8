"""The eval app: the lmms-eval plugin, the shapes tasks, `python -m eval`, and an end-to-end check that training
shows up in the benchmark numbers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from midtune.shapes import CANONICAL, COLORS, llava_row

ROOT = Path(__file__).resolve().parents[1]


# In-process runs build Accelerators; accelerate keeps process-wide singletons (see conftest).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "datasets_cache")  # both in conftest


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from eval.lmms_plugin import Midtune

    return Midtune(pretrained=str(tiny_dir("llava")), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def docs(world):
    """A fake lmms-eval task over the small world's test questions, with prompts of different lengths."""
    from PIL import Image

    rows = []
    for qtype in ("color", "position", "exists", "count"):
        rows += [json.loads(line) for line in (world / "test" / f"{qtype}.jsonl").read_text().splitlines()][:2]
    # the world's test questions may all tokenize to the same length: add the longer train phrasing of one
    long_color = re.fullmatch(r"what color is the (\w+)\?", rows[0]["question"])[1]
    rows.append({**rows[0], "id": rows[0]["id"] + "_long",
                 "question": f"what is the color of the {long_color} in this image?"})

    def doc_to_visual(doc):
        with Image.open(world / "images" / doc["image"]) as im:
            return [im.convert("RGB")]

    return rows, doc_to_visual


def instance(request_type: str, arguments: tuple, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def run_eval(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False)


# ---------------------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------------------


def test_plugin_is_registered_and_loads_through_the_registry(tiny_dir):
    from lmms_eval.models import get_model, get_model_manifest

    from eval.lmms_plugin import MANIFEST, Midtune

    assert get_model_manifest("midtune") == MANIFEST
    cls = get_model("midtune")
    assert cls is Midtune and cls.is_simple
    lm = cls.create_from_arg_string(f"pretrained={tiny_dir('llava')},dtype=auto",
                                    {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert lm.batch_size == 2 and str(lm.device) == "cpu" and lm.model.dtype == torch.float32
    assert type(lm.model).__name__ == "LlavaForConditionalGeneration"


def test_prompt_uses_the_chat_template_with_images_first(lm):
    from midtune.data import content_parts

    question = "what color is the circle?"
    prompt = lm.build_prompt(question, 1)
    assert prompt == lm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True)  # exactly how midtune's training data renders a turn
    assert prompt.startswith("<|im_start|>user\n<image>") and prompt.index("<image>") < prompt.index(question)
    assert prompt.endswith("<|im_start|>assistant\n")
    # a context with its own placeholder keeps the image there (and drops LLaVA's newline after it)
    assert content_parts("<image>\nwhat is this?", 1) == [{"type": "image"}, {"type": "text", "text": "what is this?"}]
    assert content_parts("a <image> b", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "a  b"}]


def test_loglikelihood_is_the_nll_of_the_continuation(lm, docs):
    rows, doc_to_visual = docs
    lm.task_dict = {"t": {"test": rows}}
    requests = [instance("loglikelihood", (row["question"], choice, doc_to_visual, i, "t", "test"), i)
                for i, row in enumerate(rows) for choice in row["choices"][:2]]
    results = lm.loglikelihood(requests)
    assert len(results) == len(requests)

    model, processor, tok = lm.model, lm.processor, lm.tokenizer
    for req, result in zip(requests, results):
        context, continuation, _, doc_id, _, _ = req.args
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}],
            tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt + continuation], images=doc_to_visual(rows[doc_id]), return_tensors="pt")
        n = len(tok(continuation, add_special_tokens=False)["input_ids"])
        assert len(tok(prompt + continuation)["input_ids"]) - len(tok(prompt)["input_ids"]) == n
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        ids = inputs["input_ids"][0]
        logprobs = torch.log_softmax(logits[-n - 1:-1], dim=-1)
        nll = -logprobs[torch.arange(n), ids[-n:]].sum().item()
        greedy = bool((logprobs.argmax(-1) == ids[-n:]).all())

        nll_got, greedy_got = result  # unpacks like lmms-eval's (value, is_greedy) ...
        assert nll_got == pytest.approx(nll, abs=1e-4) and nll_got > 0  # ... and the value is the NLL
        assert greedy_got == greedy
        assert result.text == (nll_got, greedy_got)  # what lmms-eval's multiple choice reads (argmin)

    # the same numbers one request at a time (right padding never moves a position)
    lm.batch_size_per_gpu = 1
    try:
        single = lm.loglikelihood(requests[:4])
    finally:
        lm.batch_size_per_gpu = 8
    assert [r.nll for r in single] == pytest.approx([r.nll for r in results[:4]], abs=1e-4)


def test_batched_left_padded_generation_equals_unbatched(lm, docs):
    rows, doc_to_visual = docs
    lm.task_dict = {"t": {"test": rows}}
    gen = {"until": ["\n\n"], "max_new_tokens": 6, "temperature": 0, "do_sample": False}
    requests = [instance("generate_until", (row["question"], dict(gen), doc_to_visual, i, "t", "test"), i)
                for i, row in enumerate(rows)]
    prompts = [lm.build_prompt(row["question"], 1) for row in rows]
    assert len({len(lm.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # prompts of different lengths
    batch = lm._encode(prompts, [doc_to_visual(r) for r in rows], padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()

    batched = lm.generate_until(requests)
    lm.batch_size_per_gpu = 1
    try:
        unbatched = lm.generate_until(requests)
    finally:
        lm.batch_size_per_gpu = 8
    assert batched == unbatched
    assert all(isinstance(text, str) for text in batched)


def test_generation_honours_until_and_the_settings(lm, docs):
    from eval.lmms_plugin import cut_at_stops, generation_settings

    rows, doc_to_visual = docs
    prompt, images = lm.build_prompt(rows[0]["question"], 1), doc_to_visual(rows[0])
    free = lm.generate_batch([prompt], [images], {"max_new_tokens": 8, "temperature": 0})[0]
    k = next((k for k in range(1, len(free)) if free[k] not in free[:k]), None)
    if k is None:
        pytest.skip(f"the random model's output {free!r} has no character to stop at")
    cut = lm.generate_batch([prompt], [images], {"max_new_tokens": 8, "temperature": 0, "until": [free[k]]})[0]
    assert cut == free[:k]
    assert cut_at_stops("red.\n\nblue", ["\n\n", "."]) == "red"

    assert generation_settings({"temperature": 0, "do_sample": True})["do_sample"] is False  # 0 → greedy
    assert generation_settings({"do_sample": False, "temperature": 0.7})["do_sample"] is False
    sampled = generation_settings({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5})
    assert sampled == {"max_new_tokens": 5, "do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9}
    assert generation_settings({"do_sample": True})["temperature"] == 1.0


def test_defaults_are_lmms_evals_llava_hf():
    """Where a task sets none, midtune generates as lmms-eval's llava_hf does, one request at a time. The values
    are read from the installed llava_hf files, so an lmms-eval upgrade that changes them fails here."""
    import inspect

    import lmms_eval

    from eval.__main__ import parse_args
    from eval.lmms_plugin import DEFAULT_MAX_NEW_TOKENS, Midtune, generation_settings

    def default(source: str, key: str) -> str:
        found = re.search(rf'if "{key}" not in gen_kwargs:\s*gen_kwargs\["{key}"\] = (\S+)', source)
        assert found, key
        return found[1]

    models = Path(lmms_eval.__file__).parent / "models"
    for source in ((models / "simple" / "llava_hf.py").read_text(), (models / "chat" / "llava_hf.py").read_text()):
        assert int(default(source, "max_new_tokens")) == DEFAULT_MAX_NEW_TOKENS == 1024
        assert default(source, "temperature") == "0" and default(source, "num_beams") == "1"
    simple = (models / "simple" / "llava_hf.py").read_text()
    assert re.search(r"batch_size: int = 1,", simple) and 'padding_side = "left"' in simple
    assert generation_settings({}) == {"max_new_tokens": 1024, "do_sample": False, "num_beams": 1,
                                       "temperature": None, "top_p": None, "top_k": None}  # greedy, one beam
    assert generation_settings({"max_new_tokens": 16, "num_beams": 3})["num_beams"] == 3  # a task's own win
    assert parse_args(["--model", "m=x"]).batch_size == 1
    assert inspect.signature(Midtune.__init__).parameters["batch_size"].default == 1


def test_greedy_generation_stops_at_the_end_of_sequence_token(lm, docs, monkeypatch):
    """The 1024-token default costs nothing on a short answer: greedy generation ends at the model's
    end-of-sequence token. The random model's own greedy continuation supplies one: its third token is made the
    EOS, and generation without a budget of its own stops right after it."""
    rows, doc_to_visual = docs
    prompt, images = lm.build_prompt(rows[0]["question"], 1), doc_to_visual(rows[0])
    lengths = []
    generate = lm.model.generate

    def recording(**kwargs):
        out = generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(lm.model, "generate", recording)
    inputs = lm._encode([prompt], [images], padding_side="left")
    with torch.inference_mode():
        free = generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    new = free[0, inputs["input_ids"].shape[1]:].tolist()
    if len(new) == 6:
        stop = new[2]
        monkeypatch.setattr(lm.model.generation_config, "eos_token_id", stop)
        expected = new.index(stop) + 1
    else:  # the model ended by itself, at the tokenizer's EOS
        expected = len(new)
    lm.generate_batch([prompt], [images], {"temperature": 0})  # no max_new_tokens: the default 1024
    assert lengths == [expected] and expected <= 6


def test_multi_round_asks_the_task_for_the_next_round(lm, docs):
    rows, doc_to_visual = docs
    lm.task_dict = {"t": {"test": rows}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output)))
        if round_idx == 1:
            return doc_to_visual(doc), "how many shapes are there?", False, previous_output, {"round": 1}
        return None, None, True, previous_output, previous_round_info

    gen = {"max_new_tokens": 3, "temperature": 0}
    outputs = lm.generate_until_multi_round(
        [instance("generate_until_multi_round",
                  (rows[0]["question"], gen, doc_to_visual, doc_to_text, 0, "t", "test"), 0)])
    assert len(outputs) == 1 and len(outputs[0]) == 2  # one answer per round
    assert [r for r, _ in seen] == [1, 2] and seen[1][1] == outputs[0]


def _make_delta(base: Path, out: Path, bump: float = 0.01) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full delta (as training writes it) that moves LLM layer 1 of `base`."""
    from midtune.checkpoint import base_hash, load_pretrained, save_delta

    model, _ = load_pretrained(str(base))
    delta = {k: p.detach() + bump for k, p in model.named_parameters()
             if k.startswith("model.language_model.layers.1.")}
    assert delta
    path = out / "delta.safetensors"
    save_delta(path, delta, base_model=str(base), base_hash=base_hash(str(base)), method="full",
               trainable={"layers": [1]})
    return path, delta


def _other_base(base: Path, out: Path) -> Path:
    """A copy of `base` with one weight changed: same architecture, different hash."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    f = next(out.glob("*.safetensors"))
    state = load_file(f)
    key = next(iter(state))
    state[key] = state[key] + 1.0
    save_file(state, f, metadata={"format": "pt"})
    return out


def test_delta_loading(tiny_dir, tmp_path):
    from eval.lmms_plugin import Midtune
    from midtune.checkpoint import CheckpointError

    base = tiny_dir("llava")
    path, delta = _make_delta(base, tmp_path)
    for kwargs in ({"pretrained": str(base), "delta": str(path)},  # base + delta
                   {"pretrained": str(path)},  # base from the delta's metadata
                   {"pretrained": str(tmp_path)}):  # a run's final/ holding only the delta
        lm = Midtune(device="cpu", **kwargs)
        assert lm.source.delta == str(path) and lm.source.pretrained == str(base)
        params = dict(lm.model.named_parameters())
        for name, value in delta.items():
            assert torch.equal(params[name], value), name
    with pytest.raises(CheckpointError, match="different weights"):
        Midtune(pretrained=str(_other_base(base, tmp_path / "other")), delta=str(path), device="cpu")


# ---------------------------------------------------------------------------------------------------------
# The shapes tasks
# ---------------------------------------------------------------------------------------------------------


def test_shapes_data_is_generated_and_regenerated_when_not_canonical(tmp_path):
    from eval.tasks import CANONICAL_WORLD, ensure_shapes_data, shapes_data_problem

    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    (data / "world.json").write_text(json.dumps({"args": {**CANONICAL_WORLD, "n_train": 10}}))
    assert "not the canonical" in shapes_data_problem(data)
    ensure_shapes_data(data, progress=False)
    assert shapes_data_problem(data) is None
    assert json.loads((data / "world.json").read_text())["args"] == CANONICAL_WORLD
    assert len((data / "test" / "color.jsonl").read_text().splitlines()) > 100


def test_shapes_tasks_load_with_their_data(shapes_data):
    from lmms_eval.evaluator_utils import get_task_list
    from lmms_eval.tasks import TaskManager, get_task_dict

    from eval.tasks import GENERATION_TASKS, MC_TASKS, TASKS_DIR

    manager = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)
    assert {"midtune_shapes", "midtune_shapes_mc", *GENERATION_TASKS, *MC_TASKS} <= set(manager.all_tasks)
    task_dict = get_task_dict(["midtune_shapes", "midtune_shapes_mc"], manager)
    tasks = {t.task_name: t.task for t in get_task_list(task_dict)}
    assert set(tasks) == {*GENERATION_TASKS, *MC_TASKS}
    color = tasks["midtune_shapes_color"]
    doc = color.eval_docs[0]
    first = json.loads((shapes_data / "test" / "color.jsonl").read_text().splitlines()[0])
    assert doc["question"] == first["question"] and color.doc_to_text(doc) == first["question"]  # bare question
    from eval.tasks import CANONICAL_WORLD

    side = CANONICAL_WORLD["image_size"]
    assert color.doc_to_visual(doc)[0].size == (side, side)
    mc = tasks["midtune_shapes_mc_color"]
    assert mc.doc_to_choice(doc) == ["red", "green", "blue", "yellow", "purple"]
    assert mc.config.target_delimiter == ""


def test_exists_metrics_are_pope_style():
    sys.path.insert(0, str(ROOT / "eval" / "tasks" / "midtune_shapes"))
    try:
        import utils as shapes_utils
    finally:
        sys.path.pop(0)
    answers = ["yes", "yes", "no", "no"]
    preds = ["Yes.", "no", "yes", "maybe"]
    records = [shapes_utils.exists_process_results({"id": str(i), "answer": a}, [p])
               for i, (a, p) in enumerate(zip(answers, preds))]
    assert [r["accuracy"] for r in records] == [1.0, 0.0, 0.0, 0.0]
    recs = [r["precision"] for r in records]
    assert shapes_utils.aggregate_precision(recs) == 0.5  # tp 1, fp 1
    assert shapes_utils.aggregate_recall(recs) == 0.5  # tp 1, fn 1
    assert shapes_utils.aggregate_f1(recs) == 0.5
    assert shapes_utils.aggregate_yes_ratio(recs) == 0.5  # share of *predicted* yes
    assert shapes_utils.normalize("  Red!\n") == "red"


# ---------------------------------------------------------------------------------------------------------
# python -m eval
# ---------------------------------------------------------------------------------------------------------


def _results(values: dict[str, float], n: int = 10) -> dict:
    tasks = {"midtune_shapes_color": {"alias": "color", "accuracy,none": values["color"], "accuracy_stderr,none": 0.1},
             "midtune_shapes_exists": {"accuracy,none": values["exists"], "f1,none": values["f1"],
                                       "f1_stderr,none": "N/A"}}
    return {"results": tasks,
            "groups": {"midtune_shapes": {"accuracy,none": (values["color"] + values["exists"]) / 2}},
            "group_subtasks": {"midtune_shapes": ["midtune_shapes_color", "midtune_shapes_exists"]},
            "n-samples": {t: {"original": 300, "effective": n} for t in tasks}}


def test_comparison_table_csv_and_chart(tmp_path):
    from eval.__main__ import write_comparison

    table = write_comparison({"base": _results({"color": 0.2, "exists": 0.5, "f1": 0.4}),
                              "tuned": _results({"color": 0.9, "exists": 0.75, "f1": 0.8})}, tmp_path)
    assert table == (tmp_path / "comparison.md").read_text().strip()
    lines = table.splitlines()
    assert lines[0] == "| task | metric | n | base | tuned | Δ tuned − base |"
    assert lines[2] == "| midtune_shapes | accuracy | — | 0.3500 | 0.8250 | +0.4750 |"  # no stderr: none given
    assert lines[3] == "| midtune_shapes_color | accuracy | 10 | 0.2000 ± 0.1000 | 0.9000 ± 0.1000 | +0.7000 |"
    assert "| midtune_shapes_exists | f1 | 10 | 0.4000 | 0.8000 | +0.4000 |" in lines  # "N/A" stderr: none shown
    assert len(lines) == 2 + 4  # group, color, exists accuracy + f1; no rows of their own for the stderrs

    with open(tmp_path / "comparison.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    # the columns before the stderrs keep their places (compare's report reads them by name)
    assert rows[0] == ["task", "metric", "n", "base", "tuned", "Δ tuned − base", "base stderr", "tuned stderr"]
    by_key = {(r[0], r[1]): r for r in rows[1:]}
    assert float(by_key[("midtune_shapes_exists", "f1")][5]) == pytest.approx(0.4)
    assert float(by_key[("midtune_shapes_color", "accuracy")][3]) == 0.2
    assert by_key[("midtune_shapes_color", "accuracy")][6:] == ["0.1", "0.1"]
    assert by_key[("midtune_shapes_exists", "f1")][6:] == ["", ""]

    png = (tmp_path / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compares_report_reads_the_table_with_its_stderr_columns(tmp_path):
    """compare's report reads comparison.csv by column name: the stderr columns must not be taken for models."""
    from compare.report import read_scores
    from eval.__main__ import write_comparison

    write_comparison({"base": _results({"color": 0.2, "exists": 0.5, "f1": 0.4}),
                      "tuned": _results({"color": 0.9, "exists": 0.75, "f1": 0.8})}, tmp_path)
    rows = {(r["task"], r["metric"]): r for r in read_scores(tmp_path / "comparison.csv", ["base", "tuned"])}
    assert rows[("midtune_shapes_color", "accuracy")]["values"] == {"base": 20.0, "tuned": 90.0}
    assert rows[("midtune_shapes", "accuracy")]["leaf"] is False
    assert rows[("midtune_shapes_color", "accuracy")]["n"] == 10


def _mmvp_results(pair: float, per_question: float) -> dict:
    """lmms-eval 0.7.3's mmvp results: the per-question accuracy first, the pair accuracy after it, no stderr."""
    return {"results": {"mmvp": {"alias": "mmvp", "mmvp_accuracy,none": per_question,
                                 "mmvp_accuracy_stderr,none": "N/A", "mmvp_pair_accuracy,none": pair,
                                 "mmvp_pair_accuracy_stderr,none": "N/A"}},
            "n-samples": {"mmvp": {"original": 300, "effective": 300}}}


def test_a_tasks_headline_metric_comes_first():
    from eval.__main__ import HEADLINE_METRICS, comparison_table, metric_rows

    assert HEADLINE_METRICS["mmvp"] == "mmvp_pair_accuracy"
    rows = metric_rows(_mmvp_results(pair=0.3, per_question=0.6))
    assert [(task, metric, value, stderr) for task, metric, value, stderr in rows] == [
        ("mmvp", "mmvp_pair_accuracy", 0.3, None), ("mmvp", "mmvp_accuracy", 0.6, None)]
    header, table = comparison_table({"a": _mmvp_results(0.3, 0.6), "b": _mmvp_results(0.4, 0.65)})
    assert [row[1] for row in table] == ["mmvp_pair_accuracy", "mmvp_accuracy"]
    assert table[0][3:6] == [0.3, 0.4, pytest.approx(0.1)]
    # a task without an entry keeps lmms-eval's order
    other = {"results": {"pope": {"pope_accuracy,none": 0.8, "pope_f1_score,none": 0.7}}}
    assert [metric for _, metric, _, _ in metric_rows(other)] == ["pope_accuracy", "pope_f1_score"]


def test_the_headline_metrics_are_the_installed_lmms_evals_metric_names():
    """HEADLINE_METRICS names metrics of lmms-eval's own task YAMLs; a rename in lmms-eval must fail here, not
    quietly drop the headline back to lmms-eval's first metric."""
    import lmms_eval

    from eval.__main__ import HEADLINE_METRICS

    tasks_dir = Path(lmms_eval.__file__).parent / "tasks"
    for task, metric in HEADLINE_METRICS.items():
        texts = "".join(f.read_text() for f in sorted((tasks_dir / task).glob("*yaml")))
        assert re.search(rf"- metric: {re.escape(metric)}\s*$", texts, flags=re.M), (task, metric)


def test_mmvp_pair_accuracy_counts_a_pair_only_when_both_are_right():
    """lmms-eval's MMVP scoring on hand-made documents: consecutive Index values (1-based) form a pair, and the
    pair accuracy does not depend on the order the results come in (a data-parallel run gathers them rank after
    rank)."""
    import random

    from lmms_eval.tasks.mmvp import utils as mmvp

    # pairs (1, 2), (3, 4), (5, 6): both right, one wrong, both wrong
    answers = ["(a)", "(b)", "(a)", "(b)", "(b)", "(a)"]
    predictions = ["A", "B", "A", "A", "A", "B"]
    docs = [{"Index": i + 1, "Question": "q", "Options": "(a) x (b) y", "Correct Answer": a}
            for i, a in enumerate(answers)]
    records = [mmvp.mmvp_process_results(doc, [pred]) for doc, pred in zip(docs, predictions)]
    pair_records = [r["mmvp_pair_accuracy"] for r in records]
    assert mmvp.mmvp_aggregate_results([r["mmvp_accuracy"] for r in records]) == pytest.approx(3 / 6)
    assert mmvp.mmvp_aggregate_pair_results(pair_records) == pytest.approx(1 / 3)
    shuffled = pair_records[0::2] + pair_records[1::2]  # rank 0's documents, then rank 1's
    random.Random(0).shuffle(shuffled)
    assert mmvp.mmvp_aggregate_pair_results(shuffled) == pytest.approx(1 / 3)
    # an odd --limit leaves a pair incomplete: it is not counted (1 of the 2 complete pairs is right)
    assert mmvp.mmvp_aggregate_pair_results(pair_records[:5]) == pytest.approx(1 / 2)


def test_bad_input_exits_non_zero_naming_the_problem(tiny_dir, tmp_path, capsys):
    from eval.__main__ import main

    def fails(*args: str, code: int = 2) -> str:
        assert main([*args, "--output_dir", str(tmp_path / "out")]) == code
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ")
        return last

    missing = tmp_path / "no-such-run" / "final"
    err = fails("--model", f"ref={missing}", "--tasks", "midtune_shapes_color")
    assert err.startswith("error: model ref:") and str(missing) in err and "does not exist" in err

    path, _ = _make_delta(tiny_dir("llava"), tmp_path)
    other = _other_base(tiny_dir("llava"), tmp_path / "other")
    err = fails("--model", f"tuned={path}@{other}", "--tasks", "midtune_shapes_color")
    assert "model tuned:" in err and "different weights" in err and str(other) in err

    err = fails("--model", f"a={tiny_dir('llava')}", "--tasks", "midtune_shapes_colour")
    assert "unknown task: 'midtune_shapes_colour'" in err and "midtune_shapes_color" in err

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "empty.jsonl").write_text("")
    (tasks / "my_empty.yaml").write_text(
        "task: my_empty\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: empty.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n")
    err = fails("--model", f"a={tiny_dir('llava')}", "--tasks", "my_empty", "--include_path", str(tasks))
    assert "my_empty" in err and "empty.jsonl" in err


def test_an_offline_hub_task_fails_with_lmms_evals_error(tiny_dir, tmp_path, capsys, monkeypatch):
    from eval.__main__ import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", f"a={tiny_dir('llava')}", "--tasks", "pope", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not load task(s) pope:") and "POPE" in err
    assert not (tmp_path / "a").exists()  # nothing ran


def test_the_command_exits_non_zero_in_a_subprocess(tmp_path):
    result = run_eval("--model", f"x={tmp_path / 'missing'}", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model x: checkpoint directory")


def test_first_models_results_survive_a_failing_second_model(tiny_dir, tmp_path, shapes_data, capsys):
    from eval.__main__ import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("llava"), broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()  # config.json is there, the weights are not: fails when loading, after model a ran
    out = tmp_path / "out"
    common = ["--tasks", "midtune_shapes_count", "--limit", "3", "--device", "cpu", "--output_dir", str(out)]
    assert main(["--model", f"a={tiny_dir('llava')}", "--model", f"b={broken}", *common]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: model b: cannot load")
    results = json.loads((out / "a" / "results.json").read_text())
    assert results["results"]["midtune_shapes_count"]["accuracy,none"] is not None
    assert results["n-samples"]["midtune_shapes_count"]["effective"] == 3
    samples = (out / "a" / "samples_midtune_shapes_count.jsonl").read_text().splitlines()
    assert len(samples) == 3 and "filtered_resps" in json.loads(samples[0])
    assert not (out / "b").exists()
    assert "| midtune_shapes_count | accuracy | 3 |" in (out / "comparison.md").read_text()

    # a second run reuses a's results instead of evaluating it again
    assert main(["--model", f"a={tiny_dir('llava')}", *common]) == 0
    assert "a: reusing" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Compatibility: a trained checkpoint scores the same through lmms-eval's own llava_hf
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(world, tiny_dir, tmp_path_factory):
    """A merged checkpoint from a few steps of training on the small world."""
    from train.config import load_config
    from train.recipe import train

    out = tmp_path_factory.mktemp("short_run")
    args = {"model": tiny_dir("llava"), "data": world / "train.json", "image_folder": world / "images",
            "output_dir": out, "batch_size": 4, "max_steps": 20, "report_to": "[]", "seed": 0, "optim.lr": 3e-3,
            "trainable.layers": "all", "trainable.projector": "true", "trainable.lm_head": "true",
            "trainable.embeddings": "true"}
    train(load_config(None, [f"{k}={v}" for k, v in args.items()]))
    return out / "final"


def test_a_trained_checkpoint_scores_the_same_through_llava_hf(short_run, shapes_data):
    """lmms-eval's built-in llava_hf (its chat variant: images first, the processor's chat template) loads the
    merged directory with vanilla transformers and must give the same answers as the midtune plugin. It needs
    `decord` installed and, under transformers 5, `device_map=cpu` (its default "" is refused)."""
    pytest.importorskip("decord", reason="lmms-eval's llava_hf imports decord")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from eval.lmms_plugin import cut_at_stops
    from eval.tasks import TASKS_DIR

    tasks = ["midtune_shapes_count", "midtune_shapes_color"]
    scores, predictions = {}, {}
    for model, batch_size in (("llava_hf", 1), ("midtune", 4)):
        results = evaluator.simple_evaluate(
            model=model, model_args=f"pretrained={short_run}" + (",device_map=cpu" if model == "llava_hf" else ""),
            tasks=tasks, limit=12, device="cpu",
            batch_size=batch_size, log_samples=True, bootstrap_iters=0,
            task_manager=TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False))
        scores[model] = {t: results["results"][t]["accuracy,none"] for t in tasks}
        predictions[model] = {t: [cut_at_stops(s["filtered_resps"][0], ["\n\n"]).strip() for s in results["samples"][t]]
                              for t in tasks}
    assert predictions["midtune"] == predictions["llava_hf"]
    assert scores["midtune"] == scores["llava_hf"]


# ---------------------------------------------------------------------------------------------------------
# End to end: train a tiny LLaVA on the canonical world, then `python -m eval` it against its untrained base
# ---------------------------------------------------------------------------------------------------------

# The recipe: the train split's colour questions, one per row, the vision tower frozen at its random init, everything
# else training at lr 1e-3, batch 8, 600 steps (~20 s on 2 CPU cores). Measured on --limit 100 (chance 0.20): 0.73,
# 0.87, 0.70 for seeds 0-2; neighbours of seed 0: 400 steps 0.67, 800 steps 0.85, lr 2e-3 0.66, trainable vision
# tower 0.59. What made it learn is the tiny model's init (TinySize.initializer_range = 1/sqrt(width)): with the
# hub default 0.02 the same recipe stayed at one constant answer (0.20). Colour only, because the five mixed types
# share the 600 steps: the whole train.json gives colour 0.31 and 0.24 (shape 0.53, count 0.98) for seeds 0 and 1.
E2E_MODEL = {"layers": 3, "hidden": 96, "heads": 4, "kv_heads": 2, "vision_layers": 2, "vision_hidden": 64,
             "vision_heads": 4, "patch_size": 16, "image_size": CANONICAL["image_size"]}
E2E_TRAIN = {"trainable.layers": "all", "trainable.vision_tower": "false", "trainable.projector": "true",
             "trainable.embeddings": "true", "trainable.lm_head": "true", "trainable.norm": "true",
             "optim.lr": 1e-3, "batch_size": 8, "max_steps": 600, "max_length": 192}
E2E_LIMIT = 100
CHANCE = {"color": 1 / 5}


def colour_questions(world: Path, out: Path) -> Path:
    """The train split's colour questions, one per row."""
    rows = []
    for row in json.loads((world / "train.json").read_text()):
        turns = row["conversations"]
        for i in range(0, len(turns), 2):
            if turns[i + 1]["value"] not in COLORS:  # only colour questions are answered with a colour
                continue
            question = turns[i]["value"].replace("<image>", "").strip()
            rows.append(llava_row(f"{row['id']}_q{i // 2}", row["image"], [(question, turns[i + 1]["value"])]))
    assert rows, f"{world}: no colour questions in train.json"
    out.write_text(json.dumps(rows))
    return out


@pytest.fixture(scope="module")
def trained_on_world(shapes_data, tmp_path_factory):
    from midtune.tiny import build_tiny, world_texts
    from train.config import load_config
    from train.recipe import train

    root = tmp_path_factory.mktemp("e2e")
    base = build_tiny("llava", root / "base", world_texts(shapes_data), **E2E_MODEL)
    data = colour_questions(shapes_data, root / "train_colour.json")
    args = {"model": base, "data": data, "image_folder": shapes_data / "images",
            "output_dir": root / "run", "report_to": "[]", "seed": 0, **E2E_TRAIN}
    train(load_config(None, [f"{k}={v}" for k, v in args.items()]))
    return base, root / "run" / "final"


@pytest.mark.slow
def test_training_shows_in_the_shapes_benchmark(trained_on_world, tmp_path):
    base, final = trained_on_world
    out = tmp_path / "eval"
    result = run_eval("--model", f"untrained={base}", "--model", f"trained={final}", "--tasks", "midtune_shapes",
                      "--limit", str(E2E_LIMIT), "--device", "cpu", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    assert "| task | metric | n | untrained | trained | Δ trained − untrained |" in table
    assert table in result.stdout  # printed at the end
    with open(out / "comparison.csv", newline="") as fh:
        rows = {(r["task"], r["metric"]): r for r in csv.DictReader(fh)}
    color = rows[("midtune_shapes_color", "accuracy")]
    trained, untrained = float(color["trained"]), float(color["untrained"])
    print(f"colour accuracy: trained {trained:.3f}, untrained {untrained:.3f} (chance {CHANCE['color']:.2f})")
    for name in ("untrained", "trained"):
        assert (out / name / "results.json").is_file()
        assert (out / name / "samples_midtune_shapes_color.jsonl").is_file()
    assert untrained <= CHANCE["color"] + 0.1, table
    assert trained >= CHANCE["color"] + 0.25, table
