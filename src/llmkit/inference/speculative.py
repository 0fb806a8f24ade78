"""Speculative greedy decoding: cheap drafts checked by one forward of the target model, output identical
to plain greedy decoding token for token.

Each round drafts up to k tokens, runs the target once on [last token] + drafts, keeps the drafts up to the
first one the target's argmax disagrees with, and adds the target's own token there (so every round yields
at least one token). Drafts come from the prompt itself (prompt lookup: the tokens that followed the last
earlier occurrence of the current n-gram, Saxena 2023) or from a small draft model with the same tokenizer.
Rejected positions are rewound out of both KV caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.inference.sampling import argmax_rows
from llmkit.models.kv_cache import KVCache
from llmkit.models.native_step import MAX_ROWS, native_step


def rewind(cache: KVCache, n: int) -> None:
    """Forget every cached position from `n` on (the full-length buffers keep their memory)."""
    cache.pos = n
    cache.valid[:, n:] = False


class NgramDraft:
    """Prompt lookup: an index from each n-gram (n = 1..max_n) to where it last occurred with a next token."""

    def __init__(self, max_n: int = 3):
        self.max_n = max_n
        self.seq: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            j = len(self.seq)
            for n in range(1, self.max_n + 1):  # the n-gram ending just before t now has a continuation
                if j >= n:
                    self.index[tuple(self.seq[j - n:j])] = j - n
            self.seq.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest matching tail n-gram ([] when none matches)."""
        for n in range(min(self.max_n, len(self.seq)), 0, -1):
            start = self.index.get(tuple(self.seq[-n:]))
            if start is not None:
                return self.seq[start + n: start + n + k]
        return []

    def accept(self, n_valid: int) -> None:
        del self.seq[n_valid:]  # stale index entries only point at earlier, still valid positions


class ModelDraft:
    """A small model proposes k greedy tokens; its cache keeps the accepted sequence between rounds."""

    def __init__(self, model: nn.Module, max_len: int):
        self.model, self.cache = model.eval(), model.new_cache(1, max_len, bounded=False)
        self.device = next(model.parameters()).device
        self.seq: list[int] = []
        self.n = 0  # tokens of self.seq held in the draft's cache

    def extend(self, tokens: list[int]) -> None:
        self.seq.extend(tokens)

    def propose(self, k: int) -> list[int]:
        out: list[int] = []
        feed = self.seq[self.n:]
        for _ in range(k):
            x = torch.tensor([feed], device=self.device)
            logits = self.model(x, cache=self.cache, last_only=True).logits[0, -1]
            self.n += len(feed)
            feed = [int(argmax_rows(logits))]
            out.append(feed[0])
        return out  # the cache holds seq + out[:-1]

    def accept(self, n_valid: int) -> None:
        del self.seq[n_valid:]
        self.n = min(self.n, n_valid)
        rewind(self.cache, self.n)


@dataclass
class SpecStats:
    """Counts for the speed-up report: rounds (target forwards after the prefill), drafted, accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def speculative_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                       draft: nn.Module | None = None, k: int = 4, max_ngram: int = 3,
                       stats: SpecStats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of each round (greedy, batch 1); `draft` None = prompt lookup, else a draft model.

    k <= 15 keeps the verify forward on the decode-sized kernels of quantized layers.
    """
    cfg = model.cfg
    if cfg.arch != "decoder":
        raise LlmkitError(f"speculative decoding needs a decoder model, not arch={cfg.arch!r}")
    if not 1 <= k <= 16:
        raise LlmkitError(f"the draft length k must be in 1..16, got {k}")
    if draft is not None and draft.cfg.vocab_size != cfg.vocab_size:
        raise LlmkitError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the model's "
                          f"({cfg.vocab_size}); both must share one tokenizer")
    model.eval()
    stats = stats if stats is not None else SpecStats()
    n_prompt = len(prompt)
    budget = min(max_new_tokens, cfg.block_size - n_prompt)
    if n_prompt == 0 or budget <= 0:
        return
    max_len = n_prompt + budget + k + 1
    device = next(model.parameters()).device
    cache = model.new_cache(1, max_len, bounded=False)  # rewinding needs full-length buffers, not rings
    native = native_step(model, 1)  # verification in one C++ call where it applies (models/native_step.py)
    drafter = NgramDraft(max_ngram) if draft is None else ModelDraft(draft, max_len)
    drafter.extend(prompt)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True).logits[0, -1]
    last = int(argmax_rows(logits))
    produced = 0
    while True:
        if eos_id is not None and last == eos_id:
            return
        yield [last]
        produced += 1
        stats.tokens += 1
        drafter.extend([last])
        if produced >= budget:
            return
        # the target's cache holds everything but `last`; draft at most what the budget can still take
        guess = drafter.propose(min(k, budget - produced - 1)) if budget - produced > 1 else []
        x = torch.tensor([[last] + guess], device=device)
        base = cache.pos
        if native is not None and x.size(1) <= MAX_ROWS:  # the same numbers as plain greedy's native step
            pos = torch.arange(base, base + x.size(1))[None]
            logits = native.run(x, pos, cache.k, cache.v, cache.valid, base)[0]
            cache.pos += x.size(1)
        else:
            logits = model(x, cache=cache).logits[0]  # (1 + len(guess), V)
        target = argmax_rows(logits).tolist()
        m = 0
        while m < len(guess) and guess[m] == target[m]:
            m += 1
        stats.rounds += 1
        stats.drafted += len(guess)
        stats.accepted += m
        rewind(cache, base + 1 + m)  # keep `last` and the accepted drafts
        drafter.extend(guess[:m])
        drafter.accept(n_prompt + produced + m)
        for t in guess[:m]:
            if eos_id is not None and t == eos_id:
                return
            yield [t]
            produced += 1
            stats.tokens += 1
        last = target[m]
