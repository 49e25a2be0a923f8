"""The "shapes world": a seeded synthetic image world of coloured shapes on a grid.

It exists so that tiny LLaVA-style models can be trained from scratch on CPU, evaluated
offline (the test JSONL files feed lmms-eval tasks) and probed for representation geometry.
Everything is derived from one seed and written deterministically, so the same arguments
always give a byte-identical output tree.

    python -m midtune.shapes --out DIR --seed 0 --n-train 4000 --n-val 200 --n-test 300

Output layout under DIR (image paths inside the JSON files are relative to DIR/images):

    images/{split}/{split}_{index:06d}.png
    train.json, val.json                 LLaVA conversations, one multi-turn sample per image
    captions_train.json, captions_val.json   "<image>\\nDescribe the image." -> caption
    test/{qtype}.jsonl                   benchmark questions (color, shape, count, position, exists)
    scenes_{split}.jsonl                 ground-truth scene description of every image
    pairs.jsonl                          test image + caption + labels, for geometry analysis; also the same
                                         scene in other words (captions) and one question about it (question,
                                         answer, qtype), for the authors' protocol (docs/analysis.md)
    corpus.jsonl                         text-only corpus for language pretraining
    scenes_in_words.json                 text-only conversations: a scene as one word per grid cell -> its caption
    questions_in_words.json              text-only conversations: a scene in cell words -> answers to its colour,
                                         shape and existence questions (WORD_QTYPES)
    world.json                           summary of all of the above
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from midtune.files import cache_dir, read_jsonl

try:  # a progress bar is nice to have, never required
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

FORMAT_VERSION = 1
# spawn key of the analysis pairs' own random stream; the splits' streams are SeedSequence(seed).spawn(3), keys 0-2
PAIRS_STREAM = 100

# ---------------------------------------------------------------------------------------
# The world's fixed vocabulary. Orders matter: they define the "choices" lists and the
# meaning of the integers drawn from the rng, so changing them changes every output.
# ---------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QTYPES: tuple[str, ...] = ("color", "shape", "count", "position", "exists")
# The question types of questions_in_words.json, the text-only data that taught a random-init tiny LLM the reply
# format and the answer words (stage A of the earlier demo, before it used the pretrained SmolLM2); count and
# position were left for visual instruction tuning to teach (taught in words too, the base already counted at 97 %).
WORD_QTYPES: tuple[str, ...] = ("color", "shape", "exists")
SPLITS: tuple[str, ...] = ("train", "val", "test")
BACKGROUND = (255, 255, 255)

# Row/column names per grid size; every name is made of plain lower-case words.
ROW_NAMES: dict[int, tuple[str, ...]] = {
    2: ("top", "bottom"),
    3: ("top", "middle", "bottom"),
    4: ("top", "upper", "lower", "bottom"),
    5: ("top", "upper", "middle", "lower", "bottom"),
}
COL_NAMES: dict[int, tuple[str, ...]] = {
    2: ("left", "right"),
    3: ("left", "center", "right"),
    4: ("far left", "left", "right", "far right"),
    5: ("far left", "left", "center", "right", "far right"),
}

# Object size as a fraction of the cell, and centre jitter as a fraction of the cell.
SIZE_RANGE = (0.60, 0.75)
JITTER_FRACTION = 0.12
# Resampling budget for val/test scenes that collide with a train scene: first keep the
# drawn object count (so the count distribution stays as uniform as the space allows),
# then redraw the count too (e.g. when every 1-object scene already occurs in train).
KEEP_COUNT_TRIES = 100
MAX_TRIES = 10_000


def choices_for(qtype: str, max_objects: int, grid: int) -> list[str]:
    """All valid answers of a question type, in their fixed order (positions in reading order)."""
    return {
        "color": list(COLOR_NAMES),
        "shape": list(SHAPES),
        "count": [str(k) for k in range(1, max_objects + 1)],
        "position": [position_name(r, c, grid) for r in range(grid) for c in range(grid)],
        "exists": ["yes", "no"],
    }[qtype]


# ---------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeObject:
    row: int
    col: int
    color: str
    shape: str
    cx: int  # centre pixel (x, y); always covered by the drawn shape
    cy: int
    size: int  # side of the (inclusive) bounding box in pixels, always odd

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


Scene = tuple[ShapeObject, ...]  # objects in reading order (row-major)


def scene_signature(scene: Scene) -> tuple[tuple[int, int, str, str], ...]:
    """What makes two scenes "the same" for split deduplication (jitter/size ignored)."""
    return tuple(sorted((o.row, o.col, o.color, o.shape) for o in scene))


def held_out(signature: tuple, grid: int) -> bool:
    """One-object scenes reserved for val/test. A few thousand train images would otherwise use up every
    one-object scene (grid² × colours × shapes of them), leaving held-out splits without a count of 1."""
    if len(signature) != 1:
        return False
    row, col, color, shape = signature[0]
    return (row * grid + col + COLOR_NAMES.index(color) + SHAPES.index(shape)) % 3 == 0


def _cell_edges(image_size: int, grid: int) -> list[int]:
    """Pixel boundaries of the grid cells: cell k covers pixels edges[k] .. edges[k+1]-1."""
    return [-((-k * image_size) // grid) for k in range(grid + 1)]  # exact integer ceil


def sample_scene(
    rng: np.random.Generator, image_size: int, grid: int, max_objects: int, n: int | None = None
) -> Scene:
    """Draw one scene: n objects (uniform 1..max_objects unless given) in distinct cells."""
    if n is None:
        n = int(rng.integers(1, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
    edges = _cell_edges(image_size, grid)
    cell = image_size / grid
    min_cell_px = min(b - a for a, b in pairwise(edges))
    # Cap the half size so the shape always fits its cell with at least 1 px of play.
    max_half = max(1, (min_cell_px - 1) // 2 - 1)
    jitter = max(1, int(cell * JITTER_FRACTION))
    objects = []
    for c in cells:
        row, col = divmod(c, grid)
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        target = float(rng.uniform(*SIZE_RANGE)) * cell
        half = min(max_half, max(1, int(np.floor((target - 1) / 2 + 0.5))))
        centre = []
        for k in (col, row):  # x from the column, y from the row
            lo, hi = edges[k] + half, edges[k + 1] - 1 - half  # centre range inside the cell
            base = min(max((edges[k] + edges[k + 1] - 1) // 2, lo), hi)
            centre.append(int(rng.integers(max(lo, base - jitter), min(hi, base + jitter) + 1)))
        objects.append(ShapeObject(row, col, color, shape, centre[0], centre[1], 2 * half + 1))
    return tuple(objects)


def sample_unique_scene(
    rng: np.random.Generator,
    image_size: int,
    grid: int,
    max_objects: int,
    forbidden,
) -> Scene:
    """Draw a scene whose signature is not forbidden (`forbidden(signature)` is true)."""
    n = int(rng.integers(1, max_objects + 1))
    for attempt in range(MAX_TRIES):
        keep_n = n if attempt < KEEP_COUNT_TRIES else None
        scene = sample_scene(rng, image_size, grid, max_objects, n=keep_n)
        if not forbidden(scene_signature(scene)):
            return scene
    raise RuntimeError(
        f"could not draw a scene that is not in train after {MAX_TRIES} tries; "
        "the world is too small for this n_train (raise --grid/--max-objects or lower --n-train)"
    )


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene on a white canvas (no antialiasing, so pixel colours are exact)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene:
        h = o.size // 2
        box = [o.cx - h, o.cy - h, o.cx + h, o.cy + h]
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # upward triangle; its bounding-box centre is inside it
            draw.polygon([(o.cx, o.cy - h), (o.cx + h, o.cy + h), (o.cx - h, o.cy + h)], fill=fill)
    return img


def save_png(img: Image.Image, path: Path) -> None:
    # Fixed settings and no metadata chunks, so the bytes depend only on the pixels.
    img.save(path, format="PNG", optimize=False, compress_level=6)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------
def position_name(row: int, col: int, grid: int) -> str:
    """E.g. "top left", "middle right", and "center" for the middle cell of odd grids."""
    r, c = ROW_NAMES[grid][row], COL_NAMES[grid][col]
    return "center" if (r, c) == ("middle", "center") else f"{r} {c}"


def _there_are(n: int, noun: str) -> str:
    return f"there is 1 {noun}." if n == 1 else f"there are {n} {noun}s."


def caption(scene: Scene, grid: int) -> str:
    """E.g. "there are 2 shapes. a red circle at the top left. a blue square at the center." """
    parts = [_there_are(len(scene), "shape")]
    parts += [f"a {o.color} {o.shape} at the {position_name(o.row, o.col, grid)}." for o in scene]
    return " ".join(parts)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_phrasings(scene: Scene, grid: int, rng: np.random.Generator) -> list[str]:
    """The scene in three wordings that state the same facts: the caption itself, the objects first (in an
    rng-drawn order) with the count after them, and position-first sentences (another order). Real data sets give
    an image several captions (COCO: five); the authors' textual twin lists them all. Their first words differ,
    unlike the captions', which all start with "there"."""
    objects = [f"a {o.color} {o.shape}" for o in scene]
    where = [position_name(o.row, o.col, grid) for o in scene]
    count = "1 shape" if len(scene) == 1 else f"{len(scene)} shapes"
    first, second = rng.permutation(len(scene)), rng.permutation(len(scene))
    objects_first = f"{_join([f'{objects[i]} at the {where[i]}' for i in first])}; {count} in all."
    places_first = " ".join([f"the image shows {count}."] + [f"at the {where[i]} is {objects[i]}." for i in second])
    return [caption(scene, grid), objects_first, places_first]


