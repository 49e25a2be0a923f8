"""Step time and peak memory of layer-restricted fine-tuning (a benchmark, not a test).

On one random-init LLaVA model and one synthetic batch, in one run, it measures the median step time and the
peak memory of

* ``full``     full fine-tuning as LLaVA-1.5 stage 2 does it: the whole LLM (every decoder layer, embeddings,
               norm, lm_head) and the projector; the vision tower frozen;
* ``midtune``  the middle-half block of LLM layers (``middle:0.5``), frozen the midtune way: ``FreezePlan.apply``
               and ``train.activation_checkpointing.setup_checkpointing`` (nothing below the block records a graph;
               non-reentrant checkpointing only from the block up);
* ``naive``    the same block frozen the naive way: ``requires_grad=False`` plus reentrant gradient checkpointing
               with ``enable_input_require_grads()`` (``setup_naive_checkpointing``), as LLaVA, ms-swift and PEFT
               do, so the frozen prefix and vision tower are recomputed and back-propagated through;
* ``lora``     PEFT LoRA on the block the way ``train`` adds it (``method: lora``, default ``lora.*``), midtune cut;

all with gradient checkpointing, plus ``full-nockpt`` and ``midtune-nockpt`` (``naive-nockpt``, where only
``enable_input_require_grads()`` is on, on request). A step is forward + backward + gradient clipping (as
``train`` does) + AdamW (``train.build_optimizer``: fused where supported, the same for every configuration).

Every configuration × round runs in a fresh process (``--worker``); rounds alternate the order of the
configurations (round r starts r places further along) and the per-step times of all rounds are pooled
into one median per configuration. Single rounds on a shared 2-core machine vary by ±5 %.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the kernel's peak RSS (VmHWM, reset through
``/proc/self/clear_refs`` once the model is built). "training" memory is the peak above the built model
(gradients, AdamW state, activations, temporaries); "total" adds the model weights (peak above the process
before the model was built).

The analytic ratio is the unit model of ``step_units``. Prints a table and the goals, and appends a dated
section to BENCHMARKS.md (``--output`` elsewhere, ``--no-record`` to skip)::

    python -m train.bench                                   # tiny LLaVA on CPU, ~6 min on 2 quiet cores
    python -m train.bench --preset 1b                       # ~1.1B LLaVA, on the GPU in bf16 where there is one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from midtune.machine import machine_info
from train.memory import Memory

# -------------------------------------------------------------------------------------------------------------
# Presets and configurations
# -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A random-init LLaVA (CLIP vision tower → 2-layer MLP projector → Llama) and the batch it trains on."""

    name: str
    note: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    image_size: int
    patch_size: int
    vision_feature_layer: int  # llava-1.5 takes layer -2; the shallow tiny towers take the last one
    batch: int
    text_len: int  # text tokens per sample besides the image tokens
    rounds: int
    steps: int  # timed steps per worker
    warmup: int  # untimed steps first (the first one allocates the AdamW state)
    device: str = "cpu"  # cpu, cuda, or auto: cuda where available
    dtype: str = "fp32"  # fp32, bf16, or auto: bf16 on cuda, fp32 on cpu
    block: str = "middle:0.5"  # the trained block of the block configurations (a layer spec)
    paper_ratio: float | None = None  # the paper's time ratio for this block (its Table 1), a goal to beat
    paper_block: tuple | None = None  # (first, last, of): the paper's block, rescaled when --layers changes depth
    # The loss as train computes it: the LM head only at labelled positions (train's default); false: the model's
    # own loss, logits everywhere (the random-init presets, as first measured).
    logits_at_labels: bool = False
    # A packaged pretrained LLM (midtune.compose's PACKAGED_LLMS) composed with a random-init CLIP tower of the
    # vision_* sizes; the LLM fields above must then describe that LLM (they feed the analytic model).
    llm: str | None = None
    images: bool = True  # false: text-only samples (no image tokens, the vision tower idle)
    answer_len: int | None = None  # labelled tokens per sample, the last ones; None: all text after the lead

    def resolved(self) -> Preset:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype if self.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
        return replace(self, device=device, dtype=dtype)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.images else 0

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.text_len

    def describe(self) -> str:
        if self.llm:
            model = (f"{self.llm} (pretrained, {self.layers}×{self.hidden}, vocab {self.vocab}) composed with a "
                     f"random-init CLIP {self.vision_layers}×{self.vision_hidden} ({self.image_size}px/"
                     f"{self.patch_size}) into a LLaVA")
        else:
            model = (f"random-init LLaVA: CLIP {self.vision_layers}×{self.vision_hidden} ({self.image_size}px/"
                     f"{self.patch_size}, feature layer {self.vision_feature_layer}) → MLP projector → Llama "
                     f"{self.layers}×{self.hidden} (intermediate {self.intermediate}, {self.heads} heads / "
                     f"{self.kv_heads} KV, vocab {self.vocab})")
        return (f"{model}; batch {self.batch} × {self.seq_len} tokens ({self.image_tokens} image + {self.text_len} "
                f"text, {labelled_positions(self)} labelled), loss from logits at "
                f"{'labelled positions' if self.logits_at_labels else 'every position'}, {self.dtype} on "
                f"{self.device}")


