"""LoRA through PEFT, on the chosen LLM layers only."""

from __future__ import annotations

from midtune.adapters import family_of
from midtune.spec import TrainableSpec, resolve_layers
from train.config import TrainConfig


def add_lora(model, spec: TrainableSpec, config: TrainConfig):
    """LoRA adapters on the selected LLM layers only, addressed through the language model's own layer list
    (a name-suffix match would also catch vision layers with the same index)."""
    import re

    from peft import LoraConfig, get_peft_model

    parts = family_of(model).parts(model)
    layers = resolve_layers(spec.layers, parts.num_layers)
    targets = "|".join(re.escape(t) for t in config.lora.target_modules)
    pattern = rf"{re.escape(parts.language_layers_path)}\.({'|'.join(map(str, layers))})\.(.*\.)?({targets})"
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=pattern, bias="none")
    model = get_peft_model(model, lora)
    return model


def lora_config_dict(model) -> dict:
    cfg = model.peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules),
            "bias": cfg.bias}
