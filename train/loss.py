"""The training loss: next-token cross-entropy over the labelled tokens."""

from __future__ import annotations

import torch

from midtune.adapters import unwrap
from midtune.data import IGNORE_INDEX


def causal_lm_loss(model, batch: dict, at_labels: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, as the model's own loss computes it.

    With `at_labels`, the LM head runs only on the hidden states that predict a label: image tokens, prompts and
    padding carry none, and a [tokens × vocabulary] logits tensor is the largest activation of a VLM step
    (Qwen2.5-VL: 152k × 4 bytes per token). The hidden states are gathered row by row, not as the union of
    positions over the batch (transformers' `logits_to_keep`), which in a batch of varied prompt lengths keeps
    most positions. The gather is a forward pre-hook on the output embeddings, so the head still runs inside the
    model's own forward: FSDP and ZeRO-3 gather its weights there as usual, and every family's head code (and any
    logit post-processing) applies unchanged."""
    if not at_labels:
        return model(**batch, use_cache=False).loss  # no KV cache while training
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    labelled = targets != IGNORE_INDEX

    def gather_labelled(_module, args):
        hidden = args[0]  # [batch, positions, hidden]: every position (logits_to_keep=0)
        return (hidden[:, :-1][labelled].unsqueeze(0), *args[1:])

    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(gather_labelled)
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits  # [1, labelled tokens, vocabulary]
    finally:
        handle.remove()
    kept = targets[labelled]
    if logits.shape[1] != kept.numel():
        raise RuntimeError(f"{type(unwrap(model)).__name__}: the output embeddings saw {logits.shape[1]} positions "
                           f"after gathering the {kept.numel()} labelled ones; its LM head is not applied once to "
                           "the final hidden states (set logits_at_labels: false)")
    loss = torch.nn.functional.cross_entropy(logits[0].float(), kept, reduction="sum")
    return loss / kept.numel()