def scaled_block(lo: int, hi: int, of: int, layers: int) -> str:
    """Layers lo-hi of an `of`-layer LLM, at the same fraction and position of depth in a `layers`-layer one."""
    return f"{round(lo / of * layers)}-{round((hi + 1) / of * layers) - 1}"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # The shape of the anchors' prototype measurements (16 layers, block 4-11), hidden 512. With
        # checkpointing on, weights + gradients + AdamW state outweigh the activations: the memory preset.
        Preset("tiny", "default; CPU; weights + optimizer state outweigh activations (with checkpointing)",
               layers=16, hidden=512, heads=8, kv_heads=4, intermediate=2048, vocab=512,
               vision_layers=4, vision_hidden=192, vision_heads=4, image_size=64, patch_size=8,
               vision_feature_layer=-1, batch=2, text_len=64, rounds=4, steps=6, warmup=2),
        # For tests: seconds per configuration.
        Preset("smoke", "tests only", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=256, vocab=128,
               vision_layers=2, vision_hidden=32, vision_heads=4, image_size=32, patch_size=8,
               vision_feature_layer=-1, batch=1, text_len=16, rounds=1, steps=2, warmup=1),
        # ~1.1B parameters: llava-1.5's vision tower (CLIP ViT-L/14 at 336 px, 576 image tokens, layer -2) and
        # a 16-layer TinyLlama-width LLM (2048, intermediate 5632, 32 heads / 4 KV, vocab 32064). For a GPU.
        Preset("1b", "~1.1B parameters; for a GPU (bf16 there by default)",
               layers=16, hidden=2048, heads=32, kv_heads=4, intermediate=5632, vocab=32064,
               vision_layers=24, vision_hidden=1024, vision_heads=16, image_size=336, patch_size=14,
               vision_feature_layer=-2, batch=4, text_len=128, rounds=4, steps=10, warmup=3, device="auto",
               dtype="auto"),
        # Qwen2.5-VL's vocabulary (151,936) on a small random-init LLaVA, one long sample with a short answer (the
        # shape of a 7B VLM's batch: image and prompt tokens, then an answer): what logits everywhere cost in
        # memory, a [tokens × vocabulary] fp32 tensor (here 1088 × 151,936 × 4 B = 661 MB) and its gradient.
        Preset("qwen-vocab", "Qwen2.5-VL's 152k vocabulary; logits' memory (--configs full,full-all-logits)",
               layers=4, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=151936, vision_layers=2,
               vision_hidden=64, vision_heads=4, image_size=64, patch_size=8, vision_feature_layer=-1, batch=1,
               text_len=1024, rounds=2, steps=3, warmup=2, logits_at_labels=True, answer_len=128),
        # The real pretrained LLM (SmolLM2-135M-Instruct, 30 layers, the demo's) and the paper's blocks at the same
        # fraction and position of depth: LLaVA-7B trained layers 6-16 of 32 (98.8 % of full's score in 86.1 % of
        # its time), OneVision-4B layers 8-25 of 36 (100.4 % in 75.7 %). Batch 8 × (64 image + 40 text) tokens.
        *(Preset(f"smollm2-{paper}", f"SmolLM2-135M in a LLaVA; the paper's {paper} block {lo}-{hi} of {of} as "
                 f"{scaled_block(lo, hi, of, 30)} of 30", layers=30, hidden=576, heads=9, kv_heads=3,
                 intermediate=1536, vocab=49152, vision_layers=4, vision_hidden=192, vision_heads=4, image_size=64,
                 patch_size=8, vision_feature_layer=-2, batch=8, text_len=40, rounds=3, steps=4, warmup=2,
                 device="auto", dtype="auto", block=scaled_block(lo, hi, of, 30), paper_ratio=ratio,
                 logits_at_labels=True, llm="smollm2-135m-instruct")
          for paper, lo, hi, of, ratio in (("llava", 6, 16, 32, 0.861), ("onevision", 8, 25, 36, 0.757))),
        # LLaVA-1.5-7B's widths (Vicuna-7B: hidden 4096, MLP 11008, 32 heads, no GQA; CLIP ViT-L/14 at 336 px: 576
        # image tokens, feature layer -2) and the paper's block, layers 6-16 of 32, at the same fraction of depth
        # when fewer layers fit (--layers fit: as many as the GPU holds for full fine-tuning). Random-init: step
        # time and memory do not depend on the weights. 576 image + 160 text tokens per sample, the last 64
        # labelled (a VQA-style answer). For a GPU.
        Preset("llava7b-width", "LLaVA-1.5-7B's layer width; the paper's block 6-16 of 32; for a GPU",
               layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32064, vision_layers=24,
               vision_hidden=1024, vision_heads=16, image_size=336, patch_size=14, vision_feature_layer=-2,
               batch=4, text_len=160, answer_len=64, rounds=3, steps=5, warmup=2, device="auto", dtype="auto",
               block="6-16", paper_ratio=0.861, paper_block=(6, 16, 32), logits_at_labels=True),
    ]
}


def layer_parameters(preset: Preset) -> int:
    """Parameters of one decoder layer: attention (q, o full width; k, v at the KV heads' width), MLP, norms."""
    kv = preset.hidden // preset.heads * preset.kv_heads
    return 2 * preset.hidden ** 2 + 2 * preset.hidden * kv + 3 * preset.hidden * preset.intermediate + 2 * preset.hidden


