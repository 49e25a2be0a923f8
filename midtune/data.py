"""Visual instruction data: LLaVA conversation files → tokenised, label-masked, padded batches.

Input formats
  * JSON list or JSONL of rows `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}` with an
    `<image>` placeholder in the human turn(s) where each image goes (`image` may be a list for several).
  * Text rows `{"id", "text"}` (language pretraining: every token is a label).
  * A Hugging Face `datasets` directory (`save_to_disk`) with the same columns; its `image` column may hold
    decoded images instead of paths.

How a sample is built
  1. The conversation becomes chat messages and is rendered with the processor's own chat template.
  2. Assistant spans are found by rendering growing prefixes of the conversation (the text a turn adds after
     the generation prompt is that turn's answer, end-of-turn marker included), so any prefix-stable chat
     template works without knowing its markers.
  3. The unexpanded text is tokenised with offsets; tokens inside assistant spans are labels, the rest -100.
  4. The processor expands each image placeholder into a run of image tokens; the run lengths are taken from
     its output and the label mask is expanded to match, then checked token for token against it.
Truncation to `max_length` never cuts through an image's tokens: such a sample is skipped or an error.

Every row is validated before training starts; a bad row is an error naming file and row, or with
`on_bad_sample="skip"` it is skipped and counted in `DataSummary`. Never silent.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
from PIL import Image

from midtune.files import read_jsonl, write_json
from midtune.images import fit_images, fitted_size

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_CACHED = 200_000  # samples whose rendered text the dataset keeps in memory by default
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Processor outputs aligned with input_ids (padded like attention_mask); everything else is vision input.
TOKEN_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


class BadSample(DataError):
    def __init__(self, source: str, row: int, sample_id: Any, reason: str, kind: str):
        self.kind = kind  # short class of the problem, for the skip summary
        self.fields = (source, row, sample_id, reason, kind)
        super().__init__(f"{source}: row {row} (id={sample_id!r}): {reason}")

    def __reduce__(self):  # rows are checked in DataLoader workers and on other ranks: it must pickle
        return type(self), self.fields


class TooLong(BadSample):
    """A valid sample that does not fit max_length; skipped under `on_image_truncation="skip"`."""


# ---------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------


def read_rows(path: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (row number, row) from a JSON list, a JSONL file or a `datasets` directory. Rows count from 0
    (JSONL: the 0-based line number, so an error's row matches `sed -n '<row+1>p'`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file or directory does not exist")
    if path.is_dir():
        yield from _read_hf_dataset(path, split)
        return
    if path.suffix == ".jsonl":
        yield from read_jsonl(path, error=DataError, first=0, unit="row")
        return
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or a .jsonl file), got {type(data).__name__}")
    yield from enumerate(data)


def _read_hf_dataset(path: Path, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for "not a dataset directory"
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    yield from enumerate(ds)


# ---------------------------------------------------------------------------------------------------------
# Validation: rows → samples
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """A validated row: chat messages (HF content-list format) and its images, not yet tokenised."""

    id: str
    row: int
    messages: list[dict] | None  # None for a plain-text (pretraining) sample
    text: str | None
    images: list[Any]  # paths, or decoded images from a datasets column
    source: str = ""  # the file it came from, for messages

    @property
    def has_images(self) -> bool:
        return bool(self.images)


def parse_row(
    row: Any, index: int, source: str, image_folder: Path | None, allow_outside_images: bool = False,
    check_files: bool = True,
) -> Sample:
    """Check a row and turn it into a Sample; raise BadSample naming the problem. `check_files`: also that each
    image file exists and is sound (off for rows a cached check has already passed)."""

    def bad(reason: str, kind: str) -> BadSample:
        sample_id = row.get("id") if isinstance(row, dict) else None
        return BadSample(source, index, sample_id, reason, kind)

    if not isinstance(row, dict):
        raise bad(f"expected an object, got {type(row).__name__}", "malformed row")
    sample_id = row_id(row, index)

    if "conversations" not in row and isinstance(row.get("text"), str):
        if not row["text"].strip():
            raise bad("empty text", "empty text")
        return Sample(sample_id, index, None, row["text"], [], source)

    conversations = row.get("conversations")
    if conversations is None:
        raise bad("no 'conversations' (or 'text') field", "malformed conversations")
    if not isinstance(conversations, list) or not conversations:
        raise bad("'conversations' must be a non-empty list of turns", "empty conversations")

    if row.get("video") is not None or row.get("videos") is not None:
        raise bad("has a 'video' field: midtune trains on images and text; video rows are not supported (remove "
                  "the row, or set on_bad_sample=skip to leave such rows out)", "video (unsupported)")
    images = _row_images(row, bad)
    resolved = [_resolve_image(img, image_folder, allow_outside_images, bad, check_files) for img in images]

    messages: list[dict] = []
    placeholders = 0
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise bad(f"turn {t} must be an object with 'from' and 'value'", "malformed conversations")
        role = ROLES.get(turn["from"])
        if role is None:
            raise bad(f"turn {t} has unknown role {turn['from']!r} (expected one of {sorted(ROLES)})", "unknown role")
        value = turn["value"]
        if not isinstance(value, str):
            raise bad(f"turn {t} value must be a string, got {type(value).__name__}", "malformed conversations")
        if "<video>" in value:
            raise bad(f"turn {t} has a <video> placeholder: video is not supported", "video (unsupported)")
        n = value.count(IMAGE_PLACEHOLDER)
        if n and role != "user":
            raise bad(f"turn {t}: {IMAGE_PLACEHOLDER} outside a human turn", "misplaced <image>")
        placeholders += n
        messages.append({"role": role, "content": content_parts(value)})

    if not any(m["role"] == "assistant" for m in messages):
        raise bad("no assistant (gpt) turn: nothing to learn from", "no assistant turn")
    if placeholders != len(resolved):
        if placeholders and not resolved:
            raise bad(f"{IMAGE_PLACEHOLDER} in the conversation but the row has no image", "<image> without image")
        if resolved and not placeholders:
            raise bad(f"the row has an image but no {IMAGE_PLACEHOLDER} in any human turn", "image without <image>")
        raise bad(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(resolved)} images", "image count mismatch")
    return Sample(sample_id, index, messages, None, resolved, source)


def row_id(row: dict, index: int) -> str:
    """A sample's id: the row's `id`, else its row number."""
    return str(row.get("id", index))


def _has_images(row: dict) -> bool:
    """Whether a row that passed parse_row's checks makes a sample with images (without parsing it again)."""
    return "conversations" in row and bool(_row_images(row, bad=None))


