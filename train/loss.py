"""The training loss: next-token cross-entropy over the labelled tokens.

`summed_lm_loss` gives a micro-batch's summed cross-entropy and its count of labelled tokens; the recipe divides
by the whole optimizer step's count (loss_normalization: tokens) or by the micro-batch's own (mean)."""

from __future__ import annotations

import torch

from midtune.adapters import unwrap
from midtune.data import IGNORE_INDEX


def labelled_tokens(batch: dict) -> int:
    """How many positions of `batch` predict a label (position t predicts token t + 1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model, batch: dict, at_labels: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's labelled tokens, as the model's own loss computes it."""
    total, count = summed_lm_loss(model, batch, at_labels)
    return total / count


def summed_lm_loss(model, batch: dict, at_labels: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens (float32), and how many there are.

    With `at_labels`, the LM head runs only on the hidden states that predict a label: image tokens, prompts and
    padding carry none, and a [tokens × vocabulary] logits tensor is the largest activation of a VLM step
    (Qwen2.5-VL: 152k × 4 bytes per token). The hidden states are gathered row by row, not as the union of
    positions over the batch (transformers' `logits_to_keep`), which in a batch of varied prompt lengths keeps
    most positions. The gather is a forward pre-hook on the output embeddings, so the head still runs inside the
    model's own forward: FSDP and ZeRO-3 gather its weights there as usual, and every family's head code (and any
    logit post-processing) applies unchanged. Without it the head runs on every position and the sum is taken
    from those logits."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    labelled = targets != IGNORE_INDEX
    kept = targets[labelled]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not at_labels:
        logits = model(**inputs, use_cache=False).logits[:, :-1][labelled]  # no KV cache while training
        return torch.nn.functional.cross_entropy(logits.float(), kept, reduction="sum"), kept.numel()

    def gather_labelled(_module, args):
        hidden = args[0]  # [batch, positions, hidden]: every position (logits_to_keep=0)
        return (hidden[:, :-1][labelled].unsqueeze(0), *args[1:])

    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(gather_labelled)
    try:
        logits = model(**inputs, use_cache=False).logits  # [1, labelled tokens, vocabulary]
    finally:
        handle.remove()
    if logits.shape[1] != kept.numel():
        raise RuntimeError(f"{type(unwrap(model)).__name__}: the output embeddings saw {logits.shape[1]} positions "
                           f"after gathering the {kept.numel()} labelled ones; its LM head is not applied once to "
                           "the final hidden states (set logits_at_labels: false)")
    return torch.nn.functional.cross_entropy(logits[0].float(), kept, reduction="sum"), kept.numel()
