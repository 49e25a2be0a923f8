"""Tests for the shapes world generator (midtune.shapes). Tiny worlds only, so they run fast."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from midtune import shapes

REPO = Path(__file__).resolve().parents[1]
ARGS = {"n_train": 20, "n_val": 5, "n_test": 10}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    shapes.generate_world(out, seed=3, progress=False, **ARGS)
    return out


def scenes_by_image(world: Path, split: str) -> dict[str, list[dict]]:
    return {r["image"]: r["objects"] for r in read_jsonl(world / f"scenes_{split}.jsonl")}


def signature(objects: list[dict]) -> tuple:
    return tuple(sorted((o["row"], o["col"], o["color"], o["shape"]) for o in objects))


# ---- determinism ---------------------------------------------------------------------
def test_cli_matches_api_byte_for_byte_and_seed_matters(tmp_path):
    cli_out, api_out, other = tmp_path / "cli", tmp_path / "api", tmp_path / "other"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, "-m", "midtune.shapes", "--out", str(cli_out), "--seed", "7",
         "--n-train", "20", "--n-val", "5", "--n-test", "10", "--no-progress"],
        check=True, cwd=REPO, env=env, capture_output=True,
    )
    shapes.generate_world(api_out, seed=7, progress=False, **ARGS)
    shapes.generate_world(other, seed=8, progress=False, **ARGS)
    a, b, c = tree_bytes(cli_out), tree_bytes(api_out), tree_bytes(other)
    assert len(a) > 40 and a == b
    assert a.keys() == c.keys()
    assert a["train.json"] != c["train.json"]
    assert a["images/test/test_000000.png"] != c["images/test/test_000000.png"]


def test_rerun_into_same_dir_removes_stale_images(tmp_path):
    shapes.generate_world(tmp_path / "w", seed=0, progress=False, n_train=6, n_val=2, n_test=3)
    shapes.generate_world(tmp_path / "w", seed=0, progress=False, n_train=4, n_val=1, n_test=2)
    assert len(list((tmp_path / "w" / "images" / "train").iterdir())) == 4


# ---- files and formats ---------------------------------------------------------------
def test_summary_and_counts(world):
    summary = json.loads((world / "world.json").read_text())
    assert summary["format_version"] == 1 and summary["seed"] == 3
    assert summary["colors"] == list(shapes.COLORS) and summary["shapes"] == list(shapes.SHAPES)
    assert summary["grid"]["rows"] == ["top", "middle", "bottom"]
    assert summary["question_types"]["count"]["choices"] == ["1", "2", "3", "4"]
    counts = summary["counts"]
    assert counts["train.json"] == 20 and counts["val.json"] == 5 and counts["pairs.jsonl"] == 10
    assert counts["corpus.jsonl"] == 40
    for name, n in counts.items():
        path = world / name
        if name.startswith("images/"):
            assert len(list(path.glob("*.png"))) == n
        elif name.endswith(".jsonl"):
            assert len(read_jsonl(path)) == n
        else:
            assert len(json.loads(path.read_text())) == n
    for path in world.rglob("*.json*"):
        text = path.read_bytes()
        assert b"\r" not in text and text.endswith(b"\n")


def check_llava_rows(rows: list[dict], world: Path):
    for row in rows:
        conv = row["conversations"]
        assert (world / "images" / row["image"]).is_file()
        assert row["image"] == f"{row['id'].split('_')[0]}/{row['id']}.png"
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1


def test_llava_files_well_formed(world):
    for name in ("train.json", "val.json", "captions_train.json", "captions_val.json"):
        rows = json.loads((world / name).read_text())
        check_llava_rows(rows, world)
        if name.startswith("captions"):
            assert all(len(r["conversations"]) == 2 for r in rows)
            assert all(r["conversations"][0]["value"] == "<image>\nDescribe the image." for r in rows)


def answer_from_cell_words(words: list[str], question: str) -> str:
    """Answers a world question from a scene in cell words, independently of the generator's code."""
    grid = int(len(words) ** 0.5)
    objects = [(i // grid, i % grid, w) for i, w in enumerate(words) if w != "empty"]
    kind = {w: (r, c) for r, c, w in objects}
    if m := re.fullmatch(r"what (?:color is|is the color of) the (\w+)\?", question):
        return next(c for c in shapes.COLOR_NAMES for _, _, w in objects if w == c + m[1])
    if m := re.fullmatch(r"(?:what shape is the (\w+) object|which shape is (\w+))\?", question):
        return next(s for s in shapes.SHAPES for _, _, w in objects if w == (m[1] or m[2]) + s)
    if m := re.fullmatch(r"(?:is there|does the image contain) a (\w+) (\w+)\?", question):
        return "yes" if m[1] + m[2] in kind else "no"
    raise AssertionError(f"not a color, shape or exists question: {question!r}")  # count/position: left to images


def test_questions_in_words_are_answered_by_their_scene(world):
    rows = json.loads((world / "questions_in_words.json").read_text())
    assert len(rows) == ARGS["n_train"]
    cell_vocab = {"empty"} | {c + s for c in shapes.COLOR_NAMES for s in shapes.SHAPES}
    asked = Counter()
    for row in rows:
        assert set(row) == {"id", "conversations"}  # text only: no image
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        scene_line, first_question = turns[0]["value"].split("\n")
        words = scene_line.split()
        assert len(words) == 9 and set(words) <= cell_vocab and set(words) != {"empty"}, scene_line
        questions = [first_question] + [t["value"] for t in turns[2::2]]
        for question, answer in zip(questions, [t["value"] for t in turns[1::2]]):
            assert "<image>" not in question
            assert answer == answer_from_cell_words(words, question), (row["id"], question, answer)
            asked[question.split()[0]] += 1
    assert set(asked) == {"what", "which", "is", "does"}, asked  # color, shape, exists; both phrasings


def test_test_questions_have_valid_choices_and_balanced_exists(world):
    summary = json.loads((world / "world.json").read_text())
    for qtype in shapes.QTYPES:
        rows = read_jsonl(world / "test" / f"{qtype}.jsonl")
        assert rows, qtype
        for r in rows:
            assert r["qtype"] == qtype
            assert r["choices"] == summary["question_types"][qtype]["choices"]
            assert r["answer"] in r["choices"]
        images = [r["image"] for r in rows]
        if qtype == "exists":
            assert Counter(r["answer"] for r in rows) == {"yes": 10, "no": 10}
            for image, n in Counter(images).items():  # one yes and one no per image
                assert n == 2
                assert {r["category"] for r in rows if r["image"] == image} == {"positive", "negative"}
            assert all(r["negative_kind"] in ("random", "adversarial")
                       for r in rows if r["category"] == "negative")
        else:
            assert len(images) == len(set(images))  # at most one question per image
    ids = [r["id"] for q in shapes.QTYPES for r in read_jsonl(world / "test" / f"{q}.jsonl")]
    assert len(ids) == len(set(ids))


def test_val_and_test_never_duplicate_train_scenes(world):
    train = {signature(o) for o in scenes_by_image(world, "train").values()}
    for split in ("val", "test"):
        assert not train & {signature(o) for o in scenes_by_image(world, split).values()}


# ---- answers re-derived from the scene descriptions -----------------------------------
WORD = r"([a-z]+)"
PATTERNS = [  # (qtype, regex over the question, groups)
    ("color", rf"what color is the {WORD}\?|what is the color of the {WORD}\?"),
    ("shape", rf"what shape is the {WORD} object\?|which shape is {WORD}\?"),
    ("count", r"how many shapes are there\?|how many objects are in the image\?"),
    ("count_color", rf"how many {WORD} shapes are there\?"),
    ("position", rf"where is the {WORD} {WORD}\?|where in the image is the {WORD} {WORD}\?"),
    ("exists", rf"is there a {WORD} {WORD}\?|does the image contain a {WORD} {WORD}\?"),
]


def expected_answer(question: str, objects: list[dict]) -> str:
    """Answer a question from the scene, asserting that it is unambiguous."""
    for qtype, pattern in PATTERNS:
        m = re.fullmatch(pattern, question)
        if not m:
            continue
        g = [x for x in m.groups() if x is not None]
        if qtype == "color":
            (match,) = [o for o in objects if o["shape"] == g[0]]
            return match["color"]
        if qtype == "shape":
            (match,) = [o for o in objects if o["color"] == g[0]]
            return match["shape"]
        if qtype == "count":
            return str(len(objects))
        if qtype == "count_color":
            n = sum(o["color"] == g[0] for o in objects)
            assert n >= 1
            return str(n)
        if qtype == "position":
            (match,) = [o for o in objects if (o["color"], o["shape"]) == (g[0], g[1])]
            row = ("top", "middle", "bottom")[match["row"]]  # the 3 × 3 grid of the test world, spelled out
            col = ("left", "center", "right")[match["col"]]
            return "center" if (row, col) == ("middle", "center") else f"{row} {col}"
        if qtype == "exists":
            return "yes" if any((o["color"], o["shape"]) == (g[0], g[1]) for o in objects) else "no"
    raise AssertionError(f"unknown question template: {question!r}")


def test_test_answers_match_scenes(world):
    scenes = scenes_by_image(world, "test")
    for qtype in shapes.QTYPES:
        for r in read_jsonl(world / "test" / f"{qtype}.jsonl"):
            objects = scenes[r["image"]]
            assert expected_answer(r["question"], objects) == r["answer"], r
            if r.get("negative_kind") == "adversarial":
                color, shape = re.fullmatch(rf"is there a {WORD} {WORD}\?", r["question"]).groups()
                assert any(o["color"] == color or o["shape"] == shape for o in objects)


def test_train_and_val_answers_match_scenes(world):
    for split in ("train", "val"):
        scenes = scenes_by_image(world, split)
        for row in json.loads((world / f"{split}.json").read_text()):
            conv = row["conversations"]
            qtypes = []
            for human, gpt in zip(conv[::2], conv[1::2]):
                question = human["value"].removeprefix("<image>\n")
                assert expected_answer(question, scenes[row["image"]]) == gpt["value"]
                qtypes.append(next(q for q, p in PATTERNS if re.fullmatch(p, question)))
            assert len(qtypes) == len(set(qtypes))  # at most one question per type


def test_captions_pairs_and_corpus_text(world):
    scenes = scenes_by_image(world, "test")
    pairs = read_jsonl(world / "pairs.jsonl")
    assert [p["image"] for p in pairs] == list(scenes)
    for p in pairs:
        objects = scenes[p["image"]]
        assert p["labels"]["count"] == str(len(objects))
        assert (p["labels"]["first_color"], p["labels"]["first_shape"]) == (
            objects[0]["color"], objects[0]["shape"])
        colors = [o["color"] for o in objects]
        assert colors.count(p["labels"]["dominant_color"]) == max(Counter(colors).values())
        assert p["caption"].startswith(f"there {'is' if len(objects) == 1 else 'are'} {len(objects)} shape")
        for o in objects:
            assert f"a {o['color']} {o['shape']} at the {o['position']}." in p["caption"]
    # a small, clean vocabulary: lower-case words, digits, "." and "?" only
    texts = [r["text"] for r in read_jsonl(world / "corpus.jsonl")] + [p["caption"] for p in pairs]
    for name in ("train.json", "val.json"):
        texts += [t["value"].removeprefix("<image>\n") for r in json.loads((world / name).read_text())
                  for t in r["conversations"]]
    vocab = set()
    for text in texts:
        assert re.fullmatch(r"[a-z0-9 .?]+", text), text
        vocab |= set(text.replace(".", " .").replace("?", " ?").split())
    assert len(vocab) < 80


def test_every_pair_has_other_wordings_of_its_scene_and_one_question_it_answers(world):
    """What the authors' protocol reads (docs/analysis.md): several captions of one image, stating the same facts in
    other words and orders, and the sample's own question, answered by its scene."""
    scenes = scenes_by_image(world, "test")
    pairs = read_jsonl(world / "pairs.jsonl")
    qtypes = Counter()
    for p in pairs:
        objects = scenes[p["image"]]
        assert len(p["captions"]) == 3 and p["captions"][0] == p["caption"]
        assert len(set(p["captions"])) == 3 and len({c.split()[0] for c in p["captions"]}) == 3  # other first words
        count = "1 shape" if len(objects) == 1 else f"{len(objects)} shapes"
        for text in p["captions"]:
            assert count in text, text
            for o in objects:
                assert f"{o['color']} {o['shape']} at the {o['position']}" in text or \
                    f"at the {o['position']} is a {o['color']} {o['shape']}" in text, (o, text)
            assert len(re.findall(r"\ba (?:red|green|blue|yellow|purple) ", text)) == len(objects), text
        assert expected_answer(p["question"], objects) == p["answer"]
        assert next(q for q, pattern in PATTERNS if re.fullmatch(pattern, p["question"])) == p["qtype"]
        qtypes[p["qtype"]] += 1
    assert len(qtypes) >= 4, qtypes  # the question's type varies from pair to pair


def test_scene_geometry_and_pixels(world):
    size = json.loads((world / "world.json").read_text())["args"]["image_size"]
    edges = [-((-k * size) // 3) for k in range(4)]
    for split in shapes.SPLITS:
        for image, objects in scenes_by_image(world, split).items():
            img = Image.open(world / "images" / image)
            assert img.size == (size, size) and img.mode == "RGB"
            assert 1 <= len(objects) <= 4
            assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
            assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
            for o in objects:
                (cx, cy), half = o["center"], o["size"] // 2
                assert img.getpixel((cx, cy)) == shapes.COLORS[o["color"]]
                # the whole shape stays inside its own cell
                assert edges[o["col"]] <= cx - half and cx + half < edges[o["col"] + 1]
                assert edges[o["row"]] <= cy - half and cy + half < edges[o["row"] + 1]
                assert 0.5 <= o["size"] / (size / 3) <= 0.85


# ---- units ---------------------------------------------------------------------------
def test_position_names_and_relation():
    assert shapes.position_name(1, 1, 3) == "center"
    assert shapes.position_name(0, 1, 3) == "top center"
    assert shapes.position_name(1, 0, 3) == "middle left"
    assert shapes.position_name(1, 1, 2) == "bottom right"
    def obj(r, c):
        return shapes.ShapeObject(r, c, "red", "circle", 0, 0, 5)

    assert shapes.relation(obj(0, 0), obj(0, 2)) == "left"
    assert shapes.relation(obj(2, 1), obj(0, 2)) == "below"
    assert shapes.relation(obj(0, 0), obj(1, 1)) is None


def test_other_grid_and_bad_args(tmp_path):
    shapes.generate_world(tmp_path / "g2", seed=1, n_train=8, n_val=2, n_test=4,
                          image_size=32, grid=2, max_objects=3, progress=False)
    summary = json.loads((tmp_path / "g2" / "world.json").read_text())
    assert summary["question_types"]["count"]["choices"] == ["1", "2", "3"]
    with pytest.raises(ValueError):
        shapes.generate_world(tmp_path / "bad", max_objects=10, grid=3, progress=False)


def test_one_object_scenes_reach_the_test_split(tmp_path):
    # 4000 train images would use up all 135 one-object scenes; a reserved third keeps count "1" testable.
    shapes.generate_world(tmp_path, seed=0, n_train=4000, n_val=10, n_test=300, progress=False)
    train = [json.loads(line) for line in (tmp_path / "scenes_train.jsonl").read_text().splitlines()]
    count_lines = (tmp_path / "test" / "count.jsonl").read_text().splitlines()
    test_counts = Counter(json.loads(line)["answer"] for line in count_lines)
    assert test_counts["1"] >= 30
    for scene in train:  # train never draws a reserved scene
        sig = tuple(sorted((o["row"], o["col"], o["color"], o["shape"]) for o in scene["objects"]))
        assert not shapes.held_out(sig, 3)
