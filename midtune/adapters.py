"""Model-family adapters: where each supported Hugging Face VLM keeps its parts.

Every difference between families lives in the `FAMILIES` table below, so supporting a new family is one
entry. Everything else in midtune (freezing, data, training, analysis) asks the adapter, never a class name.

Paths are dotted attribute paths from the top-level model (e.g. `LlavaForConditionalGeneration`). A part with
several candidate paths lists them in order; the first that exists wins (transformers has moved the CLIP
encoder between `vision_model.encoder` and `encoder` across releases).

The language layers are always found through the *language model's own* layer list: other tools matched
"layers.<i>" by name and picked up the vision blocks too (ms-swift on Qwen2.5-VL, PEFT on CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    """One supported model family.

    `projector` lists modules *and* bare parameters (LLaVA-Next's `image_newline`) that form the bridge from
    vision to language. In Qwen2-VL the projector (`visual.merger`) lives inside the vision tower; parameter
    ownership is decided by the longest matching path, so the merger still counts as projector.
    """

    name: str  # short name used on command lines and in configs
    model_class: str  # transformers class name
    processor_class: str
    language_model: str
    language_layers: str
    embeddings: str
    norm: str
    lm_head: str
    vision_tower: str
    vision_layers: tuple[str, ...]  # candidates, relative to the vision tower
    projector: tuple[str, ...]
    # How images appear in input_ids: the processor replaces each image placeholder with a contiguous run of
    # `config.<image_token_attr>` ids (576 for llava-1.5, variable for anyres/Qwen). Qwen wraps the run in
    # vision start/end tokens, which the chat template writes.
    image_token_attr: str = "image_token_id"
    # How the image appears inside a chat-template string (what our tiny templates write).
    image_placeholder: str = "<image>"
    # Tokens the tiny tokenizer needs for this family beyond the shared chat tokens.
    special_tokens: tuple[str, ...] = ("<image>",)
    # Whether the image processor resizes to a pixel budget (Qwen2-VL/2.5-VL: min_pixels..max_pixels, so the
    # image-token count follows the image's size) rather than to the vision tower's fixed size.
    pixel_budget: bool = False
    # Inside each language layer: the self-attention module, and (inside that) the output projection whose input is
    # the heads' outputs side by side (num_heads × head_dim), where the analysis reads and edits single heads.
    attention: str = "self_attn"
    attention_output: str = "o_proj"
    # Offline builders for tiny test models: config from a TinySize, and the matching processor.
    build_tiny: Callable[..., object] | None = field(default=None, repr=False, compare=False)
    build_processor: Callable[..., object] | None = field(default=None, repr=False, compare=False)

    # -- access ---------------------------------------------------------------------------------------------
    def get(self, model: nn.Module, path: str) -> nn.Module | nn.Parameter:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr)
        return obj

    def has(self, model: nn.Module, path: str) -> bool:
        try:
            self.get(model, path)
            return True
        except AttributeError:
            return False

    def vision_layers_path(self, model: nn.Module) -> str:
        for rel in self.vision_layers:
            path = f"{self.vision_tower}.{rel}"
            if self.has(model, path):
                return path
        raise UnsupportedModelError(
            f"{type(model).__name__}: could not find the vision layers under {self.vision_tower!r} "
            f"(tried {', '.join(self.vision_layers)})"
        )

    def parts(self, model: nn.Module) -> "ModelParts":
        model = unwrap(model)
        return ModelParts(
            family=self,
            model=model,
            language_layers=self.get(model, self.language_layers),
            language_layers_path=self.language_layers,
            vision_tower=self.get(model, self.vision_tower),
            vision_layers=self.get(model, self.vision_layers_path(model)),
            vision_layers_path=self.vision_layers_path(model),
            embeddings=self.get(model, self.embeddings),
            norm=self.get(model, self.norm),
            lm_head=self.get(model, self.lm_head),
        )

    def image_token_id(self, config) -> int:
        value = getattr(config, self.image_token_attr, None)
        if value is None:  # older configs call it image_token_index
            value = getattr(config, "image_token_index", None)
        if value is None:
            raise UnsupportedModelError(f"{self.model_class} config has no {self.image_token_attr}")
        return int(value)


@dataclass
class ModelParts:
    family: Family
    model: nn.Module
    language_layers: nn.ModuleList
    language_layers_path: str
    vision_tower: nn.Module
    vision_layers: nn.ModuleList
    vision_layers_path: str
    embeddings: nn.Module
    norm: nn.Module
    lm_head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.language_layers)

    @property
    def num_vision_layers(self) -> int:
        return len(self.vision_layers)

    def attention(self, layer: int) -> nn.Module:
        """Language layer `layer`'s self-attention module."""
        return self.family.get(self.language_layers[layer], self.family.attention)

    def attention_output(self, layer: int) -> nn.Linear:
        """Language layer `layer`'s attention output projection; its input is the heads' outputs concatenated."""
        return self.family.get(self.attention(layer), self.family.attention_output)

    @property
    def num_heads(self) -> int:
        """Attention (query) heads per language layer, from the text config."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.num_attention_heads)

    def component_paths(self) -> dict[str, tuple[str, ...]]:
        """Component name → the dotted paths (modules or parameters) it owns."""
        fam = self.family
        return {
            "vision_tower": (fam.vision_tower,),
            "projector": tuple(p for p in fam.projector if fam.has(self.model, p)),
            "embeddings": (fam.embeddings,),
            "norm": (fam.norm,),
            "lm_head": (fam.lm_head,),
        }


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model, through DDP/DeepSpeed (`.module`), compile and PEFT wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


# ---------------------------------------------------------------------------------------------------------
# Tiny configs: random-init models of each family built offline from config. Sizes come from `TinySize`.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TinySize:
    vocab_size: int
    image_size: int = 64
    patch_size: int = 8
    layers: int = 8
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None
    vision_layers: int = 4
    vision_hidden: int = 192
    vision_heads: int = 4
    special_ids: dict[str, int] = field(default_factory=dict)  # token → id, from the tokenizer
    # Weight init std. Hub configs say 0.02, tuned for widths ≥ 1024; at width 128 it leaves attention nearly
    # uniform and the tiny LLM stalls at the answer priors (text QA over cell words: colour 20 % after 1,000
    # steps at 0.02, 99 % at 0.1). None: 1/sqrt(width), the usual fan-in scale.
    initializer_range: float | None = None

    def init_std(self, width: int) -> float:
        return self.initializer_range if self.initializer_range is not None else width ** -0.5

    def text_kwargs(self) -> dict:
        return dict(
            initializer_range=self.init_std(self.hidden),
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate or 4 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            pad_token_id=self.special_ids.get("<|endoftext|>"),
            bos_token_id=None,
            eos_token_id=self.special_ids.get("<|im_end|>"),
        )

    def vision_kwargs(self) -> dict:
        return dict(
            initializer_range=self.init_std(self.vision_hidden),
            hidden_size=self.vision_hidden,
            intermediate_size=4 * self.vision_hidden,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


def _tiny_llava(size: TinySize):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**size.vision_kwargs()),
        text_config=LlamaConfig(**size.text_kwargs()),
        image_token_id=size.special_ids["<image>"],
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        # The tiny vision tower is shallow: take the last layer's features rather than llava-1.5's -2.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _tiny_llava_next(size: TinySize):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    s = size.image_size
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**size.vision_kwargs()),
        text_config=LlamaConfig(**size.text_kwargs()),
        image_token_id=size.special_ids["<image>"],
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _tiny_llava_onevision(size: TinySize):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    s = size.image_size
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**size.vision_kwargs()),
        text_config=Qwen2Config(**size.text_kwargs()),
        image_token_id=size.special_ids["<image>"],
        video_token_id=size.special_ids["<video>"],
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _qwen_text_kwargs(size: TinySize) -> dict:
    head_dim = size.hidden // size.heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return dict(**size.text_kwargs(), rope_scaling={"type": "mrope", "mrope_section": section})


def _qwen_special(size: TinySize) -> dict:
    ids = size.special_ids
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _tiny_qwen2_vl(size: TinySize):
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=size.vision_layers,
        initializer_range=size.init_std(size.vision_hidden),
        embed_dim=size.vision_hidden,
        hidden_size=size.hidden,  # Qwen2-VL's merger projects straight to the LLM width
        num_heads=size.vision_heads,
        mlp_ratio=4,
        patch_size=size.patch_size // 2,  # a 2×2 spatial merge brings tokens back to one per patch_size
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=_qwen_text_kwargs(size), vision_config=vision, **_qwen_special(size))


def _tiny_qwen2_5_vl(size: TinySize):
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=size.vision_layers,
        initializer_range=size.init_std(size.vision_hidden),
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        out_hidden_size=size.hidden,
        num_heads=size.vision_heads,
        patch_size=size.patch_size // 2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=size.patch_size * 2,
        fullatt_block_indexes=[size.vision_layers - 1],
    )
    return Qwen2_5_VLConfig(text_config=_qwen_text_kwargs(size), vision_config=vision, **_qwen_special(size))


# Processors for the tiny models: image processors sized for the world's images, our tokenizer and chat template.
def clip_image_kwargs(image_size: int) -> dict:
    """A CLIP image processor that keeps square images at their own size (no resize, no crop)."""
    return dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def _proc_llava(tokenizer, size: TinySize, chat_template: str):
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(**clip_image_kwargs(size.image_size)),
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=chat_template,
    )


def _proc_llava_next(tokenizer, size: TinySize, chat_template: str):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    s = size.image_size
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            **clip_image_kwargs(s), image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]]
        ),
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def _proc_llava_onevision(tokenizer, size: TinySize, chat_template: str):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    s = size.image_size
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": s, "width": s}, image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]]
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
        num_image_tokens=(s // size.patch_size) ** 2,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        chat_template=chat_template,
    )


def _qwen_image_kwargs(size: TinySize) -> dict:
    # Pixel budget so that a world image keeps its size: tokens = (side / patch_size)^2.
    px = size.image_size * size.image_size
    return dict(
        size={"shortest_edge": min(px, (size.patch_size * 2) ** 2), "longest_edge": 4 * px},
        patch_size=size.patch_size // 2,
        merge_size=2,
        temporal_patch_size=2,
    )


def _proc_qwen2_vl(tokenizer, size: TinySize, chat_template: str):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    kw = _qwen_image_kwargs(size)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=chat_template,
    )


def _proc_qwen2_5_vl(tokenizer, size: TinySize, chat_template: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    kw = _qwen_image_kwargs(size)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=chat_template,
    )


_LLAVA_LIKE = dict(
    language_model="model.language_model",
    language_layers="model.language_model.layers",
    embeddings="model.language_model.embed_tokens",
    norm="model.language_model.norm",
    lm_head="lm_head",
    vision_tower="model.vision_tower",
    vision_layers=("encoder.layers", "vision_model.encoder.layers"),
)
_QWEN_LIKE = dict(
    pixel_budget=True,
    language_model="model.language_model",
    language_layers="model.language_model.layers",
    embeddings="model.language_model.embed_tokens",
    norm="model.language_model.norm",
    lm_head="lm_head",
    vision_tower="model.visual",
    vision_layers=("blocks",),
    projector=("model.visual.merger",),
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    special_tokens=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
)

FAMILIES: dict[str, Family] = {
    f.model_class: f
    for f in [
        Family(
            name="llava",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            projector=("model.multi_modal_projector",),
            build_tiny=_tiny_llava,
            build_processor=_proc_llava,
            **_LLAVA_LIKE,
        ),
        Family(
            name="llava_next",
            model_class="LlavaNextForConditionalGeneration",
            processor_class="LlavaNextProcessor",
            projector=("model.multi_modal_projector", "model.image_newline"),
            build_tiny=_tiny_llava_next,
            build_processor=_proc_llava_next,
            **_LLAVA_LIKE,
        ),
        Family(
            name="llava_onevision",
            model_class="LlavaOnevisionForConditionalGeneration",
            processor_class="LlavaOnevisionProcessor",
            projector=("model.multi_modal_projector", "model.image_newline"),
            special_tokens=("<image>", "<video>"),
            build_tiny=_tiny_llava_onevision,
            build_processor=_proc_llava_onevision,
            **_LLAVA_LIKE,
        ),
        Family(
            name="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            processor_class="Qwen2VLProcessor",
            build_tiny=_tiny_qwen2_vl,
            build_processor=_proc_qwen2_vl,
            **_QWEN_LIKE,
        ),
        Family(
            name="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            build_tiny=_tiny_qwen2_5_vl,
            build_processor=_proc_qwen2_5_vl,
            **_QWEN_LIKE,
        ),
    ]
}
FAMILIES_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def family_of_processor(processor) -> Family | None:
    name = type(processor).__name__
    return next((f for f in FAMILIES.values() if f.processor_class == name), None)


def image_pixels(processor) -> dict | None:
    """{"min_pixels", "max_pixels"} of a pixel-budget processor (Qwen2-VL/2.5-VL), else None."""
    family = family_of_processor(processor)
    if family is None or not family.pixel_budget:
        return None
    size = processor.image_processor.size
    return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}


def set_image_pixels(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> dict | None:
    """Set the pixel budget each image is resized into (Qwen2-VL/2.5-VL; their default allows ~12.8 MP, thousands
    of tokens per image). Returns the budget in effect; raises UnsupportedModelError for other families."""
    if min_pixels is None and max_pixels is None:
        return image_pixels(processor)
    current = image_pixels(processor)
    if current is None:
        raise UnsupportedModelError(
            f"min_pixels/max_pixels apply to processors that resize to a pixel budget (Qwen2-VL, Qwen2.5-VL), not "
            f"{type(processor).__name__}, which resizes every image to its vision tower's size")
    low = current["min_pixels"] if min_pixels is None else int(min_pixels)
    high = current["max_pixels"] if max_pixels is None else int(max_pixels)
    if not 0 < low <= high:
        raise UnsupportedModelError(f"min_pixels {low} and max_pixels {high}: need 0 < min_pixels <= max_pixels")
    # the processor's token count (_get_num_multimodal_tokens) and its resizing both read this
    processor.image_processor.size = {"shortest_edge": low, "longest_edge": high}
    return {"min_pixels": low, "max_pixels": high}


def image_text_for(processor) -> str:
    """How one image is written into a chat text for this processor's family (placeholder + newline), for chat
    templates that take text content only."""
    family = family_of_processor(processor)
    return (family.image_placeholder if family else getattr(processor, "image_token", "<image>")) + "\n"


def supported() -> str:
    return ", ".join(f"{f.model_class} ({f.name})" for f in FAMILIES.values())


def family_of(model_or_class: nn.Module | type | str) -> Family:
    """The adapter for a model instance, a model class, a class name or a family short name."""
    if isinstance(model_or_class, str):
        name = model_or_class
    elif isinstance(model_or_class, type):
        name = model_or_class.__name__
    else:
        name = type(unwrap(model_or_class)).__name__
    family = FAMILIES.get(name) or FAMILIES_BY_NAME.get(name)
    if family is None:
        raise UnsupportedModelError(f"unsupported model class {name!r}; midtune supports: {supported()}")
    return family


def family_for_config(config) -> Family:
    """The adapter for a saved config (its `architectures` field), before any weights are loaded."""
    archs: Sequence[str] = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    model_type = getattr(config, "model_type", "?")
    if model_type in FAMILIES_BY_NAME:  # a config built in memory has no `architectures` yet
        return FAMILIES_BY_NAME[model_type]
    raise UnsupportedModelError(
        f"unsupported model (architectures={list(archs)}, model_type={model_type!r}); midtune supports: {supported()}"
    )


def model_class(family: Family):
    import transformers

    return getattr(transformers, family.model_class)


def image_token_mask(input_ids: torch.Tensor, model_or_config) -> torch.Tensor:
    """Boolean mask of image-token positions in `input_ids` (contiguous runs, one per image)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = family_for_config(config)
    return input_ids == family.image_token_id(config)