def _row_images(row: dict, bad) -> list[Any]:
    image = row.get("image", row.get("images"))
    if image is None:
        return []
    images = image if isinstance(image, list) else [image]
    for img in images:
        if not isinstance(img, (str, dict, Image.Image)):
            raise bad(f"'image' must be a path (or list of paths), got {type(img).__name__}", "malformed image field")
    return images


def _resolve_image(img: Any, image_folder: Path | None, allow_outside: bool, bad, check_files: bool = True) -> Any:
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
        if img.get("bytes") is not None:
            return img
        img = img.get("path")
        if not img:
            raise bad("image entry has neither bytes nor a path", "malformed image field")
    folder = image_folder or Path(".")
    if not check_files:  # a check has passed this row already: only the path (a str: pathlib costs more than this)
        return os.path.normpath(os.path.join(folder, img))  # `folder` is absolute here
    path = (folder / img).resolve()
    if not allow_outside and not path.is_relative_to(folder.resolve()):
        raise bad(
            f"image path {img!r} escapes the image folder {str(folder)!r} (set allow_outside_images to permit)",
            "image outside image folder",
        )
    if not path.is_file():
        raise bad(f"image file not found: {path}", "missing image file")
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file and checks its structure without decoding pixels
    except Exception as e:
        raise bad(f"unreadable or corrupt image {path}: {e}", "corrupt image") from None
    return path


def content_parts(text: str, n_images: int | None = None) -> list[dict]:
    """A turn's text as chat content: '<image>\\nWhat is this?' → [{'type': 'image'}, {'type': 'text', 'text':
    'What is this?'}]. The one way midtune builds chat messages, for training rows and evaluation prompts alike.

    Images sit at their `<image>` placeholders, and the newline LLaVA writes after a placeholder is dropped: each
    chat template decides how an image is separated from text (llava-1.5's template writes '<image>\\n' itself).
    With `n_images` (an evaluation prompt) and not exactly one placeholder per image, the images come first and
    the placeholders are dropped from the text."""
    if n_images is not None and not (n_images and text.count(IMAGE_PLACEHOLDER) == n_images):
        body = text.replace(IMAGE_PLACEHOLDER, "").strip("\n") if n_images else text
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": body}]
    parts: list[dict] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if len(pieces) > 1 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def user_prompt(processor, text: str, n_images: int, system_prompt: str | None = None,
                template: str | None = None) -> str:
    """The chat-template text of one user turn (`text` with its images, see content_parts), optionally after a
    system turn, followed by the assistant prefix: what a model answers from at evaluation."""
    messages = [{"role": "user", "content": content_parts(text, n_images)}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return render_chat(processor, messages, add_generation_prompt=True, template=template)


def load_image(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, dict):
        import io

        return Image.open(io.BytesIO(img["bytes"])).convert("RGB")
    with Image.open(img) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Tokenisation and label masking
# ---------------------------------------------------------------------------------------------------------


def render_chat(processor, messages: list[dict], add_generation_prompt: bool = False,
                template: str | None = None) -> str:
    """`messages` (content lists: {"type": "image"} / {"type": "text"}) rendered with the processor's chat template.

    Templates written for text LLMs (SmolLM2's, Vicuna's) take each message's content as one string; for them
    the content list is flattened, each image becoming the family's image placeholder and a newline.
    `template` replaces the processor's own."""
    template = template or getattr(processor, "chat_template", None) or \
        getattr(_tokenizer(processor), "chat_template", None)
    if not template:
        raise DataError("the processor has no chat template; save one with the model (processor.chat_template)")
    if _takes_string_content(processor, template):
        from midtune.adapters import image_text_for

        template = with_image_parts(template, image_text_for(processor))
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)


CONVERSATION_FORMATS = ("chat", "plain")