def pair_question(scene: Scene, rng: np.random.Generator, grid: int) -> dict:
    """One question about the scene for its analysis pair, its type drawn uniformly from those the scene can ask
    unambiguously (canonical wording, as in the benchmark files). "how many shapes are there?" always applies."""
    makers = {"color": lambda: color_question(scene, rng), "shape": lambda: shape_question(scene, rng),
              "count": lambda: count_question(scene, rng), "position": lambda: position_question(scene, rng, grid),
              "exists": lambda: exists_question(scene, rng, positive=bool(rng.random() < 0.5))}
    order = [QTYPES[int(i)] for i in rng.permutation(len(QTYPES))]
    for qtype in order:
        q = makers[qtype]()
        if q is not None:
            return {"question": q["question"], "answer": q["answer"], "qtype": qtype}
    raise AssertionError("count_question always applies")  # pragma: no cover


def relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """Where a is relative to b, along the axis with the larger grid difference (None on ties)."""
    drow, dcol = a.row - b.row, a.col - b.col
    if abs(dcol) > abs(drow):
        return "left" if dcol < 0 else "right"
    if abs(drow) > abs(dcol):
        return "above" if drow < 0 else "below"
    return None  # same cell or exact diagonal: no single answer


_RELATION_PHRASE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def _kind_order(kind: tuple[str, str]) -> tuple[int, int]:
    return (COLOR_NAMES.index(kind[0]), SHAPES.index(kind[1]))


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


