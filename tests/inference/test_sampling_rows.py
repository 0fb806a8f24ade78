"""`sample_rows` (the engine's one vectorized pass over rows with their own settings) and `sample_next`
against a plain one-row-at-a-time reference written from the definitions: the same tokens, draw for draw."""

from __future__ import annotations

import torch

from llmkit.inference.sampling import SamplingParams, argmax_rows, sample_next, sample_rows

ROWS = [SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, logit_bias={3: 100.0, 7: -100.0}),
        SamplingParams(temperature=1.1, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=2.0),
        SamplingParams(temperature=2.0, top_p=1e-300)]


def reference_sample(logits, p: SamplingParams, gen, seen, counts, allowed) -> int:
    """One row (V,), each rule applied as the documentation states it, with scalars."""
    x = logits.float().clone()
    if p.repetition_penalty != 1.0:
        x = torch.where(seen & (x > 0), x / p.repetition_penalty, torch.where(seen, x * p.repetition_penalty, x))
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    if allowed.any():
        x = x.masked_fill(~allowed, float("-inf"))
    if p.temperature < 1e-4:
        return int(x.argmax())
    best = int(x.argmax())
    x = x / p.temperature
    if p.top_k is not None and p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sx, order = torch.sort(x, descending=True)
        sp = sx.softmax(-1)
        sx = sx.masked_fill(sp.cumsum(-1) - sp >= p.top_p, float("-inf"))  # mass before the token reaches top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sx)
    probs = x.softmax(-1)
    if not torch.isfinite(probs).all():
        return best
    return int(torch.multinomial(probs[None], 1, generator=gen)[0, 0])


def test_sample_rows_and_sample_next_equal_the_reference():
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
        want = [reference_sample(logits[i], p, ref_gens[i], seen[i], counts[i], allowed[i])
                for i, p in enumerate(ROWS)]
        assert got.tolist() == want
        one_gens = [torch.Generator().manual_seed(100 * trial + i) for i in range(R)]
        assert [int(sample_next(logits[i: i + 1], p, one_gens[i], seen[i: i + 1], counts[i: i + 1],
                                allowed[i: i + 1])) for i, p in enumerate(ROWS)] == want
        assert got[4] == 3  # +100 bias all but forces token 3
        assert got[1] % 2 == 1  # the constraint's mask holds


def test_sample_rows_without_optional_inputs():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=1), SamplingParams(top_p=0.1)]
    got = sample_rows(logits, params, [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    best = logits.argmax(-1)
    assert got[0] == best[0] and got[1] == best[1]  # greedy, and top-1 sampling, are the argmax


def test_argmax_rows_is_torch_argmax():
    """NumPy's argmax (the fast path) answers as torch.argmax does: first index on ties, NaN as the largest,
    1-D and 2-D inputs; other dtypes take torch's own."""
    torch.manual_seed(0)
    x = torch.randn(8, 1000)
    x[1, [5, 700]] = 50.0  # a tie: the first wins
    x[2, 300], x[2, 10] = float("nan"), 60.0  # NaN counts as the largest
    x[3] = float("-inf")
    for t in (x, x[0], x[:, ::2], x.double(), x.bfloat16()):
        got, want = argmax_rows(t), t.argmax(-1)
        assert got.dtype == torch.int64 and torch.equal(got, want)