def plain_template(processor) -> str:
    """LLaVA's `plain` conversation (its stage 1, feature alignment), as a chat template: a user turn becomes its
    images alone (the question text is dropped, as LLaVA's preprocess_plain does), an assistant turn its text; no
    roles, no system turn. A turn ends with the tokenizer's EOS where LLaVA writes "\n": the captioner learns to
    stop as it will after a chat answer. For a run, never saved with the model (stage 2 needs the chat
    template)."""
    from midtune.adapters import image_text_for

    image = json.dumps(image_text_for(processor).rstrip("\n"))
    return (
        "{%- for m in messages -%}"
        "{%- set parts = [{'type': 'text', 'text': m['content']}] if m['content'] is string else m['content'] -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- for p in parts if p['type'] == 'image' -%}{{ " + image + " }}{%- endfor -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def conversation_template(processor, conversation: str) -> str | None:
    """The template a run renders its rows with: None for `chat` (the model's own chat template)."""
    if conversation not in CONVERSATION_FORMATS:
        raise DataError(f"conversation must be one of {', '.join(CONVERSATION_FORMATS)}, got {conversation!r}")
    return plain_template(processor) if conversation == "plain" else None


def with_image_parts(template: str, image_text: str) -> str:
    """A chat template written for text content (one string per message), taught to take content lists: a
    preamble rewrites each message whose content is a list of parts into one string (an image part becomes
    `image_text`, e.g. "<image>\\n"), then the template runs unchanged on those messages. An instruct LLM keeps the
    format it was tuned with; compose saves such a template so that vanilla `apply_chat_template` works too."""
    image = json.dumps(image_text)  # a valid Jinja string literal (Jinja unescapes like Python)
    preamble = (
        "{%- set _mt = namespace(messages=[]) -%}"
        "{%- for _m in messages -%}"
        "{%- if _m['content'] is string -%}{%- set _mt.messages = _mt.messages + [_m] -%}"
        "{%- else -%}{%- set _t = namespace(text='') -%}"
        "{%- for _p in _m['content'] -%}"
        "{%- if _p['type'] == 'image' -%}{%- set _t.text = _t.text + " + image + " -%}"
        "{%- elif _p['type'] == 'text' -%}{%- set _t.text = _t.text + _p['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _mt.messages = _mt.messages + [{'role': _m['role'], 'content': _t.text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _mt.messages -%}"
    )
    return preamble + template


def _tokenizer(processor):
    return processor.tokenizer if hasattr(processor, "tokenizer") else processor


_STRING_CONTENT: dict[str, bool] = {}  # chat template → whether it takes content as one string


def _takes_string_content(processor, template: str) -> bool:
    """Whether the chat template reads a message's content as a string (it prints a content list's repr, or
    fails on it). Probed once per template."""
    if template not in _STRING_CONTENT:
        probe = [{"role": "user", "content": [{"type": "text", "text": "probe"}]}]
        try:
            text = processor.apply_chat_template(probe, tokenize=False, chat_template=template)
            _STRING_CONTENT[template] = "'type'" in text or '"type"' in text
        except Exception:  # noqa: BLE001 - a template that concatenates content with strings raises on a list
            _STRING_CONTENT[template] = True
    return _STRING_CONTENT[template]


def special_token_strings(tokenizer) -> list[str]:
    """The text of every special token (end-of-turn markers such as <|im_end|>, <|eot_id|>, </s>)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


def add_special_tokens_for(tokenizer, text: str) -> bool:
    """Whether tokenising `text` should add the tokenizer's special tokens (BOS): not when the chat template has
    written BOS itself, which would then appear twice."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def render_with_assistant_spans(processor, messages: list[dict],
                                template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of `messages` and the character spans of the assistant turns in it.

    Each span covers the answer and the end of the turn. Where the template ends an assistant turn without a
    special token (llava-hf's own template ends it with a space), the tokenizer's EOS is written after the
    answer, as LLaVA's training does: otherwise no label ever teaches the model to stop."""

    def render(msgs: list[dict], gen: bool = False) -> str:
        return render_chat(processor, msgs, add_generation_prompt=gen, template=template)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(messages[: i + 1])
        prompt = render(messages[:i], gen=True)
        if through.startswith(prompt):
            start = len(prompt)
        else:
            # Templates whose generation prompt differs from how they write the turn (lmms-eval's Vicuna writes
            # "USER: q ASSISTANT:" as the prompt but "USER: q  ASSISTANT: a</s>" in a conversation): the answer
            # starts where its own text does, within what the turn adds.
            before = render(messages[:i]) if i else ""
            answer = "".join(p.get("text", "") for p in message["content"]) if isinstance(message["content"], list) \
                else message["content"]
            at = through.find(answer.strip(), len(before)) if through.startswith(before) and answer.strip() else -1
            if at < 0:
                raise DataError(
                    "the chat template is not prefix-stable (rendering a conversation's first turns does not give a "
                    "prefix of rendering it whole), so assistant turns cannot be located for label masking"
                )
            # the space before the answer belongs to its first token in byte-level BPE ("Ġmiddle")
            start = len(through[:at].rstrip(" ")) if at > len(before) else at
        if not full.startswith(through):
            raise DataError(
                "the chat template is not prefix-stable (rendering a conversation's first turns does not give a "
                "prefix of rendering it whole), so assistant turns cannot be located for label masking"
            )
        # Train on the answer and its end-of-turn marker, not on trailing whitespace after it.
        spans.append((start, len(through.rstrip())))
    return _end_turns_with_eos(_tokenizer(processor), full, spans)


def _end_turns_with_eos(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    eos = getattr(tokenizer, "eos_token", None)
    specials = special_token_strings(tokenizer)
    out, new_spans, shift, last = [], [], 0, 0
    for start, end in spans:
        out.append(text[last:end])
        last = end
        added = eos if eos and not any(text.endswith(tok, 0, end) for tok in specials) else ""
        out.append(added)
        new_spans.append((start + shift, end + shift + len(added)))
        shift += len(added)
    out.append(text[last:])
    return "".join(out), new_spans


@dataclass
class Tokenised:
    input_ids: list[int]
    labels: list[int]
    vision: dict[str, torch.Tensor]  # processor outputs for the images (pixel_values, image_grid_thw, ...)
    extra: dict[str, list[int]]  # other token-aligned processor outputs (mm_token_type_ids)


@dataclass
class RenderedText:
    """A conversation's chat-template text, its unexpanded token ids and which of them are labels: everything
    about a sample that does not depend on its pixels (cached by the dataset, so templates render once)."""

    text: str
    ids: list[int]
    is_label: list[bool]


def render_text(processor, sample: Sample, template: str | None = None) -> RenderedText:
    tokenizer = _tokenizer(processor)
    text, spans = render_with_assistant_spans(processor, sample.messages, template)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens_for(tokenizer, text))
    is_label = [any(start <= s < end for start, end in spans) and e > s for s, e in enc["offset_mapping"]]
    return RenderedText(text, enc["input_ids"], is_label)


def tokenise_sample(processor, sample: Sample, images: list[Image.Image] | None = None,
                    rendered: RenderedText | None = None, template: str | None = None) -> Tokenised:
    """Token ids and labels (-100 outside assistant turns; every token for a text sample).

    With `images` (decoded), the processor runs and its output is checked against our expansion. Without
    them, image-token counts come from the processor's token-count API and the images' header sizes: the cheap
    path used to measure lengths of a whole dataset before training. `rendered` skips re-rendering the text.
    `images` are already shaped (midtune.images.fit_images); header sizes are shaped alike for the count.
    `template` replaces the processor's chat template for this rendering (plain_template: LLaVA's stage 1)."""
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    if sample.messages is None:  # language pretraining text
        ids = tokenizer(sample.text)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Tokenised(ids, list(ids), {}, {})

    rendered = rendered or render_text(processor, sample, template)
    text, base_ids, is_label = rendered.text, rendered.ids, rendered.is_label

    if images is None and sample.images:
        counts = image_token_counts(processor, [fitted_size(processor, image_size(img)) for img in sample.images])
        ids, labels = _expand_image_tokens(base_ids, is_label, counts, processor)
        return Tokenised(ids, labels, {}, {})

    out = processor(text=[text], images=images or None, return_tensors="pt",
                    add_special_tokens=add_special_tokens_for(tokenizer, text))
    expanded = out["input_ids"][0].tolist()
    if images:
        counts = image_token_counts(processor, [(im.height, im.width) for im in images])
    else:
        counts = []
    if counts is None:  # no count API: take the processor's runs (one run per image)
        counts = [end - start for start, end in image_token_spans(expanded, _image_token_ids(processor))]
    ids, labels = _expand_image_tokens(base_ids, is_label, counts, processor)
    if ids != expanded:
        raise DataError(
            "the processor's tokenisation differs from the tokenizer's outside image-token runs; "
            "label masking cannot be aligned for this processor"
        )
    vision = {k: v for k, v in out.items() if k not in TOKEN_ALIGNED}
    extra = {k: out[k][0].tolist() for k in TOKEN_ALIGNED if k in out and k not in ("input_ids", "attention_mask")}
    return Tokenised(ids, labels, vision, extra)


def image_size(img: Any) -> tuple[int, int]:
    """(height, width) from the file header, without decoding pixels."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    if isinstance(img, dict):
        import io

        img = io.BytesIO(img["bytes"])
    with Image.open(img) as im:
        return im.height, im.width


def image_token_counts(processor, sizes: list[tuple[int, int]]) -> list[int] | None:
    """How many tokens the processor expands each image to, or None if it cannot say without running."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None or not sizes:
        return None if sizes else []
    try:
        return list(count(image_sizes=sizes)["num_image_tokens"])
    except Exception:  # a processor whose count needs more than sizes
        return None


def _image_token_ids(processor) -> set[int]:
    ids = set()
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    if not ids:
        tok = processor.tokenizer
        ids.add(tok.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_PLACEHOLDER)))
    return ids


