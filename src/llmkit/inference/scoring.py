"""Prompt scoring: the log-probability of every token of a text given the tokens before it, for many texts in
few batched forwards. This is what log-likelihood evaluation (lm-evaluation-harness, the server's
`echo` + `logprobs`) needs; the same numbers as one plain forward per text (right padding changes nothing
for a causal model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmkit.data.batching import pad


@dataclass
class Scored:
    """Scores of one token sequence of length n."""

    logprobs: list[float]  # n - 1 values: log p(ids[j] | ids[:j]) for j = 1..n-1
    greedy: list[bool]  # n - 1 flags: ids[j] is the argmax at its position
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per position j = 1..n-1 (if asked)
    next_top: list[tuple[int, float]] = field(default_factory=list)  # the distribution after the last token
    next_greedy: tuple[int, float] = (0, 0.0)  # (argmax token, its log-probability) after the last token


def chunk_by_tokens(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of `seqs` grouped (longest first) so each group's padded size B x T stays under max_tokens."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * len(seqs[groups[-1][0]]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def batch_token_budget(model: nn.Module) -> int:
    """Padded tokens per scoring forward that keep its (B, T, V) float logits near 256 MB (a longer sequence
    still gets a forward of its own)."""
    return max(2**26 // model.cfg.vocab_size, 1)


@torch.no_grad()
def score_tokens(model: nn.Module, seqs: list[list[int]], top: int = 0, pad_id: int = 0,
                 max_batch_tokens: int | None = None, with_next: bool = False) -> list[Scored]:
    """Score every sequence (each at least one token long) in batched forwards of bounded size.

    top: also return the `top` best (token, log-probability) pairs at each position.
    max_batch_tokens: padded tokens per forward (default: a bound keeping the (B, T, V) logits ~256 MB).
    with_next: also the distribution after the last token (`next_top`, `next_greedy`); then a sequence may
        hold up to block_size tokens, otherwise block_size + 1 (the last token is only predicted)."""
    model.eval()
    budget = max_batch_tokens or batch_token_budget(model)
    device = next(model.parameters()).device
    out: list[Scored | None] = [None] * len(seqs)
    cut = 0 if with_next else 1
    for group in chunk_by_tokens(seqs, budget):
        if max(len(seqs[i]) for i in group) <= cut:  # single tokens: nothing to predict
            for i in group:
                out[i] = Scored([], [])
            continue
        idx, mask = pad([seqs[i][: len(seqs[i]) - cut] for i in group], pad_id)
        logp = torch.log_softmax(model(idx.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
        best_v, best_i = logp.max(-1)  # (B, T)
        topv, topi = torch.topk(logp, top, -1) if top > 0 else (None, None)
        for row, i in enumerate(group):
            ids = seqs[i]
            n = len(ids)
            tgt = torch.tensor(ids[1:], dtype=torch.long)
            lp = logp[row, : n - 1].gather(-1, tgt[:, None])[:, 0] if n > 1 else torch.zeros(0)
            s = Scored(lp.tolist(), (best_i[row, : n - 1] == tgt).tolist())
            if with_next:
                s.next_greedy = (int(best_i[row, n - 1]), float(best_v[row, n - 1]))
            if topv is not None:
                pairs = [list(zip(topi[row, j].tolist(), topv[row, j].tolist())) for j in range(n - cut)]
                s.top, s.next_top = pairs[: n - 1], pairs[n - 1] if with_next else []
            out[i] = s
    return [s for s in out if s is not None]
