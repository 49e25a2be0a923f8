"""The training loss: next-token cross-entropy over the labelled tokens."""

from __future__ import annotations

import torch

from midtune.data import IGNORE_INDEX


def causal_lm_loss(model, batch: dict, at_labels: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, as the model's own loss computes it.

    With `at_labels`, the LM head runs only at the positions that predict a label in some row of the batch
    (transformers' `logits_to_keep` with an index tensor), not at every position: image tokens, prompts and
    padding carry no label, and a [tokens × vocabulary] logits tensor is the largest activation of a VLM step
    (Qwen2.5-VL: 152k × 4 bytes per token)."""
    if not at_labels:
        return model(**batch, use_cache=False).loss  # no KV cache while training
    labels = batch["labels"]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    kept = targets[:, keep]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (kept != IGNORE_INDEX).sum()