def _expand_image_tokens(ids: list[int], is_label: list[bool], counts: list[int], processor):
    """Repeat the k-th image-token id `counts[k]` times, as the processor does; images are never labels."""
    image_ids = _image_token_ids(processor)
    n_placeholders = sum(t in image_ids for t in ids)
    if n_placeholders != len(counts):
        raise DataError(f"{n_placeholders} image tokens in the rendered text for {len(counts)} images")
    out_ids: list[int] = []
    out_labels: list[int] = []
    k = 0
    for token, label in zip(ids, is_label):
        if token in image_ids:
            out_ids += [token] * counts[k]
            out_labels += [IGNORE_INDEX] * counts[k]
            k += 1
        else:
            out_ids.append(token)
            out_labels.append(token if label else IGNORE_INDEX)
    return out_ids, out_labels


def image_token_spans(ids: list[int], image_ids: set[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, t in enumerate(ids + [-1]):
        if t in image_ids and start is None:
            start = i
        elif t not in image_ids and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DataSummary:
    source: str
    rows: int = 0
    samples: int = 0
    with_images: int = 0
    text_only: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    cached: bool = False  # the row checks were read back from the data-check cache
    checked_here: int = 0  # rows this process checked (the others: other processes, or the cache)

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        line = (
            f"{self.source}: {self.rows} rows → {self.samples} samples "
            f"({self.with_images} with images, {self.text_only} text only), {self.truncated} truncated"
        )
        if skipped:
            reasons = ", ".join(f"{n} {kind}" for kind, n in self.skipped.most_common())
            line += f", {skipped} skipped: {reasons}"
        return line

    def to_dict(self) -> dict:
        keys = ("source", "rows", "samples", "with_images", "text_only", "truncated", "cached", "checked_here")
        return {**{k: getattr(self, k) for k in keys}, "skipped": dict(self.skipped)}


class CheckedSamples(Sequence):
    """Rows that passed their checks, turned into Samples on access (image files not re-checked)."""

    def __init__(self, rows: list[tuple[str, int, Any]], image_folder: Path, allow_outside_images: bool):
        self.rows, self.image_folder, self.allow_outside_images = rows, image_folder, allow_outside_images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]  (no slices: nothing here needs them)
        source, index, row = self.rows[i]
        return parse_row(row, index, source, self.image_folder, self.allow_outside_images, check_files=False)

    def locations(self) -> dict[str, str]:
        """Sample id → "file row N", for error messages (without parsing every row)."""
        where: dict[str, str] = {}
        for source, index, row in self.rows:
            where.setdefault(row_id(row, index), f"{source} row {index}")
        return where


class SupervisedDataset(torch.utils.data.Dataset):
    """Validated, tokenised-on-demand visual instruction samples.

    Construction checks every row (structure, image files exist and are structurally sound) and tokenises its
    text once, counting image tokens from header sizes, to apply the truncation rule: every data error surfaces
    before the first training step, without decoding a single image. Items are processed with their pixels in
    `__getitem__` (DataLoader workers parallelise that), checked against the same expansion.

    The checks scale: with `shard=(rank, world_size)` a process checks every world_size-th row and `gather`
    (accelerate's gather_object) shares the results, so each row is checked once in total; `num_workers`
    DataLoader workers share a process's rows. With `cache_dir`, the results are kept under a key made of the data
    files (path, size, modification time), the image folder, the processor (tokenizer, chat template, image
    settings), the settings and this module's code: a restart or resume with the same inputs reads them back in
    seconds instead of checking again. (Image files are not re-read then: one deleted since fails when loaded.)
    """

    def __init__(
        self,
        path: str | Path | list,
        processor,
        image_folder: str | Path | None = None,
        max_length: int = 2048,
        on_bad_sample: Literal["error", "skip"] = "error",
        on_image_truncation: Literal["error", "skip"] = "skip",
        split: str = "train",
        allow_outside_images: bool = False,
        progress: bool = False,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        gather=None,
        cache_dir: str | Path | None = None,
        template: str | None = None,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise DataError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if on_image_truncation not in ("error", "skip"):
            raise DataError(f"on_image_truncation must be 'error' or 'skip', got {on_image_truncation!r}")
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not paths:
            raise DataError("no data files given")
        self.source = ", ".join(map(str, paths))
        self.processor = processor
        self.template = template  # this run's conversation format, where it is not the model's chat template
        self.max_length = max_length
        self.image_ids = _image_token_ids(processor)
        self.summary = DataSummary(self.source)
        folder = Path(image_folder) if image_folder is not None else None
        if folder is not None and not folder.is_dir():
            raise DataError(f"image_folder {str(folder)!r} is not a directory")
        rows = [(str(p), index, row) for p in paths for index, row in read_rows(p, split)]
        absolute = Path(os.path.abspath(folder if folder is not None else "."))  # once, not per image
        checker = RowChecker(processor, folder, allow_outside_images, max_length, self.image_ids,
                             on_image_truncation, template)
        key = data_check_key(paths, folder, processor, split=split, max_length=max_length, template=template,
                             on_image_truncation=on_image_truncation, allow_outside_images=allow_outside_images)
        cache = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
        outcomes = read_data_checks(cache, len(rows))
        self.summary.cached = outcomes is not None
        if outcomes is None:
            outcomes = check_rows(rows, checker, num_workers, shard, gather, progress, self.source)
            self.summary.checked_here = len(range(shard[0], len(rows), shard[1]))
        # The outcomes in row order: the first bad row is the one reported, whichever process checked it.
        usable: list[tuple[str, int, Any]] = []
        self.lengths: list[int] = []
        self.has_images: list[bool] = []  # per sample, for the modality-grouped sampler
        for item, (length, truncated, problem) in zip(rows, outcomes):
            self.summary.rows += 1
            if problem is not None:
                skippable = isinstance(problem, TooLong) or isinstance(problem, BadSample) and on_bad_sample == "skip"
                if not skippable:
                    raise problem
                self.summary.skipped[problem.kind] += 1
                continue
            usable.append(item)
            self.lengths.append(length)
            self.has_images.append(_has_images(item[2]))
            self.summary.truncated += truncated
        self.summary.with_images = sum(self.has_images)
        self.summary.text_only = len(usable) - self.summary.with_images
        # Rows become Samples when used, not here: parsing all of them again would cost a warm start (every check
        # read back from the cache) seconds per 100k rows.
        self.samples = CheckedSamples(usable, absolute, allow_outside_images)
        self.summary.samples = len(self.samples)
        if not self.samples:
            raise DataError(f"{self.source}: no usable samples ({self.summary})")
        if cache is not None and not self.summary.cached and shard[0] == 0:
            write_data_checks(cache, key, outcomes)
        # Rendered text per sample (a few kB each), kept for the first MAX_CACHED samples so templates render once:
        # past that the rest render on every use, a cost that grows with the rows instead of a cliff.
        self._rendered: dict[int, RenderedText] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        images = fit_images(self.processor, [load_image(img) for img in sample.images])
        rendered = self._rendered.get(i)
        if rendered is None and sample.messages is not None:
            rendered = render_text(self.processor, sample, self.template)
            if len(self._rendered) < MAX_CACHED:
                self._rendered[i] = rendered
        tok = tokenise_sample(self.processor, sample, images, rendered=rendered)
        n = min(len(tok.input_ids), self.max_length)
        item = {
            "input_ids": torch.tensor(tok.input_ids[:n]),
            "labels": torch.tensor(tok.labels[:n]),
            "attention_mask": torch.ones(n, dtype=torch.long),
            "sample_id": sample.id,
        }
        item.update({k: torch.tensor(v[:n]) for k, v in tok.extra.items()})
        item.update(tok.vision)
        return item


# ---------------------------------------------------------------------------------------------------------
# Checking rows: split across processes and workers, kept in a cache
# ---------------------------------------------------------------------------------------------------------

DATA_CHECK_FORMAT = "midtune-data-check/1"
# (length, truncated, problem): a usable row's tokens (capped at max_length) and whether it was truncated, or
# the BadSample/DataError that leaves it out (length 0).
Outcome = tuple[int, bool, "DataError | None"]


@dataclass
class RowChecker:
    """Checks one row: its structure and images, and its length (text tokenised, image tokens counted from the
    images' header sizes: exact lengths without decoding pixels). Picklable, for DataLoader workers."""

    processor: Any
    image_folder: Path | None
    allow_outside_images: bool
    max_length: int
    image_ids: set[int]
    on_image_truncation: str
    template: str | None = None

    def __call__(self, item: tuple[str, int, Any]) -> Outcome:
        source, index, row = item
        try:
            sample = parse_row(row, index, source, self.image_folder, self.allow_outside_images)
            return (*self.length(sample), None)
        except DataError as e:
            return 0, False, e

    def length(self, sample: Sample) -> tuple[int, bool]:
        tok = tokenise_sample(self.processor, sample, template=self.template)
        n = len(tok.input_ids)
        if n <= self.max_length:
            return n, False
        if any(end > self.max_length for _, end in image_token_spans(tok.input_ids, self.image_ids)):
            if self.on_image_truncation == "error":
                raise DataError(
                    f"{sample.source}: row {sample.row} (id={sample.id!r}): {n} tokens exceed max_length="
                    f"{self.max_length} and truncation would cut through image tokens"
                )
            raise TooLong(sample.source, sample.row, sample.id,
                          f"truncation to {self.max_length} would cut image tokens", "too long (image cut)")
        if all(label == IGNORE_INDEX for label in tok.labels[: self.max_length]):
            raise TooLong(sample.source, sample.row, sample.id,
                          f"no assistant tokens within max_length={self.max_length}", "too long (no answer left)")
        return self.max_length, True


class _Shard(torch.utils.data.Dataset):
    """This process's rows (every world_size-th), in chunks, each checked by whichever worker takes it."""

    def __init__(self, rows: list, positions: range, checker: RowChecker, chunk: int = 64):
        self.rows, self.checker = rows, checker
        self.chunks = [positions[i:i + chunk] for i in range(0, len(positions), chunk)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> list[tuple[int, Outcome]]:
        return [(i, self.checker(self.rows[i])) for i in self.chunks[k]]


def _as_is(chunk):
    return chunk


def check_rows(rows: list, checker: RowChecker, num_workers: int = 0, shard: tuple[int, int] = (0, 1),
               gather=None, progress: bool = False, source: str = "") -> list[Outcome]:
    """Every row's outcome, in row order. This process checks rows rank, rank + world_size, ... (with
    `num_workers` DataLoader workers); `gather` (accelerate.utils.gather_object) brings the other processes'."""
    rank, world = shard
    positions = range(rank, len(rows), world)
    loader = torch.utils.data.DataLoader(_Shard(rows, positions, checker), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_as_is)
    mine: list[tuple[int, Outcome]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(positions), desc=f"checking {source}" + (f" (1/{world} of the rows)" if world > 1
                                                                        else ""), unit="row")
    for chunk in loader:
        mine += chunk
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    everything = gather(mine) if gather is not None and world > 1 else mine
    outcomes: list[Outcome | None] = [None] * len(rows)
    for i, outcome in everything:
        outcomes[i] = outcome
    missing = sum(o is None for o in outcomes)
    if missing:  # a gather that lost rows would silently train on less
        raise DataError(f"{source}: {missing} of {len(rows)} rows were not checked by any process")
    return outcomes


def _file_identity(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def data_check_key(paths: list[Path], image_folder: Path | None, processor, **settings) -> str:
    """What a row check depends on: the data files, the image folder, the processor, the settings and the code
    that checks. The data files are identified by path, size and modification time (hashing a 665k-row file on
    every start would cost what the cache saves)."""
    import hashlib

    tokenizer = _tokenizer(processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    parts = {
        "format": DATA_CHECK_FORMAT,
        "files": [_file_identity(p) for p in paths],
        "image_folder": str(image_folder.resolve()) if image_folder is not None else None,
        "processor": type(processor).__name__,
        "tokenizer": backend.to_str() if backend is not None else [type(tokenizer).__name__, len(tokenizer)],
        "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "image_processor": image_processor.to_json_string() if image_processor is not None else None,
        "settings": settings,
        "code": [Path(__file__).read_text(), *(Path(__file__).with_name(m).read_text()
                                                for m in ("adapters.py", "images.py"))],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_data_checks(path: Path | None, n_rows: int) -> list[Outcome] | None:
    """The cached outcomes, or None (no cache, none written yet, or not for these rows)."""
    if path is None or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: checked again and rewritten
    if doc.get("format") != DATA_CHECK_FORMAT or len(doc.get("outcomes", ())) != n_rows:
        return None
    kinds = {"BadSample": BadSample, "TooLong": TooLong}
    return [(length, truncated, None if problem is None else kinds[problem[0]](*problem[1:]))
            for length, truncated, problem in doc["outcomes"]]


def write_data_checks(path: Path, key: str, outcomes: list[Outcome]) -> None:
    """Only runs that got this far (every problem a skipped BadSample) are cached."""
    write_json(path, {"format": DATA_CHECK_FORMAT, "key": key,
                      "outcomes": [[length, truncated, None if problem is None else
                                    [type(problem).__name__, *problem.fields]]
                                   for length, truncated, problem in outcomes]}, indent=None)


def dummy_image_inputs(processor) -> dict:
    """A stand-in image for a micro-batch that has none: its image-token run (attention mask 0, no labels) and
    vision inputs, in the shape of one SupervisedDataset item. Appended to a text-only micro-batch, it makes the
    model run its vision tower and projector as on the other ranks (LLaVA feeds a zero image, LLaMA-Factory a fake
    one for the same reason), while the real rows' loss and gradients stay exactly theirs: every real token has an
    earlier position, so nothing attends to the masked run, and its positions carry no label. The image is the
    smallest the processor takes (Qwen2-VL's minimum pixel budget; a CLIP processor resizes anything to its one
    size), filled with the processor's mean colour: a zero image after normalisation."""
    from midtune.adapters import image_text_for

    tokenizer = _tokenizer(processor)
    mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or [0.0, 0.0, 0.0]
    blank = Image.new("RGB", (28, 28), tuple(round(255 * m) for m in mean))
    out = processor(text=[image_text_for(processor).strip()], images=[blank], return_tensors="pt",
                    add_special_tokens=False)
    ids = out["input_ids"][0]
    image_ids = _image_token_ids(processor)
    if not any(t in image_ids for t in ids.tolist()):
        raise DataError(f"{type(processor).__name__}: no image tokens in its output for one image")
    run_ids = image_ids | _vision_marker_ids(tokenizer)
    keep = torch.tensor([t in run_ids for t in ids.tolist()])
    item = {"input_ids": ids[keep], "labels": torch.full_like(ids[keep], IGNORE_INDEX),
            "attention_mask": torch.zeros_like(ids[keep])}
    item.update({k: out[k][0][keep] for k in TOKEN_ALIGNED if k in out and k not in item})
    item.update({k: v for k, v in out.items() if k not in TOKEN_ALIGNED})
    return item


def _vision_marker_ids(tokenizer) -> set[int]:
    """Token ids that frame an image run (Qwen2-VL's <|vision_start|>/<|vision_end|>): kept with the run."""
    ids = set()
    for token in ("<|vision_start|>", "<|vision_end|>"):
        value = tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != tokenizer.unk_token_id:
            ids.add(value)
    return ids


@dataclass
class Collator:
    """Pads token-aligned fields (right padding, labels with -100) and concatenates vision inputs.

    Vision tensors are concatenated along dim 0 (images, or patches for Qwen) over the samples that have
    them, padding trailing dims with zeros (LLaVA-Next's per-image patch count varies; the model slices by
    `image_sizes`). Text-only samples contribute none, so they mix freely with image samples.

    With `dummy_image` (dummy_image_inputs; multi-rank training of data that has images), a micro-batch with no
    image gets that stand-in appended to its shortest row, after its real tokens: every rank then calls the same
    vision modules in every micro-step, which ZeRO-3 and FSDP need, at no change to the loss or gradients."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    dummy_image: dict | None = None

    def __call__(self, batch: list[dict]) -> dict:
        batch = self.with_dummy_image(batch)
        length = max(len(item["input_ids"]) for item in batch)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_value = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        out: dict[str, Any] = {"sample_ids": [item["sample_id"] for item in batch]}
        token_keys = list(dict.fromkeys(k for item in batch for k in item if _token_aligned(k)))
        for key in token_keys:
            rows = []
            for item in batch:
                # a text sample has no mm_token_type_ids; 0 (= text token) is its value
                values = item.get(key, torch.zeros_like(item["input_ids"]))
                rows.append(torch.nn.functional.pad(values, (0, length - len(values)), value=pad_value.get(key, 0)))
            out[key] = torch.stack(rows)
        vision_keys = dict.fromkeys(k for item in batch for k in item if k not in token_keys and k != "sample_id")
        for key in vision_keys:
            tensors = [item[key] for item in batch if key in item]
            out[key] = _cat_padded(tensors)
        return out

    def with_dummy_image(self, batch: list[dict]) -> list[dict]:
        if self.dummy_image is None or any(not _token_aligned(k) and k != "sample_id" for item in batch for k in item):
            return batch  # no stand-in asked for, or a row has vision inputs already
        shortest = min(range(len(batch)), key=lambda i: len(batch[i]["input_ids"]))
        row, dummy = batch[shortest], self.dummy_image
        joined = {"sample_id": row["sample_id"]}
        for key in dict.fromkeys([*row, *dummy]):
            if key == "sample_id":
                continue
            if _token_aligned(key):
                mine = row.get(key, torch.zeros_like(row["input_ids"]))
                theirs = dummy.get(key, torch.zeros_like(dummy["input_ids"]))
                joined[key] = torch.cat([mine, theirs.to(mine.dtype)])
            else:
                joined[key] = dummy[key]
        return [joined if i == shortest else item for i, item in enumerate(batch)]


def _token_aligned(key: str) -> bool:
    """A batch field padded along the tokens (labels too); every other field but sample_id is vision input."""
    return key in TOKEN_ALIGNED or key == "labels"


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


# ---------------------------------------------------------------------------------------------------------
# Batching by length
# ---------------------------------------------------------------------------------------------------------


class LengthGroupedSampler(torch.utils.data.Sampler):
    """An order of sample indices in which every data-parallel step holds one modality on all ranks, and each
    micro-batch samples of similar length: LLaVA's group_by_modality_length, made safe for sharded training.

    Why steps and not batches: accelerate deals the DataLoader's batches to ranks in turn (rank r takes batches
    r, r + world_size, ...), so `world_size` consecutive batches are one micro-step of the whole job. If one rank
    of that step held a text-only batch it would skip the vision tower while the others run it, and under ZeRO-3 or
    FSDP, where the frozen tower is sharded too, the ranks' all-gathers would no longer match (gloo: "collective
    mismatch"; NCCL: a hang). Every collective of those backends happens within one micro-step, so one modality per
    micro-step is enough: the micro-steps of one accumulation window may differ.

    Per epoch: each modality's indices are shuffled and cut into megabatches of `megabatch` steps; a megabatch is
    sorted by length and cut into steps of `world_size × batch_size`; a step's rows are dealt to its ranks
    longest first, each to the rank with the fewest tokens so far that still has room, so the ranks of a step wait
    little for each other. The full steps of both modalities are shuffled together; what does not fill a step is
    gathered at the end (sorted by length), where a step can still mix modalities: the collator's stand-in image
    (`Collator.dummy_image`) keeps those safe. The order depends only on (seed, epoch, lengths, batch_size,
    world_size): every process builds the same one, and a resumed run of the same shape skips into it."""

    def __init__(self, lengths: list[int], has_images: list[bool], batch_size: int, seed: int = 0,
                 megabatch: int = 32, world_size: int = 1):
        if len(lengths) != len(has_images):
            raise ValueError("lengths and has_images must be of the same size")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size {batch_size} and world_size {world_size} must be at least 1")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.has_images = torch.as_tensor(has_images, dtype=torch.bool)
        self.batch_size, self.seed, self.megabatch, self.world_size = batch_size, seed, megabatch, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        step = self.batch_size * self.world_size
        steps: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []
        for modality in (True, False):
            idx = self.has_images.eq(modality).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            for mega in idx.split(step * self.megabatch):
                mega = mega[self.lengths[mega].argsort(descending=True, stable=True)]
                full = len(mega) // step * step
                steps += [self.deal_to_ranks(rows) for rows in mega[:full].split(step)]
                rest.append(mega[full:])
        order = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        tail = torch.cat(rest)  # one remainder per modality, possibly empty
        order.append(tail[self.lengths[tail].argsort(descending=True, stable=True)])
        return torch.cat(order)

    def deal_to_ranks(self, rows: torch.Tensor) -> torch.Tensor:
        """One step's rows (sorted longest first) as `world_size` consecutive batches of similar total length."""
        if self.world_size == 1:
            return rows
        batches: list[list[int]] = [[] for _ in range(self.world_size)]
        totals = [0] * self.world_size
        for row in rows.tolist():
            rank = min((r for r in range(self.world_size) if len(batches[r]) < self.batch_size),
                       key=lambda r: totals[r])
            batches[rank].append(row)
            totals[rank] += int(self.lengths[row])
        return torch.tensor([row for batch in batches for row in batch], dtype=torch.long)


def padding_fraction(lengths: list[int], order: Iterable[int], batch_size: int) -> float:
    """The fraction of a padded batch's positions that are padding, over all batches cut from `order`."""
    lengths_in_order = [lengths[i] for i in order]
    padded = real = 0
    for s in range(0, len(lengths_in_order), batch_size):
        chunk = lengths_in_order[s:s + batch_size]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / padded if padded else 0.0