def layers_that_fit(preset: Preset, device_bytes: int, share: float = 0.7) -> int:
    """How many decoder layers full fine-tuning of `preset` holds in `share` of `device_bytes`: weights,
    gradients and AdamW's two moments, all in the weights' dtype as the bench trains them (8 bytes a parameter
    in bf16, 16 in fp32), for the layers, the embeddings and head, the vision tower and projector; the other 30 %
    is left to activations (checkpointed) and the allocator. At most the preset's own layer count."""
    per_param = 8 if preset.dtype == "bf16" else 16
    vision = preset.vision_layers * 12 * preset.vision_hidden ** 2
    fixed = 2 * preset.vocab * preset.hidden + vision + 2 * preset.hidden * (preset.hidden + preset.vision_hidden)
    room = share * device_bytes - fixed * per_param
    return max(1, min(preset.layers, int(room // (layer_parameters(preset) * per_param))))


def fit_layers(preset: Preset) -> int:
    import torch

    if not preset.device.startswith("cuda"):
        return preset.layers  # on the CPU the preset's own depth (the smoke tests pass a number)
    return layers_that_fit(preset, torch.cuda.get_device_properties(torch.device(preset.device)).total_memory)


def with_layers(preset: Preset, layers: int) -> Preset:
    """The preset at another depth; a paper block moves with it, to the same fraction and position of depth."""
    block = scaled_block(*preset.paper_block, layers) if preset.paper_block else preset.block
    return replace(preset, layers=layers, block=block)

FULL_SPEC = {"layers": "all", "projector": True, "embeddings": True, "norm": True, "lm_head": True}


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    mode: str  # full | midtune | naive | lora (the rows of step_units)
    checkpointing: bool
    all_logits: bool = False  # the LM head at every position, whatever the preset's loss


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in [
        Setup("full", "full fine-tuning", "full", True),
        Setup("midtune", "midtune: block", "midtune", True),
        Setup("naive", "naive: block", "naive", True),
        Setup("lora", "LoRA on the block", "lora", True),
        Setup("full-nockpt", "full fine-tuning", "full", False),
        Setup("midtune-nockpt", "midtune: block", "midtune", False),
        Setup("naive-nockpt", "naive: block", "naive", False),
        Setup("full-all-logits", "full fine-tuning, logits everywhere", "full", True, all_logits=True),
    ]
}
DEFAULT_SETUPS = ("full", "midtune", "naive", "lora", "full-nockpt", "midtune-nockpt")
CKPT_WORDS = {
    "full": "non-reentrant, all LLM layers",
    "midtune": "non-reentrant, block and above",
    "naive": "reentrant, every layer + input grads",
    "lora": "non-reentrant, block and above",
}


def ckpt_word(setup: Setup) -> str:
    if setup.checkpointing:
        return CKPT_WORDS[setup.mode]
    return "off, input grads on" if setup.mode == "naive" else "off"


# -------------------------------------------------------------------------------------------------------------
# The analytic unit model
# -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """Forward cost of the parts outside the decoder layers, in decoder-layer forwards (matmul FLOPs; attention
    scores left out: a few % at these lengths). `vision_used`: the vision layers whose output the LLM reads."""

    head: float = 0.0
    vision: float = 0.0
    vision_used: float = 0.0
    projector: float = 0.0
    lora: float = 0.0  # LoRA adapters of one layer relative to its base weights


def step_units(mode: str, checkpointing: bool, num_layers: int, block: range, w: Weights = Weights()) -> float:
    """Cost of one training step in units of one decoder-layer forward.

    Unit model, per decoder layer: forward 1, input-gradient 1, weight-gradient 1, recompute 1 (a checkpointed
    layer that records a graph runs its forward again in backward). Forward runs everywhere; input-gradients
    run from the top down to the lowest layer whose input needs a gradient; weight-gradients only where
    parameters train. With P = layers under the block, B = block layers, S = layers above it, c = 1 with
    checkpointing else 0, and H, V, Π the head, vision tower and projector weights:

        full     L·(3 + c)                    + 3H + V + 2Π    (everything from the projector up trains)
        midtune  P + B·(3 + c) + S·(2 + c)    + 2H + V + Π     (the prefix runs once, records nothing)
        naive    P·(2 + c) + B·(3 + c) + S·(2 + c) + 2H + V + (1 + c)·V_used + 2Π
                 (inputs require grad: the prefix, projector and vision tower get input-gradients, and with
                 checkpointing, which is then on every layer, are recomputed too)
        lora     as midtune with block layers (1 + a)·(2 + c) + a   (a = adapter / base FLOPs: no base
                 weight-gradient)

    For 16 layers and block 4-11 (H = V = Π = 0): midtune / full = 36/48 = 0.750 without checkpointing and
    48/64 = 0.750 with it; midtune / naive with checkpointing = 48/56 = 0.857, without it 36/40 = 0.900.
    """
    L, P, B = num_layers, block.start, len(block)
    S = L - P - B
    c = 1 if checkpointing else 0
    if mode == "full":
        return L * (3 + c) + 3 * w.head + w.vision + 2 * w.projector
    if mode == "midtune":
        return P + B * (3 + c) + S * (2 + c) + 2 * w.head + w.vision + w.projector
    if mode == "naive":
        return (P * (2 + c) + B * (3 + c) + S * (2 + c) + 2 * w.head + w.vision + (1 + c) * w.vision_used
                + 2 * w.projector)
    if mode == "lora":
        a = w.lora
        return P + B * ((1 + a) * (2 + c) + a) + S * (2 + c) + 2 * w.head + w.vision + w.projector
    raise ValueError(mode)


def block_layers(preset: Preset) -> range:
    from midtune.spec import resolve_layers

    layers = resolve_layers(preset.block, preset.layers)
    return range(layers[0], layers[-1] + 1)


def flop_weights(p: Preset, lora_r: int | None = None, all_logits: bool = False) -> Weights:
    """`Weights` of a preset: matmul multiply-adds per step of each part over those of one decoder layer. The LM
    head runs at the labelled positions only when the preset's loss computes logits there (and not `all_logits`)."""
    head_dim = p.hidden // p.heads
    q, kv = p.heads * head_dim, p.kv_heads * head_dim
    linears = {"q_proj": (p.hidden, q), "k_proj": (p.hidden, kv), "v_proj": (p.hidden, kv), "o_proj": (q, p.hidden),
               "gate_proj": (p.hidden, p.intermediate), "up_proj": (p.hidden, p.intermediate),
               "down_proj": (p.intermediate, p.hidden)}
    per_token = sum(i * o for i, o in linears.values())
    layer = per_token * p.batch * p.seq_len
    vision_tokens = p.batch * (p.image_tokens + 1) if p.images else 0  # + CLS
    vh = p.vision_hidden
    vision_layer = (4 * vh * vh + 2 * vh * 4 * vh) * vision_tokens
    used = p.vision_layers + 1 + p.vision_feature_layer if p.vision_feature_layer < 0 else p.vision_feature_layer
    projector = (vh * p.hidden + p.hidden * p.hidden) * p.batch * p.image_tokens
    lora = 0.0
    if lora_r:
        lora = sum(lora_r * (i + o) for i, o in linears.values()) / per_token
    head_positions = labelled_positions(p) if p.logits_at_labels and not all_logits else p.seq_len
    return Weights(head=p.hidden * p.vocab * p.batch * head_positions / layer,
                   vision=p.vision_layers * vision_layer / layer, vision_used=used * vision_layer / layer,
                   projector=projector / layer, lora=lora)


def analytic(preset: Preset, setup: Setup, baseline: str, lora_r: int) -> float:
    """Analytic step-time ratio of `setup` over `baseline` (full or naive, the preset's loss) with the same
    checkpointing."""
    block = block_layers(preset)
    return (step_units(setup.mode, setup.checkpointing, preset.layers, block,
                       flop_weights(preset, lora_r, setup.all_logits))
            / step_units(baseline, setup.checkpointing, preset.layers, block, flop_weights(preset, lora_r)))


LEAD_TOKENS = 4  # make_batch's text tokens before the image


def labelled_positions(p: Preset) -> int:
    """Positions per sample whose next token carries a label in make_batch's batch (the text after the image)."""
    return p.answer_len if p.answer_len is not None else p.text_len - min(LEAD_TOKENS, p.text_len)


# -------------------------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# -------------------------------------------------------------------------------------------------------------


def composed_dir(preset: Preset) -> Path:
    """Where the real-LLM presets keep their composed LLaVA ($MIDTUNE_CACHE/bench/...), built once."""
    from midtune.files import cache_dir

    tower = f"clip{preset.vision_layers}x{preset.vision_hidden}-{preset.image_size}px{preset.patch_size}"
    return cache_dir("bench", f"{preset.llm}+{tower}-layer{preset.vision_feature_layer}")


def ensure_composed(preset: Preset, seed: int = 0) -> Path:
    """The preset's LLM composed (midtune.compose) with a random-init CLIP tower; built on first use. Timings do
    not depend on the tower's weights, and the LLM is the real one."""
    import tempfile

    from midtune.compose import compose
    from midtune.tiny import build_vision_tower

    out = composed_dir(preset)
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        build_vision_tower(Path(tmp) / "tower", image_size=preset.image_size, patch_size=preset.patch_size,
                           layers=preset.vision_layers, hidden=preset.vision_hidden, heads=preset.vision_heads,
                           seed=seed)
        compose(Path(tmp) / "tower", preset.llm, out, vision_feature_layer=preset.vision_feature_layer, seed=seed,
                overwrite=True, verbose=False)
    return out


def build_model(preset: Preset, seed: int):
    import torch
    from transformers import LlavaForConditionalGeneration

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[preset.dtype]
    if preset.llm:
        from midtune.checkpoint import load_pretrained

        model, _ = load_pretrained(str(ensure_composed(preset)), dtype="float32")
        return model.to(device=preset.device, dtype=dtype), dtype

    from midtune.adapters import TinySize, family_of

    size = TinySize(vocab_size=preset.vocab, image_size=preset.image_size, patch_size=preset.patch_size,
                    layers=preset.layers, hidden=preset.hidden, heads=preset.heads, kv_heads=preset.kv_heads,
                    intermediate=preset.intermediate, vision_layers=preset.vision_layers,
                    vision_hidden=preset.vision_hidden, vision_heads=preset.vision_heads,
                    special_ids={"<image>": preset.vocab - 1})
    config = family_of("llava").build_tiny(size)
    config.vision_feature_layer = preset.vision_feature_layer
    config.text_config.max_position_embeddings = max(1024, preset.seq_len)
    torch.manual_seed(seed)
    with torch.device(preset.device):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype), dtype