# Each question generator returns None when the type has no unambiguous question for the
# scene, else a dict with question/answer (+ extra fields). `alt` allows a second phrasing
# (train only); the canonical phrasing is always the first template.
def color_question(scene: Scene, rng: np.random.Generator, alt: bool = False) -> dict | None:
    counts = Counter(o.shape for o in scene)
    candidates = [s for s in SHAPES if counts[s] == 1]  # "the {shape}" must name one object
    if not candidates:
        return None
    shape = _pick(rng, candidates)
    templates = ["what color is the {s}?", "what is the color of the {s}?"]
    template = _pick(rng, templates) if alt else templates[0]
    answer = next(o.color for o in scene if o.shape == shape)
    return {"question": template.format(s=shape), "answer": answer}


def shape_question(scene: Scene, rng: np.random.Generator, alt: bool = False) -> dict | None:
    counts = Counter(o.color for o in scene)
    candidates = [c for c in COLOR_NAMES if counts[c] == 1]
    if not candidates:
        return None
    color = _pick(rng, candidates)
    templates = ["what shape is the {c} object?", "which shape is {c}?"]
    template = _pick(rng, templates) if alt else templates[0]
    answer = next(o.shape for o in scene if o.color == color)
    return {"question": template.format(c=color), "answer": answer}


