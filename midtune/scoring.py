"""Continuation scoring: how likely a model finds a continuation after a prompt.

Eval's lmms-eval `loglikelihood` (multiple-choice tasks) and analysis's attention knockout (which choice a model
picks with some layers blocked) score the same way, here: the prompt and continuation are tokenised as one text,
the continuation's tokens are the ones the joined text adds after the prompt's, and its NLL is the sum of their
next-token negative log-probabilities in float32. Batches are right-padded, so a row's continuation ends where
its attention mask does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midtune.data import add_special_tokens_for


@dataclass(frozen=True)
class ContinuationScore:
    nll: float  # summed over the continuation's tokens
    is_greedy: bool  # every continuation token is the model's top prediction


def continuation_length(tokenizer, prompt: str, continuation: str) -> int:
    """How many tokens `continuation` adds after `prompt`, tokenising the joined text as the model sees it (a
    tokenizer may merge across the boundary, so the continuation is not tokenised alone). Special tokens are
    added only where the chat template did not write them itself."""
    special = add_special_tokens_for(tokenizer, prompt)
    full = tokenizer(prompt + continuation, add_special_tokens=special)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    common = 0
    for a, b in zip(head, full):
        if a != b:
            break
        common += 1
    return len(full) - common


def score_continuations(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        lengths: list[int]) -> list[ContinuationScore]:
    """Each row's last `lengths[row]` real tokens scored under `logits` (a right-padded batch's forward)."""
    ends = attention_mask.sum(dim=1).tolist()
    out = []
    for row, (end, n) in enumerate(zip(ends, lengths)):
        if n == 0:
            out.append(ContinuationScore(0.0, True))
            continue
        targets = input_ids[row, end - n:end]
        logprobs = torch.log_softmax(logits[row, end - n - 1:end - 1].float(), dim=-1)
        nll = -float(logprobs.gather(-1, targets[:, None]).sum())
        out.append(ContinuationScore(nll, bool((logprobs.argmax(dim=-1) == targets).all())))
    return out
