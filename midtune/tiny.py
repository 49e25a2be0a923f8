"""Tiny models: a locally trained tokenizer, a processor sized for the shapes world, a random-init model.

    python -m midtune.tiny --family llava --data runs/world --out runs/tiny-llava [--layers 8 --hidden 256 ...]

Everything is built from config with stock transformers classes and saved with `save_pretrained`, so the
saved directory loads with vanilla `AutoProcessor.from_pretrained(dir)` + `<Family>ForConditionalGeneration
.from_pretrained(dir)` offline, exactly like a hub checkpoint. Tests and the demo use these in place of
downloaded weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from midtune.adapters import FAMILIES_BY_NAME, Family, TinySize, clip_image_kwargs, model_class
from midtune.files import read_jsonl, write_json

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
        texts += [row["text"] for _, row in read_jsonl(corpus)]
    for name in ("train.json", "captions_train.json", "scenes_in_words.json"):
        path = data_dir / name
        if path.exists():
            for row in json.loads(path.read_text()):
                texts += [turn["value"].replace("<image>", "") for turn in row["conversations"]]
    if not texts:
        raise FileNotFoundError(f"{data_dir}: no corpus.jsonl, train.json or captions_train.json to train a "
                                f"tokenizer on")
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


def build_vision_tower(
    out_dir: str | Path,
    *,
    image_size: int,
    patch_size: int = 16,
    layers: int = 4,
    hidden: int = 192,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Build and save a random-init CLIP vision tower + image processor sized for the world's images.

    No pretrained vision encoder is reachable offline, so the demo composes its pretrained LLM with this one after
    `pretrain_vision_tower` has taught it the world's images. The processor keeps the images at their own size (no
    resize, no crop): with the patch size equal to the world's grid cell, each patch token sees exactly one cell.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              initializer_range=hidden ** -0.5)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    CLIPVisionModel(config).save_pretrained(out_dir)
    CLIPImageProcessor(**clip_image_kwargs(image_size)).save_pretrained(out_dir)
    return out_dir


def pretrain_vision_tower(
    tower_dir: str | Path,
    world_dir: str | Path,
    *,
    feature_layer: int = -2,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Pre-train a vision tower on the shapes world: every patch token learns what its grid cell holds, and where.

    This stands in for the pretrained CLIP encoder LLaVA starts from (none is reachable offline): the tower learns
    to see, without language; alignment then teaches a projector to show what it sees to the LLM. Two linear heads
    on the hidden state the composed LLaVA reads (`feature_layer`, LLaVA's -2) classify each patch token: as empty
    or one of the world's colour × shape kinds, and by the cell it covers (without that second head nothing asks
    the features to keep where a patch is: the LLM would have to infer it from the order of 9 image tokens). The
    heads are thrown away. Needs the patch grid to be the world's grid (one patch per cell). Saves the tower in
    place and returns {"steps", "loss", "patch_accuracy"} (both heads right, on the world's val split).
    """
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from midtune.data import read_rows
    from midtune.shapes import COLOR_NAMES, SHAPES

    tower_dir, world_dir = Path(tower_dir), Path(world_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CLIPVisionModel.from_pretrained(tower_dir).to(device)
    processor = CLIPImageProcessor.from_pretrained(tower_dir)
    grid = json.loads((world_dir / "world.json").read_text())["args"]["grid"]
    side = model.config.image_size // model.config.patch_size
    if side != grid:
        raise ValueError(f"{tower_dir}: {side} × {side} patches, but the world at {world_dir} has a {grid} × {grid} "
                         f"grid: pre-training needs one patch per cell")
    kinds = {kind: 1 + i for i, kind in enumerate(itertools.product(COLOR_NAMES, SHAPES))}  # 0: empty

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [row for _, row in read_rows(world_dir / f"scenes_{split}.jsonl")]
        images = [Image.open(world_dir / "images" / row["image"]).convert("RGB") for row in rows]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        labels = np.zeros((len(rows), grid * grid), dtype=np.int64)
        for i, row in enumerate(rows):
            for o in row["objects"]:
                labels[i, o["row"] * grid + o["col"]] = kinds[(o["color"], o["shape"])]
        return pixels.to(device), torch.from_numpy(labels).to(device)

    train_x, train_y = load("train")
    val_x, val_y = load("val")
    torch.manual_seed(seed)
    n_cells = grid * grid
    head = torch.nn.Linear(model.config.hidden_size, 1 + len(kinds) + n_cells).to(device)  # kinds, then cells
    cells = torch.arange(n_cells, device=device)
    optim = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        states = model(pixel_values=x, output_hidden_states=True).hidden_states[feature_layer]
        return head(states[:, 1:])  # patch tokens; the CLS token (dropped by LLaVA's "default" strategy) left out

    def losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kind, cell = out[..., :-n_cells], out[..., -n_cells:]
        where = cells.expand(len(y), -1)
        return (torch.nn.functional.cross_entropy(kind.flatten(0, 1), y.flatten())
                + torch.nn.functional.cross_entropy(cell.flatten(0, 1), where.flatten()))

    model.train()
    loss = None
    for _ in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=generator).to(device)
        loss = losses(logits(train_x[idx]), train_y[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        out = logits(val_x)
        right = (out[..., :-n_cells].argmax(-1) == val_y) & (out[..., -n_cells:].argmax(-1) == cells)
        accuracy = right.float().mean().item()
    model.cpu().save_pretrained(tower_dir)
    return {"steps": steps, "loss": None if loss is None else round(loss.item(), 4),
            "patch_accuracy": round(accuracy, 4)}


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
    ap.add_argument("--vision-tower", action="store_true",
                    help="build only a CLIP vision tower (for python -m midtune.compose --vision) sized by "
                         "--image-size, --patch-size and --vision-*, pre-trained on the world for --pretrain-steps")
    ap.add_argument("--pretrain-steps", type=int, default=400, help="with --vision-tower (0: leave it random)")
    ap.add_argument("--pretrain-batch-size", type=int, default=64)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    image_size = args.image_size
    if image_size is None:
        world = Path(args.data) / "world.json"
        image_size = json.loads(world.read_text())["args"]["image_size"] if world.exists() else 64
    if args.vision_tower:
        build_vision_tower(args.out, image_size=image_size, patch_size=args.patch_size, layers=args.vision_layers,
                           hidden=args.vision_hidden, heads=args.vision_heads, seed=args.seed)
        if args.pretrain_steps > 0:
            result = pretrain_vision_tower(args.out, args.data, steps=args.pretrain_steps,
                                           batch_size=args.pretrain_batch_size, lr=args.pretrain_lr, seed=args.seed)
            write_json(Path(args.out) / "pretraining.json", result)
            print(f"vision tower pre-trained: {result['steps']} steps, loss {result['loss']}, val cells right "
                  f"{100 * result['patch_accuracy']:.1f}%", flush=True)
        print(f"vision tower ({args.vision_layers} × {args.vision_hidden}, image {image_size}px / patch "
              f"{args.patch_size}) → {args.out}")
        return
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