def count_question(scene: Scene, rng: np.random.Generator, alt: bool = False) -> dict | None:
    if alt:  # train: also count one colour that is present (so the answer is >= 1)
        variant = int(rng.integers(3))
        if variant == 2:
            color = _pick(rng, sorted({o.color for o in scene}, key=COLOR_NAMES.index))
            n = sum(o.color == color for o in scene)
            return {"question": f"how many {color} shapes are there?", "answer": str(n)}
        if variant == 1:
            return {"question": "how many objects are in the image?", "answer": str(len(scene))}
    return {"question": "how many shapes are there?", "answer": str(len(scene))}


def position_question(scene: Scene, rng: np.random.Generator, grid: int, alt: bool = False) -> dict | None:
    """Where one named object is in the image: its cell's name ("top left", "center", ...).

    Absolute, not relative to a second object: an 8-layer, width-128 LLM did not learn the two-object relation
    (left/right/above/below along the larger grid difference) at the demo's budget, not even from scenes in words
    (30 % after 1,500 steps on 1-4 objects, chance 25 %), so it could not show what instruction tuning teaches."""
    kinds = Counter(o.kind for o in scene)
    unique = [o for o in scene if kinds[o.kind] == 1]  # "the red circle" must name one object
    if not unique:
        return None
    o = _pick(rng, unique)
    templates = ["where is the {c} {s}?", "where in the image is the {c} {s}?"]
    template = _pick(rng, templates) if alt else templates[0]
    return {"question": template.format(c=o.color, s=o.shape), "answer": position_name(o.row, o.col, grid)}


def exists_question(
    scene: Scene, rng: np.random.Generator, positive: bool, alt: bool = False
) -> dict | None:
    """A yes/no question; negatives are "random" (any absent combination) or "adversarial"
    (absent combination sharing a colour or shape with the scene, as in POPE)."""
    present = {o.kind for o in scene}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    extra: dict = {"category": "positive" if positive else "negative"}
    if positive:
        color, shape = _pick(rng, sorted(present, key=_kind_order))
    elif not absent:  # only possible in big grids where every combination is present
        return None
    else:
        colors, shapes = {k[0] for k in present}, {k[1] for k in present}
        adversarial = [k for k in absent if k[0] in colors or k[1] in shapes]
        kind = "adversarial" if rng.random() < 0.5 and adversarial else "random"
        color, shape = _pick(rng, adversarial if kind == "adversarial" else absent)
        extra["negative_kind"] = kind
    templates = ["is there a {c} {s}?", "does the image contain a {c} {s}?"]
    template = _pick(rng, templates) if alt else templates[0]
    return {"question": template.format(c=color, s=shape), "answer": "yes" if positive else "no", **extra}


def conversation_questions(scene: Scene, rng: np.random.Generator, grid: int, alt: bool) -> list[dict]:
    """One question of every applicable type, in rng-shuffled order (train/val samples)."""
    qs = {
        "color": color_question(scene, rng, alt),
        "shape": shape_question(scene, rng, alt),
        "count": count_question(scene, rng, alt),
        "position": position_question(scene, rng, grid, alt),
        "exists": exists_question(scene, rng, positive=bool(rng.random() < 0.5), alt=alt),
    }
    qs = [{**q, "qtype": qtype} for qtype, q in qs.items() if q is not None]
    kept: list[dict] = []
    for q in (qs[i] for i in rng.permutation(len(qs))):
        if not any(_gives_away(q, other) or _gives_away(other, q) for other in kept):
            kept.append(q)
    return kept


