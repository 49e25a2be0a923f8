"""The data pipeline: formats, label masking, image expansion, truncation, collation and bad rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from conftest import FAMILIES
from midtune.adapters import FAMILIES_BY_NAME
from midtune.data import IGNORE_INDEX, BadSample, Collator, DataError, SupervisedDataset


def processor_of(tiny_dir, family):
    return transformers.AutoProcessor.from_pretrained(tiny_dir(family))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def label_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_assistant_turns(world, tiny_dir, family):
    processor = processor_of(tiny_dir, family)
    ds = SupervisedDataset(world / "train.json", processor, image_folder=world / "images", max_length=1024)
    rows = json.loads((world / "train.json").read_text())
    for i in range(3):
        item = ds[i]
        answers = [t["value"] for t in rows[i]["conversations"] if t["from"] == "gpt"]
        decoded = [processor.tokenizer.decode(run) for run in label_runs(item["labels"])]
        # one label run per assistant turn: the answer and its end-of-turn marker, nothing of the prompt
        assert decoded == [a + "<|im_end|>" for a in answers]
        # image tokens: one contiguous run of the family's image token, never labels
        config = transformers.AutoConfig.from_pretrained(tiny_dir(family))
        image_id = FAMILIES_BY_NAME[family].image_token_id(config)
        positions = (item["input_ids"] == image_id).nonzero().flatten()
        assert len(positions) > 0 and positions[-1] - positions[0] + 1 == len(positions)
        assert (item["labels"][positions] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_upfront_lengths_match_processed_items(world, tiny_dir, family):
    # Lengths are measured before training from header sizes + the processor's token-count API; they must
    # equal what the processor really produces, or the truncation rule would be applied to wrong lengths.
    ds = SupervisedDataset(world / "train.json", processor_of(tiny_dir, family), image_folder=world / "images")
    assert [len(ds[i]["input_ids"]) for i in range(5)] == ds.lengths[:5]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_mixed_text_and_image_batch_runs_through_the_model(world, tiny_dir, family, tmp_path):
    rows = json.loads((world / "train.json").read_text())[:2]
    rows.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "what is yellow?"}, {"from": "gpt", "value": "yellow is a color."}]})
    rows.append({"id": "lm", "text": "there are 2 shapes. a red circle at the top left."})
    processor = processor_of(tiny_dir, family)
    ds = SupervisedDataset(write_json(tmp_path / "mix.json", rows), processor, image_folder=world / "images")
    assert (ds.summary.with_images, ds.summary.text_only) == (2, 2)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])
    assert batch.pop("sample_ids") == ["train_000000", "train_000001", "text-only", "lm"]
    lengths = [len(ds[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert (batch["attention_mask"].sum(1) == torch.tensor(lengths)).all()
    # padding is never a label
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # the plain-text sample is trained on every token
    lm = ds[3]
    assert (lm["labels"] == lm["input_ids"]).all()
    model_cls = getattr(transformers, FAMILIES_BY_NAME[family].model_class)
    model = model_cls.from_pretrained(tiny_dir(family))
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_jsonl_and_datasets_on_disk(world, tiny_dir, tmp_path):
    import datasets

    rows = json.loads((world / "train.json").read_text())[:4]
    processor = processor_of(tiny_dir, "llava")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from_jsonl = SupervisedDataset(jsonl, processor, image_folder=world / "images")
    # datasets with decoded images in the `image` column (how hub datasets often store them)
    from PIL import Image

    table = {"id": [r["id"] for r in rows],
             "image": [Image.open(world / "images" / r["image"]).convert("RGB") for r in rows],
             "conversations": [r["conversations"] for r in rows]}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(tmp_path / "hf")
    from_disk = SupervisedDataset(tmp_path / "hf", processor)
    assert len(from_disk) == len(from_jsonl) == 4
    for i in range(4):
        assert torch.equal(from_disk[i]["input_ids"], from_jsonl[i]["input_ids"])
        assert torch.equal(from_disk[i]["labels"], from_jsonl[i]["labels"])
        assert torch.allclose(from_disk[i]["pixel_values"], from_jsonl[i]["pixel_values"])


def test_truncation_never_cuts_image_tokens(world, tiny_dir, tmp_path):
    processor = processor_of(tiny_dir, "llava")
    # multi-turn rows, so that cutting the last 10 tokens still leaves an answer
    rows = [r for r in json.loads((world / "train.json").read_text()) if len(r["conversations"]) >= 6][:3]
    # image first: 64 image tokens start at ~3; max_length 40 would cut through them
    path = write_json(tmp_path / "rows.json", rows)
    ds_kw = dict(image_folder=world / "images")
    with pytest.raises(DataError, match=r"row 0 .*cut through image tokens"):
        SupervisedDataset(path, processor, max_length=40, on_image_truncation="error", **ds_kw)
    with pytest.raises(DataError, match="no usable samples"):
        SupervisedDataset(path, processor, max_length=40, on_image_truncation="skip", **ds_kw)
    # text after the image may be truncated: the sample is kept, shortened, and counted
    full = SupervisedDataset(path, processor, **ds_kw)
    limit = min(full.lengths) - 10
    cut = SupervisedDataset(path, processor, max_length=limit, **ds_kw)
    assert cut.summary.truncated == 3 and len(cut) == 3
    assert len(cut[0]["input_ids"]) == limit
    # a sample whose image ends past max_length is dropped and counted, the others kept
    long_row = dict(rows[0], id="long", conversations=[
        {"from": "human", "value": "what shape is it? " * 30 + "<image>"}, {"from": "gpt", "value": "circle"}])
    mixed = SupervisedDataset(write_json(tmp_path / "m.json", rows + [long_row]), processor,
                              max_length=max(full.lengths) + 5, **ds_kw)
    assert len(mixed) == 3 and mixed.summary.skipped == {"too long (image cut)": 1}


def _bad_rows(world: Path, tmp_path: Path) -> dict[str, tuple[dict, str]]:
    good = json.loads((world / "train.json").read_text())[0]
    corrupt = tmp_path / "images" / "corrupt.png"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "images" / "truncated.png"
    png = (world / "images" / good["image"]).read_bytes()
    truncated.write_bytes(png[: len(png) // 2])
    shutil.copy(world / "images" / good["image"], tmp_path / "images" / "ok.png")
    conv = good["conversations"]
    text_conv = [{"from": "human", "value": "what is red?"}, {"from": "gpt", "value": "red is a color."}]
    return {
        "missing image file": (dict(good, image="nope.png"), "image file not found"),
        "corrupt image": (dict(good, image="corrupt.png"), "corrupt image"),
        "truncated image": (dict(good, image="truncated.png"), "corrupt image"),
        "<image> without image": ({"id": "x", "conversations": conv}, "no image"),
        "image without <image>": ({"id": "x", "image": "ok.png", "conversations": text_conv}, "no <image>"),
        "empty conversations": ({"id": "x", "image": "ok.png", "conversations": []}, "non-empty list"),
        "malformed turn": ({"id": "x", "conversations": [{"from": "human"}]}, "'from' and 'value'"),
        "unknown role": ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}, *text_conv]},
                         "unknown role 'robot'"),
        "no assistant turn": ({"id": "x", "conversations": text_conv[:1]}, "no assistant"),
        "not an object": (["a", "list"], "expected an object"),
        "path escapes image folder": (dict(good, image="../../etc/passwd"), "escapes the image folder"),
        "two placeholders one image": (dict(good, image="ok.png", conversations=[
            {"from": "human", "value": "<image><image> hi"}, {"from": "gpt", "value": "x"}]), "2 <image> placeholders"),
    }


def test_each_bad_row_is_an_error_naming_file_and_row(world, tiny_dir, tmp_path):
    processor = processor_of(tiny_dir, "llava")
    good = json.loads((world / "train.json").read_text())[1]
    shutil.copy(world / "images" / good["image"], tmp_path / "good.png")
    cases = _bad_rows(world, tmp_path)
    for name, (row, message) in cases.items():
        path = write_json(tmp_path / "data.json", [dict(good, image="ok.png"), row])
        with pytest.raises(BadSample, match=message) as err:
            SupervisedDataset(path, processor, image_folder=tmp_path / "images")
        assert f"{path}: row 1" in str(err.value), name


def test_skip_policy_counts_every_bad_row(world, tiny_dir, tmp_path):
    processor = processor_of(tiny_dir, "llava")
    cases = _bad_rows(world, tmp_path)
    good = json.loads((world / "train.json").read_text())[0]
    rows = [dict(good, image="ok.png")] + [row for row, _ in cases.values()]
    ds = SupervisedDataset(write_json(tmp_path / "data.json", rows), processor, image_folder=tmp_path / "images",
                           on_bad_sample="skip")
    assert len(ds) == 1
    assert sum(ds.summary.skipped.values()) == len(cases)
    assert ds.summary.skipped["corrupt image"] == 2 and ds.summary.skipped["missing image file"] == 1
    assert f"{len(cases)} skipped" in str(ds.summary)


def test_unreadable_files_name_the_file_and_row(tiny_dir, tmp_path):
    processor = processor_of(tiny_dir, "llava")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n')
    with pytest.raises(DataError, match=rf"{bad_jsonl}: row 1: not valid JSON"):
        SupervisedDataset(bad_jsonl, processor)
    with pytest.raises(DataError, match="does not exist"):
        SupervisedDataset(tmp_path / "missing.json", processor)
    obj = write_json(tmp_path / "obj.json", {"id": "a"})
    with pytest.raises(DataError, match="expected a JSON list"):
        SupervisedDataset(obj, processor)
