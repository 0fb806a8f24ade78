"""Perplexity of a causal LM on a text: exp(mean negative log-likelihood per predicted token).

Texts longer than the context are scored with a sliding window (as in the Hugging Face perplexity guide):
each window of block_size tokens advances by `stride` (at most block_size - 1, so consecutive windows
overlap by at least the one token that gives the next window's first target its context) and only its new
tokens are scored: every token after the first is predicted exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: list[int], block_size: int, stride: int | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """{"perplexity", "nll" (nats/token), "bits_per_token", "n_tokens"} for one token sequence."""
    stride = max(1, min(stride or block_size, block_size - 1))
    model.eval()
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + block_size, len(ids))
        x = torch.tensor(ids[begin:end], dtype=torch.long, device=device)[None]  # (1, L)
        logits = model(x).logits[0, :-1].float()  # (L-1, V): position t predicts token t+1
        targets = x[0, 1:].clone()
        n_new = end - max(prev_end, begin + 1)  # tokens not scored by an earlier window
        targets[: targets.numel() - n_new] = -100
        nll_sum += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    nll = nll_sum / max(count, 1)
    return {"perplexity": math.exp(nll), "nll": nll, "bits_per_token": nll / math.log(2), "n_tokens": count}