def _gives_away(q: dict, other: dict) -> bool:
    """Whether `other`'s question text contains `q`'s answer ("what shape is the purple object?" gives away
    "what color is the triangle?" → purple). Packed into one conversation, such a pair teaches the model to copy
    answers from the context instead of reading the image."""
    return q["answer"] in other["question"].rstrip("?").split()


def conversation(turns: list[tuple[str, str]], context: str) -> list[dict]:
    """LLaVA conversation turns; `context` (the image placeholder or a scene in words) opens the first one."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": (context if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return conversations


def llava_row(sample_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    """LLaVA conversation row; "<image>\\n" goes only in the first human turn."""
    return {"id": sample_id, "image": image, "conversations": conversation(turns, "<image>\n")}


CAPTION_PROMPT = "Describe the image."

# The world the demo trains on and whose test split backs the offline eval tasks. 48 px on a 3 × 3 grid makes
# every cell 16 px: with 16 px patches each image token sees exactly one cell.
CANONICAL = dict(seed=0, n_train=4000, n_val=200, n_test=300, image_size=48, grid=3, max_objects=4)


def cell_words(scene: Scene, grid: int) -> str:
    """The scene as one word per grid cell in reading order: "empty redcircle empty ... bluesquare"."""
    by_cell = {(o.row, o.col): f"{o.color}{o.shape}" for o in scene}
    return " ".join(by_cell.get((r, c), "empty") for r in range(grid) for c in range(grid))


def facts_text(scene: Scene, rng: np.random.Generator, grid: int) -> str:
    """A few true sentences about a scene plus vocabulary facts, in rng order."""
    sentences = [_there_are(len(scene), "shape")]
    o = _pick(rng, list(scene))
    sentences.append(f"a {o.color} {o.shape} is at the {position_name(o.row, o.col, grid)}.")
    pairs = [(a, b) for a in scene for b in scene if a is not b and relation(a, b)]
    if pairs:
        a, b = _pick(rng, pairs)
        rel = _RELATION_PHRASE[relation(a, b)]
        sentences.append(f"a {a.color} {a.shape} is {rel} a {b.color} {b.shape}.")
    color = _pick(rng, sorted({o.color for o in scene}, key=COLOR_NAMES.index))
    sentences.append(_there_are(sum(o.color == color for o in scene), f"{color} shape"))
    # The cell words of `cell_words` spelled out, so the language model knows what "redcircle" means.
    sentences += [f"{o.color}{o.shape} is a {o.color} {o.shape}." for o in scene]
    sentences.append(f"{_pick(rng, list(COLOR_NAMES))} is a color.")
    sentences.append(f"{_pick(rng, list(SHAPES))} is a shape.")
    keep = int(rng.integers(2, len(sentences) + 1))
    order = rng.permutation(len(sentences))[:keep]
    return " ".join(sentences[i] for i in order)


def pair_labels(scene: Scene) -> dict[str, str]:
    """Categorical labels of a scene (dominant = most frequent, ties -> reading order)."""

    def dominant(values: list[str]) -> str:
        counts = Counter(values)
        return max(values, key=lambda v: (counts[v], -values.index(v)))

    return {
        "dominant_color": dominant([o.color for o in scene]),
        "dominant_shape": dominant([o.shape for o in scene]),
        "count": str(len(scene)),
        "first_color": scene[0].color,
        "first_shape": scene[0].shape,
    }


def scene_record(sample_id: str, image: str, scene: Scene, grid: int) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "objects": [
            {
                "row": o.row,
                "col": o.col,
                "position": position_name(o.row, o.col, grid),
                "color": o.color,
                "shape": o.shape,
                "center": [o.cx, o.cy],
                "size": o.size,
            }
            for o in scene
        ],
    }


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2) + "\n", encoding="utf-8", newline="\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled and _tqdm is not None:
        return _tqdm(iterable, total=total, desc=desc, leave=False)
    return iterable


def _validate(image_size: int, grid: int, max_objects: int, counts: dict[str, int]) -> None:
    if grid not in ROW_NAMES:
        raise ValueError(f"grid must be one of {sorted(ROW_NAMES)}, got {grid}")
    if not 1 <= max_objects <= grid * grid:
        raise ValueError(f"max_objects must be in 1..{grid * grid}, got {max_objects}")
    if image_size < 8 * grid:
        raise ValueError(f"image_size must be at least {8 * grid} px for grid {grid}")
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")


def generate_world(
    out_dir,
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 200,
    n_test: int = 300,
    image_size: int = 48,
    grid: int = 3,
    max_objects: int = 4,
    progress: bool = True,
) -> dict:
    """Generate the whole world under `out_dir`; returns the summary also saved as world.json."""
    _validate(image_size, grid, max_objects, {"n_train": n_train, "n_val": n_val, "n_test": n_test})
    out = Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}

    # Independent streams per split (and per purpose inside a split), so e.g. changing
    # n_test never changes train, and the corpus never sees val/test randomness.
    # Each split gets a scene stream and a text (question) stream; train also owns the
    # corpus stream.
    split_ss = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS))))
    children = {split: ss.spawn(3 if split == "train" else 2) for split, ss in split_ss.items()}
    rngs = {split: np.random.default_rng(c[0]) for split, c in children.items()}
    text_rngs = {split: np.random.default_rng(c[1]) for split, c in children.items()}
    corpus_rng = np.random.default_rng(children["train"][2])

    # --- scenes: train first, then val/test avoiding every train signature -------------
    scenes: dict[str, list[Scene]] = {}
    scenes["train"] = [
        sample_unique_scene(rngs["train"], image_size, grid, max_objects, lambda sig: held_out(sig, grid))
        for _ in range(n_train)
    ]
    train_sigs = {scene_signature(s) for s in scenes["train"]}
    for split in ("val", "test"):
        scenes[split] = [
            sample_unique_scene(rngs[split], image_size, grid, max_objects, train_sigs.__contains__)
            for _ in range(sizes[split])
        ]

    # --- images and scene descriptions ------------------------------------------------
    files: dict[str, int] = {}
    for split in SPLITS:
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        for stale in img_dir.glob(f"{split}_*.png"):  # a smaller rerun must not leave extras
            stale.unlink()
        records = []
        for i, scene in _progress(enumerate(scenes[split]), len(scenes[split]), split, progress):
            sid = f"{split}_{i:06d}"
            save_png(render_scene(scene, image_size), img_dir / f"{sid}.png")
            records.append(scene_record(sid, f"{split}/{sid}.png", scene, grid))
        _write_jsonl(out / f"scenes_{split}.jsonl", records)
        files[f"scenes_{split}.jsonl"] = len(records)
        files[f"images/{split}"] = len(records)

    # --- train/val: LLaVA conversations and captions ----------------------------------
    for split in ("train", "val"):
        rows, caps = [], []
        for i, scene in enumerate(scenes[split]):
            sid, image = f"{split}_{i:06d}", f"{split}/{split}_{i:06d}.png"
            qs = conversation_questions(scene, text_rngs[split], grid, alt=(split == "train"))
            rows.append(llava_row(sid, image, [(q["question"], q["answer"]) for q in qs]))
            caps.append(llava_row(sid, image, [(CAPTION_PROMPT, caption(scene, grid))]))
        _write_json(out / f"{split}.json", rows)
        _write_json(out / f"captions_{split}.json", caps)
        files[f"{split}.json"] = len(rows)
        files[f"captions_{split}.json"] = len(caps)

    # --- test: one benchmark file per question type -----------------------------------
    (out / "test").mkdir(parents=True, exist_ok=True)
    bench: dict[str, list[dict]] = {q: [] for q in QTYPES}
    generators = {"color": color_question, "shape": shape_question,
                  "count": count_question,
                  "position": lambda scene, rng: position_question(scene, rng, grid)}
    rng = text_rngs["test"]
    for i, scene in enumerate(scenes["test"]):
        sid, image = f"test_{i:06d}", f"test/test_{i:06d}.png"
        for qtype, make in generators.items():
            q = make(scene, rng)
            if q is not None:
                bench[qtype].append({"id": f"{sid}_{qtype}", "image": image, "qtype": qtype,
                                     "choices": choices_for(qtype, max_objects, grid), **q})
        # Exactly one yes and one no per image (or neither), so yes/no stays balanced.
        pos, neg = (exists_question(scene, rng, positive=p) for p in (True, False))
        for q in (pos, neg) if neg is not None else ():
            bench["exists"].append({"id": f"{sid}_exists_{q['category']}", "image": image,
                                    "qtype": "exists", "choices": choices_for("exists", max_objects, grid),
                                    **q})
    for qtype, rows in bench.items():
        _write_jsonl(out / "test" / f"{qtype}.jsonl", rows)
        files[f"test/{qtype}.jsonl"] = len(rows)

    # --- pairs for representation analysis --------------------------------------------
    # Their other wordings and questions come from a stream of their own (PAIRS_STREAM), so adding them changed
    # no other file of a world of the same seed.
    pairs_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PAIRS_STREAM,)))
    pairs = []
    for i, scene in enumerate(scenes["test"]):
        captions = caption_phrasings(scene, grid, pairs_rng)
        pairs.append({"id": f"test_{i:06d}", "image": f"test/test_{i:06d}.png", "caption": captions[0],
                      "captions": captions, **pair_question(scene, pairs_rng, grid), "labels": pair_labels(scene)})
    _write_jsonl(out / "pairs.jsonl", pairs)
    files["pairs.jsonl"] = len(pairs)

    # --- text-only corpus: fresh scenes from the train lineage, alternating caption/facts
    corpus = []
    for i in range(2 * n_train):
        scene = sample_scene(corpus_rng, image_size, grid, max_objects)
        text = caption(scene, grid) if i % 2 == 0 else facts_text(scene, corpus_rng, grid)
        corpus.append({"id": f"corpus_{i:06d}", "text": text})
    _write_jsonl(out / "corpus.jsonl", corpus)
    files["corpus.jsonl"] = len(corpus)

    # --- scenes in words: text-only conversations captioning a scene given as one word per grid cell.
    # A language model pretrained on these knows the world's concepts in text, the way a real LLM knows
    # colours and shapes; alignment then only has to map each image patch onto its cell's word.
    scenes_in_words = []
    for i in range(n_train):
        scene = sample_scene(corpus_rng, image_size, grid, max_objects)
        scenes_in_words.append({"id": f"words_{i:06d}", "conversations": conversation(
            [(CAPTION_PROMPT, caption(scene, grid))], f"{cell_words(scene, grid)}\n")})
    _write_json(out / "scenes_in_words.json", scenes_in_words)
    files["scenes_in_words.json"] = len(scenes_in_words)

    # --- questions in words: the train questions about a scene given in cell words, answered in the chat format.
    # A chat LLM (Vicuna under LLaVA) already answers "blue" or "yes" as a reply; a tiny LLM that never saw those
    # answer tokens at the start of a reply has untrained, near-identical output rows for them, and visual
    # instruction tuning of the decoder layers alone cannot pull them apart.
    questions_in_words = []
    for i in range(n_train):
        scene = sample_scene(corpus_rng, image_size, grid, max_objects)
        qs = [q for q in conversation_questions(scene, corpus_rng, grid, alt=True) if q["qtype"] in WORD_QTYPES]
        turns = [(q["question"], q["answer"]) for q in qs]
        if not turns:
            continue
        questions_in_words.append({"id": f"qwords_{i:06d}",
                                   "conversations": conversation(turns, f"{cell_words(scene, grid)}\n")})
    _write_json(out / "questions_in_words.json", questions_in_words)
    files["questions_in_words.json"] = len(questions_in_words)

    summary = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "args": {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                 "image_size": image_size, "grid": grid, "max_objects": max_objects},
        "colors": list(COLOR_NAMES),
        "color_rgb": {c: list(rgb) for c, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "grid": {"size": grid, "rows": list(ROW_NAMES[grid]), "cols": list(COL_NAMES[grid])},
        "question_types": {q: {"choices": choices_for(q, max_objects, grid)} for q in QTYPES},
        "counts": files,
    }
    _write_json(out / "world.json", summary)
    return summary


def generator_hash() -> str:
    """SHA-256 of this file: data written by another version of the generator is stale."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# The canonical world on disk (the eval tasks' data, analysis's default world)
