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


# ---------------------------------------------------------------------------------------------------------
# Batching by length
# ---------------------------------------------------------------------------------------------------------


def test_length_grouped_batches_are_one_modality_and_a_seeded_permutation():
    from midtune.data import LengthGroupedSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 700, (203,), generator=g).tolist()
    has_images = (torch.rand(203, generator=g) < 0.7).tolist()
    sampler = LengthGroupedSampler(lengths, has_images, batch_size=4, seed=3, megabatch=8)
    first = list(sampler)
    assert sorted(first) == list(range(203))  # every sample once per epoch
    assert list(sampler) == first == list(LengthGroupedSampler(lengths, has_images, 4, seed=3, megabatch=8))
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch, the same one on every process and on resume
    assert list(LengthGroupedSampler(lengths, has_images, 4, seed=4, megabatch=8)) != first
    batches = [first[s:s + 4] for s in range(0, len(first), 4)]
    mixed = [b for b in batches if len({has_images[i] for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] in batches[-2:])  # only the gathered leftovers mix
    assert len(batches[-1]) == 203 % 4  # the one short batch comes last


def test_grouping_by_length_at_least_halves_the_padding_of_random_batches():
    from midtune.data import LengthGroupedSampler, padding_fraction

    g = torch.Generator().manual_seed(1)
    # LLaVA-like: image samples of 576 image tokens + 20-400 text tokens, text-only samples of 20-600 tokens
    has_images = (torch.rand(2000, generator=g) < 0.8).tolist()
    lengths = [(576 if img else 0) + int(torch.randint(20, 600 if not img else 400, (1,), generator=g))
               for img in has_images]
    shuffled = torch.randperm(2000, generator=g).tolist()
    grouped = list(LengthGroupedSampler(lengths, has_images, batch_size=8, seed=0))
    assert padding_fraction(lengths, grouped, 8) <= 0.5 * padding_fraction(lengths, shuffled, 8)
    assert padding_fraction([5, 5, 3, 1], [0, 1, 2, 3], 2) == pytest.approx(1 - 14 / 16)


# ---------------------------------------------------------------------------------------------------------
# Checking rows at scale: shards, workers, the cache
# ---------------------------------------------------------------------------------------------------------


def dataset_view(ds):
    return [(s.id, s.row, s.source) for s in ds.samples], ds.lengths, ds.summary.to_dict()


def test_row_checks_split_across_processes_and_workers_give_the_same_dataset(world, tiny_dir):
    """Two 'processes' (threads meeting in a gather, as accelerate's gather_object does), each checking every
    other row with a DataLoader worker: each row is checked once in total and both build the single-process
    dataset."""
    import threading

    processor = processor_of(tiny_dir, "llava")
    data = [world / "train.json", world / "captions_train.json"]
    alone = SupervisedDataset(data, processor, image_folder=world / "images")
    barrier, parts, built = threading.Barrier(2), {}, {}

    def gather(local):
        parts[threading.current_thread().name] = local
        barrier.wait()
        return [item for name in sorted(parts) for item in parts[name]]

    def rank(r):
        built[r] = SupervisedDataset(data, processor, image_folder=world / "images", shard=(r, 2), gather=gather,
                                     num_workers=1 if r == 0 else 0)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(2):
        samples, lengths, summary = dataset_view(built[r])
        assert (samples, lengths) == dataset_view(alone)[:2]
        assert summary["rows"] == alone.summary.rows
    checked = [built[r].summary.checked_here for r in range(2)]
    assert sum(checked) == alone.summary.rows and min(checked) >= alone.summary.rows // 2


def test_row_checks_are_cached_by_data_processor_and_settings(world, tiny_dir, tmp_path, monkeypatch):
    processor = processor_of(tiny_dir, "llava")
    rows = json.loads((world / "train.json").read_text())
    rows[3]["image"] = "nowhere.png"  # a bad row, skipped: the cache must skip it again
    data = write_json(tmp_path / "train.json", rows)
    make = dict(image_folder=world / "images", on_bad_sample="skip", cache_dir=tmp_path / "cache")
    cold = SupervisedDataset(data, processor, **make)
    assert not cold.summary.cached and cold.summary.skipped == {"missing image file": 1}
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    import PIL.Image

    def no_image_reads(*args, **kwargs):
        raise AssertionError("a cached check read an image file")

    monkeypatch.setattr(PIL.Image, "open", no_image_reads)
    warm = SupervisedDataset(data, processor, **make)
    assert warm.summary.cached
    assert dataset_view(warm)[:2] == dataset_view(cold)[:2] and warm.summary.skipped == cold.summary.skipped
    monkeypatch.undo()

    # another max_length, or a changed data file: checked again
    assert not SupervisedDataset(data, processor, max_length=1024, **make).summary.cached
    write_json(data, rows[:10])
    again = SupervisedDataset(data, processor, **make)
    assert not again.summary.cached and again.summary.rows == 10
    # without a cache_dir nothing is kept
    assert not SupervisedDataset(data, processor, image_folder=world / "images", on_bad_sample="skip").summary.cached