def make_batch(preset: Preset, seed: int, dtype, image_id: int) -> dict:
    """A fixed synthetic batch: a few text tokens, the image's run of image tokens, then text; labels on text."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    lead = min(LEAD_TOKENS, preset.text_len)
    text = torch.randint(0, min(image_id, preset.vocab - 1), (preset.batch, preset.text_len), generator=g)
    images = torch.full((preset.batch, preset.image_tokens), image_id)
    input_ids = torch.cat([text[:, :lead], images, text[:, lead:]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labelled = labelled_positions(preset)
    labels[:, input_ids.shape[1] - labelled:] = input_ids[:, input_ids.shape[1] - labelled:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if preset.images:
        pixel_values = torch.randn(preset.batch, 3, preset.image_size, preset.image_size, generator=g)
        batch["pixel_values"] = pixel_values.to(dtype)
    return {k: v.to(preset.device) for k, v in batch.items()}


def run_worker(setup: Setup, preset: Preset, seed: int) -> dict:
    """Build, freeze the `setup` way, warm up, time `preset.steps` steps; returns times and memory."""
    import torch

    from midtune.adapters import family_of
    from midtune.spec import TrainableSpec, resolve_plan
    from train.activation_checkpointing import setup_checkpointing, setup_naive_checkpointing
    from train.config import LoraConfig, OptimConfig
    from train.lora import add_lora
    from train.loss import causal_lm_loss
    from train.optimizer import build_optimizer, keep_trainable_in

    memory = Memory(preset.device)
    model, dtype = build_model(preset, seed)
    config = SimpleNamespace(optim=OptimConfig(), lora=LoraConfig())
    full = dict(FULL_SPEC)
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        full["lm_head"] = False  # tied to the embeddings (SmolLM2): trained with them
    spec = TrainableSpec.from_dict(full if setup.mode == "full" else {"layers": preset.block})
    if setup.mode == "lora":
        torch.manual_seed(seed)
        model = add_lora(model, spec, config)
    plan = resolve_plan(model, spec, adapter_marker="lora_" if setup.mode == "lora" else None)
    plan.apply(model)
    autocast = contextlib.nullcontext()
    if dtype != torch.float32:  # as train does: fp32 master weights of what trains, low-precision compute
        keep_trainable_in(model, plan, "float32")
        autocast = torch.autocast(device_type=torch.device(preset.device).type, dtype=dtype)
    if setup.mode == "naive":
        if setup.checkpointing:
            setup_naive_checkpointing(model)  # reentrant on every layer + enable_input_require_grads()
        else:
            from midtune.adapters import unwrap

            unwrap(model).enable_input_require_grads()
    else:
        setup_checkpointing(model, plan, setup.checkpointing)
    model.train()
    optimizer = build_optimizer(model, plan, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(preset, seed, dtype, image_id=model.config.image_token_id)
    at_labels = preset.logits_at_labels and not setup.all_logits
    parts = family_of(model).parts(model)
    memory.mark()

    def step(marks: list | None = None):
        with autocast:
            loss = causal_lm_loss(model, batch, at_labels)  # as train computes it
        loss.backward()
        if marks is not None:  # forward + backward done: the rest is clipping and AdamW over what trains
            if memory.cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # Count forwards of LLM layer 0 and vision layer 0 in the first step (the norms also see recomputes) and
    # whether layer 0's output records a graph: the backward cut made visible.
    calls = {"llm0": 0, "vision0": 0}
    graph = {}

    def count(key):
        def hook(*_):  # a forward hook that returns something replaces the module's output
            calls[key] += 1
        return hook

    def record_graph(module, inputs, output):
        graph.setdefault("llm0", (output[0] if isinstance(output, tuple) else output).requires_grad)

    hooks = [
        parts.language_layers[0].input_layernorm.register_forward_hook(count("llm0")),
        parts.vision_layers[0].layer_norm1.register_forward_hook(count("vision0")),
        parts.language_layers[0].register_forward_hook(record_graph),
    ]
    losses = [float(step().detach())]
    for h in hooks:
        h.remove()
    for _ in range(preset.warmup - 1):
        step()
    times, cpu_times, fwd_bwd_times = [], [], []
    for _ in range(preset.steps):
        start, cpu_start, marks = time.perf_counter(), time.process_time(), []
        loss = step(marks)
        if memory.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        fwd_bwd_times.append(marks[0] - start)
    losses.append(float(loss.detach()))
    peak = memory.peak()
    n_trainable = sum(p.numel() for p in trainable)
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "setup": setup.name,
        "step_times": times,
        "cpu_times": cpu_times,  # process CPU time (all threads): less sensitive to other load than wall time
        "fwd_bwd_times": fwd_bwd_times,  # the step's forward + backward (without clipping and the optimizer)
        "peak_training_bytes": peak - memory.base,
        "peak_total_bytes": peak - memory.start,
        "weights_bytes": weights,
        "state_bytes": 3 * trainable_bytes,  # gradients + AdamW exp_avg + exp_avg_sq, in the master weights' dtype
        "trainable": n_trainable,
        "total": sum(p.numel() for p in model.parameters()),
        "llm0_forwards": calls["llm0"],
        "vision0_forwards": calls["vision0"],
        "llm0_graph": graph.get("llm0"),
        "block": plan.trainable_layers,
        "losses": losses,
        "threads": torch.get_num_threads(),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
    }


# -------------------------------------------------------------------------------------------------------------
# Orchestration
# -------------------------------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def launch(setup: Setup, preset: Preset, seed: int, threads: int, in_process: bool) -> dict:
    if in_process:  # tests: no fresh process, so not a measurement
        import torch

        torch.set_num_threads(threads)
        return {**run_worker(setup, preset, seed), "in_process": True}
    cmd = [sys.executable, "-m", "train.bench", "--worker", setup.name, "--worker-preset",
           json.dumps(asdict(preset)), "--seed", str(seed), "--threads", str(threads)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), cwd=root, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {setup.name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def mib(n: float) -> float:
    return n / 2**20


def summarize(preset: Preset, runs: dict[str, list[dict]], lora_r: int) -> list[dict]:
    rows = []
    for name, results in runs.items():
        setup = SETUPS[name]
        times = [t for r in results for t in r["step_times"]]
        first = results[0]
        rows.append({
            "setup": name, "label": setup.label, "mode": setup.mode, "checkpointing": setup.checkpointing,
            "median_s": statistics.median(times),
            "round_medians": [statistics.median(r["step_times"]) for r in results],
            "median_cpu_s": statistics.median(t for r in results for t in r["cpu_times"]),
            "median_fwd_bwd_s": statistics.median(t for r in results for t in r["fwd_bwd_times"]),
            "samples": len(times),
            # in one process, later configurations reuse memory freed by earlier ones: no peak to report
            "peak_training_mib": None if first.get("in_process") else
            mib(statistics.median(r["peak_training_bytes"] for r in results)),
            "peak_total_mib": None if first.get("in_process") else
            mib(statistics.median(r["peak_total_bytes"] for r in results)),
            "weights_mib": mib(first["weights_bytes"]), "state_mib": mib(first["state_bytes"]),
            "trainable": first["trainable"], "total": first["total"], "llm0_forwards": first["llm0_forwards"],
            "vision0_forwards": first["vision0_forwards"], "llm0_graph": first["llm0_graph"], "block": first["block"],
            "losses": first["losses"], "fused_adamw": first["fused_adamw"],
        })
    by = {(r["mode"], r["checkpointing"]): r for r in rows if not SETUPS[r["setup"]].all_logits}
    for r in rows:
        setup = SETUPS[r["setup"]]
        for base in ("full", "naive"):
            ref = by.get((base, r["checkpointing"]))
            if ref is None or (setup.mode == "full" and base == "naive"):  # naive is a block: no full vs naive
                r[f"vs_{base}"] = r[f"mem_vs_{base}"] = r[f"analytic_vs_{base}"] = None
                continue
            r[f"vs_{base}"] = r["median_s"] / ref["median_s"]
            r[f"mem_vs_{base}"] = None if r["peak_training_mib"] is None else \
                r["peak_training_mib"] / ref["peak_training_mib"]
            r[f"analytic_vs_{base}"] = analytic(preset, setup, base, lora_r)
    return rows


def params_line(rows: list[dict]) -> str:
    base = min(r["total"] for r in rows)  # LoRA adds its adapters
    return f"{base / 1e6:.1f}M parameters"


def fmt(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def table(rows: list[dict], block: range) -> str:
    head = ("| configuration | checkpointing | median step s | vs full | vs naive | analytic vs full | "
            "analytic vs naive | peak training MiB | vs full | peak total MiB | trainable | CPU s/step | "
            "layer-0 fwd/step, graph |")
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        label = r["label"] + (f" {block.start}-{block.stop - 1}" if r["mode"] != "full" else "")
        lines.append(
            f"| {label} | {ckpt_word(SETUPS[r['setup']])} | {r['median_s']:.3f} | {fmt(r['vs_full'])} | "
            f"{fmt(r['vs_naive'])} | {fmt(r['analytic_vs_full'])} | {fmt(r['analytic_vs_naive'])} | "
            f"{fmt(r['peak_training_mib'], '.0f')} | {fmt(r['mem_vs_full'], '.2f')} | "
            f"{fmt(r['peak_total_mib'], '.0f')} | "
            f"{r['trainable'] / 1e6:.2f}M | {r['median_cpu_s']:.2f} | {r['llm0_forwards']}, "
            f"{'yes' if r['llm0_graph'] else 'no'} |")
    return "\n".join(lines)


def goals(rows: list[dict], preset: Preset) -> list[str]:
    by = {r["setup"]: r for r in rows}
    out = []

    def line(name, value, limit, detail):
        if value is None:
            out.append(f"- n/a: {name}: not measured (--in-process: configurations share one process's memory)")
            return
        verdict = "PASS" if value <= limit else "MISS"
        margin = (limit - value) / limit * 100
        out.append(f"- {verdict}: {name} = {value:.3f} ≤ {limit:.3f} ({'under' if margin >= 0 else 'over'} by "
                   f"{abs(margin):.1f} %); {detail}")

    m, f, n = by.get("midtune"), by.get("full"), by.get("naive")
    if m and f:
        line("step time midtune / full", m["vs_full"], 1.05 * m["analytic_vs_full"],
             f"goal 1.05 × analytic {m['analytic_vs_full']:.3f}, both with checkpointing")
    if m and f and preset.paper_ratio:
        line("step time midtune / full vs the paper", m["vs_full"], preset.paper_ratio,
             f"the paper's time ratio for this block (Table 1): {preset.paper_ratio:.3f}")
    a = by.get("full-all-logits")
    if a and f:
        line("full step, logits at labels / logits everywhere", f["median_s"] / a["median_s"], 0.80,
             f"goal: at least 20 % cut; analytic {1 / a['analytic_vs_full']:.3f} (layers and head); forward + "
             f"backward alone {f['median_fwd_bwd_s'] / a['median_fwd_bwd_s']:.3f} ({f['median_fwd_bwd_s']:.3f} s / "
             f"{a['median_fwd_bwd_s']:.3f} s): the rest of the step, clipping and AdamW over "
             f"{f['trainable'] / 1e6:.0f}M weights, costs the same in both")
    if m and n:
        line("step time midtune / naive", m["vs_naive"], 0.86,
             f"analytic {m['analytic_vs_naive']:.3f}, both with checkpointing (a prototype measured 0.82)")
    if m and f:
        detail = "both with checkpointing"
        if f["peak_training_mib"] is not None:
            act = f["peak_training_mib"] - f["state_mib"]
            outweigh = f["weights_mib"] + f["state_mib"] > act
            detail += (f"; preset {preset.name}: weights {f['weights_mib']:.0f} MiB + gradients and AdamW state of "
                       f"full {f['state_mib']:.0f} MiB vs activations and temporaries ≈ {act:.0f} MiB "
                       f"({'outweigh' if outweigh else 'do NOT outweigh'})")
        line("peak training memory midtune / full", m["mem_vs_full"], 0.6, detail)
    first = {r["losses"][0] for r in rows}
    spread = (max(first) - min(first)) / max(abs(min(first)), 1e-12)
    if len(first) == 1:
        verdict = "identical"
    elif preset.dtype != "fp32":  # what trains is fp32 (master weights), frozen tensors low precision: rounding
        verdict = f"differs by {spread:.1e} relative (mixed precision: trainable tensors fp32, frozen {preset.dtype})"
    elif spread < 1e-5 and "full-all-logits" in by:  # the two losses sum the same terms in a different order
        verdict = f"equal within float rounding ({spread:.1e} relative: logits at labels and everywhere reduce apart)"
    else:
        verdict = "DIFFERS"
    check = f"- check: first-step loss {verdict} across configurations"
    if m and n:
        same = m["losses"][-1] == n["losses"][-1]
        check += (f"; midtune and naive reach {'the same' if same else 'DIFFERENT'} loss after "
                  f"{preset.warmup + preset.steps} steps ({m['losses'][-1]:.6f}, {n['losses'][-1]:.6f})")
    out.append(check)
    if m and f and n:
        out.append(f"- (CPU time per step, less sensitive to other load than wall time) midtune / full = "
                   f"{m['median_cpu_s'] / f['median_cpu_s']:.3f}, midtune / naive = "
                   f"{m['median_cpu_s'] / n['median_cpu_s']:.3f}")
    mn, fn = by.get("midtune-nockpt"), by.get("full-nockpt")
    if mn and fn:
        out.append(f"- (no checkpointing) step time midtune / full = {mn['vs_full']:.3f}, analytic "
                   f"{mn['analytic_vs_full']:.3f} ({mn['vs_full'] / mn['analytic_vs_full']:.3f} × analytic); "
                   f"peak training memory {fmt(mn['mem_vs_full'], '.2f')}")
    return out


def record(path: Path, preset: Preset, rows: list[dict], goal_lines: list[str], info: dict, command: str,
           block: range, wall: float) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fused = "fused " if rows and rows[0].get("fused_adamw", True) else ""
    where = "all in this one process (--in-process: not a measurement)" if rows[0]["peak_training_mib"] is None \
        else "each in a fresh process"
    memory = "allocated (CUDA)" if preset.device.startswith("cuda") else "RSS (VmHWM)"
    section = f"""
