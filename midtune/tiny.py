"""Tiny models: a locally trained tokenizer, a processor sized for the shapes world, a random-init model.

    python -m midtune.tiny --family llava --data runs/world --out runs/tiny-llava [--layers 8 --hidden 256 ...]

Everything is built from config with stock transformers classes and saved with `save_pretrained`, so the
saved directory loads with vanilla `AutoProcessor.from_pretrained(dir)` + `<Family>ForConditionalGeneration
.from_pretrained(dir)` offline, exactly like a hub checkpoint. Tests and the demo use these in place of
downloaded weights.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from midtune.adapters import FAMILIES_BY_NAME, Family, TinySize, model_class

log = logging.getLogger(__name__)

# Chat tokens shared by every tiny model (ChatML, as Qwen and LLaVA-OneVision use) and every family's image
# tokens, so one tokenizer serves all families.
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = CHAT_TOKENS + tuple(
    dict.fromkeys(tok for fam in FAMILIES_BY_NAME.values() for tok in fam.special_tokens)
)


def chat_template(image_placeholder: str) -> str:
    """A ChatML template; images render as the family's placeholder and a newline (LLaVA-1.5's convention)
    at their place in the content list."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image_placeholder + "\\n' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE (GPT-2 style, exact round trip) trained on `texts`, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=1024,
    )


def world_texts(data_dir: str | Path) -> list[str]:
    """All text of a shapes world (corpus, captions, questions, answers) to train the tokenizer on."""
    data_dir = Path(data_dir)
    texts: list[str] = []
    corpus = data_dir / "corpus.jsonl"
    if corpus.exists():
        texts += [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    for name in ("train.json", "captions_train.json", "scenes_in_words.json"):
        path = data_dir / name
        if path.exists():
            for row in json.loads(path.read_text()):
                texts += [turn["value"].replace("<image>", "") for turn in row["conversations"]]
    if not texts:
        raise FileNotFoundError(f"{data_dir}: no corpus.jsonl, train.json or captions_train.json to train a tokenizer on")
    return texts


def build_tiny(
    family: str | Family,
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    image_size: int = 64,
    patch_size: int = 8,
    layers: int = 8,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vision_layers: int = 4,
    vision_hidden: int = 192,
    vision_heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random-init model + processor of `family`; returns the output directory."""
    fam = FAMILIES_BY_NAME[family] if isinstance(family, str) else family
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    size = TinySize(
        vocab_size=len(tokenizer),
        image_size=image_size,
        patch_size=patch_size,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vision_layers=vision_layers,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        special_ids={t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
    )
    template = chat_template(fam.image_placeholder)
    tokenizer.chat_template = template
    processor = fam.build_processor(tokenizer, size, template)
    config = fam.build_tiny(size)
    torch.manual_seed(seed)
    model = model_class(fam)(config)
    model.generation_config.eos_token_id = size.special_ids["<|im_end|>"]
    model.generation_config.pad_token_id = size.special_ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m midtune.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="llava", choices=sorted(FAMILIES_BY_NAME))
    ap.add_argument("--data", required=True, help="a shapes world directory (python -m midtune.shapes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, default=None, help="default: the world's image size")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=192)
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    image_size = args.image_size
    if image_size is None:
        world = Path(args.data) / "world.json"
        image_size = json.loads(world.read_text())["args"]["image_size"] if world.exists() else 64
    out = build_tiny(
        args.family,
        args.out,
        world_texts(args.data),
        image_size=image_size,
        patch_size=args.patch_size,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vision_layers=args.vision_layers,
        vision_hidden=args.vision_hidden,
        vision_heads=args.vision_heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    n_params = sum(t.numel() for t in _load_state(out).values())
    print(f"tiny {args.family} model: {n_params / 1e6:.2f}M parameters, {args.layers} LLM layers × {args.hidden}, "
          f"vision {args.vision_layers} × {args.vision_hidden}, image {image_size}px / patch {args.patch_size} → {out}")


def _load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(f))
    return state


if __name__ == "__main__":
    main()
