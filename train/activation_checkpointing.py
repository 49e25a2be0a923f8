"""Activation checkpointing, switched on only from the first LLM layer that needs a graph: backward stops there.

With every parameter below the first trainable LLM layer frozen (vision tower, projector, embeddings, the
layers under the block) and no input marked as requiring grad, autograd records nothing for that prefix: it
runs once, like inference, and its activations are freed as soon as the next layer has consumed them.

Two things commonly break this, and both are avoided here:
  * `enable_input_require_grads()` (which transformers 5's `activation_checkpointing_enable()` calls itself)
    makes the embedding output require grad, so the whole frozen prefix builds a graph, is recomputed under
    checkpointing and is back-propagated through for nothing;
  * reentrant checkpointing, which drops every gradient when a checkpointed block's inputs do not require
    grad (transformers#21381).
So checkpointing is switched on layer by layer, non-reentrant, only from the first layer that needs a graph.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from midtune.adapters import family_of, unwrap
from midtune.spec import FreezePlan


def first_layer_needing_grad(plan: FreezePlan) -> int | None:
    """The lowest LLM layer whose forward must be recorded: the first trainable one, or 0 if anything under
    the LLM layers trains (then gradients flow through all of them)."""
    if plan.trains_below_llm:
        return 0
    return plan.first_trainable_layer


def setup_checkpointing(model: torch.nn.Module, plan: FreezePlan, enabled: bool) -> list[int]:
    """Non-reentrant activation checkpointing on the LLM layers from the first one needing grad upward (and
    on trainable vision layers); returns the checkpointed LLM layer indices."""
    inner = unwrap(model)
    if getattr(inner, "_require_grads_hook", None) is not None:
        raise RuntimeError("enable_input_require_grads() is active: it would make the frozen prefix build a graph")
    parts = family_of(inner).parts(inner)
    func = partial(checkpoint, use_reentrant=False)
    start = first_layer_needing_grad(plan)
    wrapped = []
    for i, layer in enumerate(parts.language_layers):
        on = enabled and start is not None and i >= start
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = func
        if on:
            wrapped.append(i)
    vision_trains = set(plan.trainable_vision_layers) if not plan.row("vision_tower").trainable else set(
        range(parts.num_vision_layers))
    first_vision = min(vision_trains, default=None)
    for j, layer in enumerate(parts.vision_layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = enabled and first_vision is not None and j >= first_vision
            layer._gradient_checkpointing_func = func
    if enabled:
        inner.config.use_cache = False
        text_config = inner.config.get_text_config()
        text_config.use_cache = False
    return wrapped


def setup_naive_checkpointing(model: torch.nn.Module) -> None:
    """What LLaVA, ms-swift and PEFT do (for the benchmark only): reentrant checkpointing on every layer plus
    `enable_input_require_grads()`, so frozen layers are recomputed and back-propagated through."""
    inner = unwrap(model)
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    inner.enable_input_require_grads()