## train: layer-restricted step time and peak memory, preset {preset.name}, {when}

- model: {preset.describe()}; {params_line(rows)}
- configurations: block = LLM layers {block.start}-{block.stop - 1} (`{preset.block}`); full = the whole LLM +
  projector, vision tower frozen (LLaVA-1.5 stage 2); naive = the block frozen with `requires_grad=False` +
  `enable_input_require_grads()` (+ reentrant checkpointing on every layer: LLaVA, ms-swift, PEFT; on
  transformers' Llava this also hooks the CLIP patch embedding, so the vision tower is recomputed and
  back-propagated too); LoRA = `train`'s `lora.*` defaults on the block, midtune cut
- step = forward + backward + gradient clipping + {fused}AdamW; {preset.rounds} round(s) × {preset.steps} timed
  steps ({preset.warmup} warm-up) per configuration, {where}, order rotated every round; median of the pooled
  steps. Ratios compare rows with the same checkpointing; analytic = the unit model `train.bench.step_units`
  (decoder layers; head, vision tower and projector weighted by FLOPs)
- peak training memory = peak {memory} above the built model (gradients, AdamW state, activations,
  temporaries); total adds the weights
- command: `{command}`; wall time {wall / 60:.1f} min
- machine: {info["cpu"]}, {info["cores"]} cores (torch threads {info["torch_threads"]}), GPU: {info["gpu"]},
  device {info["device"]}, load average at start {info["load_average"]}
