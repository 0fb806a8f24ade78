"""Cost of structured outputs: decode tokens/s with and without a JSON-schema constraint, same model, same run.

A random-weight gpt2-tiny shape (the model's own cost is small, so the mask's share is as large as it gets)
with byte-level BPE tokenizers of 512 and 8,192 tokens trained on the Bible; sampling at temperature 1 into a
schema whose one long string keeps the output going until max_new_tokens.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from llmkit.data.corpus import bible_verses
from llmkit.inference.constrained import json_constraint
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.tokenizer import train_from_iterator

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 2000},
                                           "year": {"type": "integer"}}, "required": ["title", "year"]}


def _rate(model: Any, tok: Any, n_tokens: int, constrained: bool, reps: int) -> float:
    """Generated tokens per second over `reps` runs of one prompt."""
    total, t0 = 0, time.perf_counter()
    for r in range(reps):
        cons = [json_constraint(tok, SCHEMA, model.cfg.vocab_size)] if constrained else None
        out = generate_text(model, tok, ["A book:"], SamplingParams(n_tokens, temperature=1.0, seed=r),
                            constraints=cons)
        total += len(out[0].ids)
    return total / (time.perf_counter() - t0)


def bench(quick: bool) -> dict[str, Any]:
    verses = list(itertools.islice(bible_verses(), 3000 if quick else 20000))
    n_tokens, reps = (32, 2) if quick else (96, 4)
    res: dict[str, Any] = {"name": "constrained", "tokens_per_run": n_tokens}
    for vocab in (512, 8192):
        tok = train_from_iterator(verses, "bpe", vocab_size=vocab, show_progress=False)
        torch.manual_seed(0)
        model = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, block_size=256)).eval()
        json_constraint(tok, SCHEMA, model.cfg.vocab_size)  # index the vocabulary once (cached per tokenizer)
        free = _rate(model, tok, n_tokens, False, reps)
        schema = _rate(model, tok, n_tokens, True, reps)
        res[f"v{vocab}_free_tok_s"] = round(free, 1)
        res[f"v{vocab}_schema_tok_s"] = round(schema, 1)
        res[f"v{vocab}_schema_vs_free"] = round(schema / free, 3)
    return res
