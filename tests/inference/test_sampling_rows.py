"""`sample_rows` (the engine's one vectorized pass over rows with their own settings) against `sample_next`
called row by row with the same seeds: the same tokens, draw for draw."""

from __future__ import annotations

import torch

from llmkit.inference.sampling import SamplingParams, sample_next, sample_rows

ROWS = [SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, logit_bias={3: 100.0, 7: -100.0}),
        SamplingParams(temperature=1.1, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=2.0),
        SamplingParams(temperature=2.0, top_p=1e-300)]


def test_sample_rows_equals_sample_next_per_row():
    V, R = 64, len(ROWS)
    g = torch.Generator().manual_seed(0)
    seen = torch.rand(R, V, generator=g) < 0.3
    counts = torch.randint(0, 3, (R, V), generator=g).float()
    allowed = torch.ones(R, V, dtype=torch.bool)
    allowed[1, ::2] = False  # one constrained row
    for trial in range(30):
        logits = torch.randn(R, V, generator=g) * 3
        gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(R)]
        ref_gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(R)]
        got = sample_rows(logits, ROWS, gens, seen, counts, allowed)
        want = torch.cat([sample_next(logits[i: i + 1], p, ref_gens[i], seen[i: i + 1], counts[i: i + 1],
                                      allowed[i: i + 1]) for i, p in enumerate(ROWS)])
        assert got.tolist() == want.tolist()
        assert got[4] == 3  # +100 bias all but forces token 3
        assert got[1] % 2 == 1  # the constraint's mask holds


def test_sample_rows_without_optional_inputs():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=1), SamplingParams(top_p=0.1)]
    got = sample_rows(logits, params, [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    best = logits.argmax(-1)
    assert got[0] == best[0] and got[1] == best[1]  # greedy, and top-1 sampling, are the argmax