- versions: python {info["python"]}, torch {info["torch"]}, transformers {info["transformers"]}, peft {info["peft"]}

{table(rows, block)}

Goals (preset {preset.name}: {preset.note}):
{chr(10).join(goal_lines)}
"""
    if not path.exists():
        path.write_text("# Benchmarks\n")
    with path.open("a") as f:
        f.write(section)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--configs", default=",".join(DEFAULT_SETUPS),
                    help=f"comma-separated, from {', '.join(SETUPS)} (default: %(default)s)")
    ap.add_argument("--rounds", type=int, help="rounds (each configuration once per round); preset default")
    ap.add_argument("--steps", type=int, help="timed steps per worker; preset default")
    ap.add_argument("--warmup", type=int, help="untimed steps per worker first; preset default")
    ap.add_argument("--batch", type=int, help="samples per step; preset default")
    ap.add_argument("--text-len", type=int, help="text tokens per sample; preset default")
    ap.add_argument("--answer-len", type=int, help="labelled tokens per sample (the last ones); default: all text "
                    "after the first 4")
    ap.add_argument("--text-only", action="store_true", help="samples without an image (the vision tower idle)")
    ap.add_argument("--layers", help="decoder layers (a number, or `fit`: as many as full fine-tuning holds in "
                                     "70 %% of the GPU's memory); a paper block keeps its fraction of depth")
    ap.add_argument("--device", help="cpu, cuda or auto; preset default (tiny: cpu, 1b: auto)")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "auto"),
                    help="weight dtype (auto: bf16 on cuda); preset default (tiny: fp32, 1b: auto)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every worker (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="BENCHMARKS.md", help="markdown file to append the results to")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument("--json", help="also write the per-configuration results (with every round) here")
    ap.add_argument("--in-process", action="store_true",
                    help="run configurations in this process (tests, debugging: not a measurement)")
    ap.add_argument("--worker", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-preset", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        preset = Preset(**json.loads(args.worker_preset))
        print(json.dumps(run_worker(SETUPS[args.worker], preset, args.seed)))
        return 0

    given = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
             "text_len": args.text_len, "device": args.device, "dtype": args.dtype, "answer_len": args.answer_len,
             "images": False if args.text_only else None}
    overrides = {k: v for k, v in given.items() if v is not None}
    preset = replace(PRESETS[args.preset], **overrides).resolved()
    if args.layers:
        preset = with_layers(preset, fit_layers(preset) if args.layers == "fit" else int(args.layers))
    if preset.warmup < 1 or preset.steps < 1 or preset.rounds < 1:
        ap.error("--rounds, --steps and --warmup must be at least 1")
    if not 1 <= labelled_positions(preset) < preset.seq_len:
        ap.error(f"--answer-len must be between 1 and the {preset.seq_len - 1} tokens after the first")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        ap.error(f"unknown configuration(s) {unknown}; choose from {', '.join(SETUPS)}")
    os.environ.update({k: v for k, v in thread_env(args.threads).items() if k.endswith("_NUM_THREADS")})
    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers

    info = machine_info(torch_threads=args.threads, device=preset.device, transformers=transformers.__version__,
                        peft=peft.__version__)
    block = block_layers(preset)
    from train.config import LoraConfig

    lora_r = LoraConfig().r
    print(f"preset {preset.name}: {preset.describe()}; block {block.start}-{block.stop - 1}", flush=True)
    if preset.llm:
        print(f"composed model: {ensure_composed(preset, args.seed)}", flush=True)  # once, before the workers
    print(f"machine: {info}", flush=True)

    started = time.time()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    total = preset.rounds * len(names)
    done = 0
    for r in range(preset.rounds):
        for name in rotated(names, r):
            t0 = time.time()
            result = launch(SETUPS[name], preset, args.seed, args.threads, args.in_process)
            runs[name].append(result)
            done += 1
            print(f"[{done}/{total}] round {r + 1} {name:<15} median step "
                  f"{statistics.median(result['step_times']):.3f} s, peak training "
                  f"{mib(result['peak_training_bytes']):.0f} MiB, layer-0 fwd {result['llm0_forwards']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    wall = time.time() - started

    rows = summarize(preset, runs, lora_r)
    goal_lines = goals(rows, preset)
    text = table(rows, block)
    print()
    print(text)
    print(f"\nGoals (preset {preset.name}: {preset.note}):")
    print("\n".join(goal_lines))
    print(f"\nmodel: {params_line(rows)}; wall time {wall / 60:.1f} min")
    if args.json:
        preset_json = {**asdict(preset), "seq_len": preset.seq_len}  # tokens per sample, image tokens included
        Path(args.json).write_text(json.dumps({"preset": preset_json, "machine": info, "rows": rows, "runs": runs,
                                               "goals": goal_lines}, indent=1))
    if not args.no_record:
        command = "python -m train.bench" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                             " " + shlex.join(argv if argv is not None else sys.argv[1:]))
        record(Path(args.output), preset, rows, goal_lines, info, command, block, wall)
        print(f"appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