# ---------------------------------------------------------------------------------------
class ShapesDataError(RuntimeError):
    """The canonical world could not be generated into its directory."""


GENERATOR_FILE = "generator.sha256"  # hash of midtune/shapes.py that wrote the data: new generator → new data


def canonical_world_problem(data_dir: Path) -> str | None:
    """Why `data_dir` does not hold the canonical world's test data (None when it does)."""
    world = data_dir / "world.json"
    if not world.is_file():
        return f"{world} does not exist"
    try:
        args = json.loads(world.read_text())["args"]
    except (ValueError, KeyError) as e:
        return f"{world} is unreadable ({e})"
    if args != CANONICAL:
        return f"{world} has arguments {args}, not the canonical {CANONICAL}"
    marker = data_dir / GENERATOR_FILE
    if not marker.is_file() or marker.read_text().strip() != generator_hash():
        return "it was written by another version of midtune/shapes.py"
    for qtype in QTYPES:
        path = data_dir / "test" / f"{qtype}.jsonl"
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path} is missing or empty"
    _, first = next(read_jsonl(data_dir / "test" / "color.jsonl"))
    if not (data_dir / "images" / first["image"]).is_file():
        return f"image {first['image']} of {data_dir / 'test' / 'color.jsonl'} is missing"
    return None


def ensure_canonical_world(data_dir: str | Path, progress: bool = True) -> Path:
    """Make sure `data_dir` holds the canonical shapes world (generating it if missing, incomplete or generated
    with other arguments); returns the directory. Safe to call from concurrent processes."""
    from filelock import FileLock

    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if canonical_world_problem(data_dir) is None:
        return data_dir
    with FileLock(str(data_dir.parent / f".{data_dir.name}.lock")):
        problem = canonical_world_problem(data_dir)  # another process may have generated it meanwhile
        if problem is None:
            return data_dir
        if progress:
            print(f"generating the canonical shapes world in {data_dir} ({problem})", flush=True)
        tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_world(tmp, progress=progress, **CANONICAL)
            (tmp / GENERATOR_FILE).write_text(generator_hash() + "\n")
            if data_dir.exists():
                shutil.rmtree(data_dir)
            os.replace(tmp, data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    problem = canonical_world_problem(data_dir)
    if problem is not None:  # pragma: no cover - generate_world itself failed silently
        raise ShapesDataError(f"the shapes world in {data_dir} is still not usable after generating it: {problem}")
    return data_dir


def default_world_dir() -> Path:
    """Where tools that need the canonical world and are given none keep it: $MIDTUNE_CACHE/shapes-canonical
    (default ~/.cache/midtune). The eval tasks keep their own copy beside their YAMLs."""
    return cache_dir("shapes-canonical")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m midtune.shapes", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--image-size", type=int, default=48, help="image side in pixels (48 = 3 cells of 16 px)")
    p.add_argument("--grid", type=int, default=3, help="grid side (cells per row/column)")
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    try:  # report bad arguments as usage errors; anything later is a real bug
        _validate(a.image_size, a.grid, a.max_objects,
                  {"--n-train": a.n_train, "--n-val": a.n_val, "--n-test": a.n_test})
    except ValueError as e:
        p.error(str(e))
    summary = generate_world(a.out, seed=a.seed, n_train=a.n_train, n_val=a.n_val,
                             n_test=a.n_test, image_size=a.image_size, grid=a.grid,
                             max_objects=a.max_objects, progress=not a.no_progress)
    print(f"shapes world (seed {a.seed}) written to {Path(a.out).resolve()}")
    for name, n in summary["counts"].items():
        print(f"  {name:<24} {n:>7} {'images' if name.startswith('images/') else 'rows'}")
    print("  world.json               summary")
    return summary


if __name__ == "__main__":
    main()
