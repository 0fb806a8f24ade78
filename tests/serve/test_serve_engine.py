"""Continuous-batching engine: same tokens as `generate_text`, requests join/leave mid-batch, cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmkit.inference.embed import mean_pool_embeddings
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models import qkernel
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.models.load import load
from llmkit.models.native_step import native_step, why_not
from llmkit.models.quant import prepare_quantized, quantize_model
from llmkit.serve.engine import Engine, TokenEvent, new_request

PROMPTS = ["In the beginning", "And God said, Let there be light", "Jesus wept", "a",
           "The LORD is my shepherd; I shall not want. He makes me lie down in green pastures",
           "Blessed are the poor in spirit, for theirs is the Kingdom of Heaven. Blessed are those who mourn",
           "Love", "For God so loved the world"]


@pytest.fixture(scope="module")
def model_tok(tiny_ckpt):
    return load(tiny_ckpt)


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny", "llama-tiny-int8"])
def small_model(request, bpe_tokenizer):
    """A 2-layer model with a 48-token context, so the slot cache (96 positions) is compacted often.
    llama-tiny covers RoPE and grouped-query attention with per-row positions; its int8 form decodes with
    the native step (models/native_step.py) where llmkit's kernels build."""
    torch.manual_seed(0)
    name, _, quant = request.param.partition("-int")
    cfg = preset(name, vocab_size=bpe_tokenizer.vocab_size, block_size=48, n_layer=2)
    model = build_model(cfg).eval()
    if quant:
        # weights of unit gain, not the 0.02 init: peaked logits, so greedy ties (which the native and Python
        # paths may break differently, ~1e-6 apart) do not decide the text
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.5 * p.size(1) ** -0.5)
        quantize_model(model, int(quant), None)
        prepare_quantized(model)
        assert native_step(model, 1) is not None or not qkernel.available(), why_not(model)
    return model, bpe_tokenizer


class Collector:
    """Gathers events per request; records the engine step at which each request got its first/last token."""

    def __init__(self, engine: Engine | None = None):
        self.text: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.first_step: dict[int, int] = {}
        self.last_step: dict[int, int] = {}
        self.engine = engine
        self.done = threading.Event()
        self.expected = 0

    def sink(self, key: int):
        self.text[key] = ""

        def f(ev: TokenEvent) -> None:
            self.text[key] += ev.text
            step = self.engine.stats["steps"] if self.engine else 0
            if ev.token_ids:
                self.first_step.setdefault(key, step)
                self.last_step[key] = step
            if ev.finish_reason is not None:
                self.finish[key] = ev.finish_reason
                if len(self.finish) == self.expected:
                    self.done.set()
        return f


def run_all(engine: Engine, tok, prompts: list[str], params: list[SamplingParams], stagger: float = 0.0,
            first_alone: bool = False) -> Collector:
    """Submit every prompt; first_alone: the rest only once the first one decodes (so they join it): the
    engine thread is held after its first decode step until they are queued, however fast the steps are."""
    col = Collector(engine)
    col.expected = len(prompts)
    first, gate = threading.Event(), threading.Event()

    def hold(produced: int, seconds: float) -> None:
        if not first.is_set():
            first.set()
            gate.wait(10)

    if first_alone:
        engine.on_step = hold
    try:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.submit(new_request(engine, tok.encode(p), sp, col.sink(i)))
            if first_alone and i == 0:
                assert first.wait(30), "the first request never decoded"
            if stagger:
                time.sleep(stagger)
        gate.set()
        assert col.done.wait(60), "engine did not finish in 60 s"
    finally:
        gate.set()
        if first_alone:
            engine.on_step = None
    return col


def engine_texts(model, tok, prompts: list[str], params: list[SamplingParams], max_batch: int = 4) -> list[str]:
    """The texts of `prompts` served together by a fresh engine, in prompt order."""
    engine = Engine(model, tok, max_batch=max_batch)
    engine.start()
    try:
        col = run_all(engine, tok, prompts, params)
    finally:
        engine.stop()
    return [col.text[i] for i in range(len(prompts))]


def test_greedy_matches_generate_with_joins_compaction_and_shift(small_model):
    """Greedy text and finish reasons equal `generate_text` (one prompt at a time) although requests share
    a 3-slot batch, join while others run, and the slot cache is compacted and shifted right."""
    model, tok = small_model
    prompts = [PROMPTS[3], PROMPTS[4]] + PROMPTS[:3] + PROMPTS[5:]  # a short prompt, then a long one joins
    budgets = [47, 30, 40, 20, 47, 12, 30, 25]  # some reach the 48-token context ("length")
    params = [SamplingParams(max_new_tokens=b, temperature=0) for b in budgets]
    ref = [generate_text(model, tok, [p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, tok, max_batch=3)
    engine.start()
    try:
        col = run_all(engine, tok, prompts, params, first_alone=True)
    finally:
        engine.stop()
    for i, r in enumerate(ref):
        assert col.text[i] == r.text, f"prompt {i} differs"
        assert col.finish[i] == r.finish_reason
    assert engine.stats["shifts"] >= 1  # the long prompt joined a shorter running window
    assert engine.stats["compactions"] >= 1  # the shared write position reached the end of the buffer
    assert engine.stats["prefills"] == len(prompts)
    # continuous batching: some request started while another was running and finished before it
    overlaps = [(a, b) for a in col.first_step for b in col.first_step
                if col.first_step[a] < col.first_step[b] < col.last_step[a] < col.last_step[b]]
    assert overlaps, "no request joined a running batch"
    # fewer steps than running the requests one after another
    assert engine.stats["steps"] < sum(len(tok.encode(r.text)) for r in ref)


def test_seeded_sampling_matches_generate(model_tok):
    model, tok = model_tok
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=50, seed=s) for s in (1, 2, 3)]
    ref = [generate_text(model, tok, [p], sp)[0].text for p, sp in zip(PROMPTS[:3], params)]
    assert engine_texts(model, tok, PROMPTS[:3], params) == ref


def test_penalised_rows_match_generate(model_tok):
    """Repetition and presence penalties (the engine keeps each request's seen-token mask and counts across
    steps) give `generate_text`'s tokens, beside a plain greedy row in the same batch."""
    model, tok = model_tok
    params = [SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=20.0),
              SamplingParams(max_new_tokens=30, temperature=0),
              SamplingParams(max_new_tokens=30, temperature=0.8, seed=4, repetition_penalty=1.3, presence_penalty=0.5)]
    ref = [generate_text(model, tok, [p], sp)[0].text for p, sp in zip(PROMPTS[:3], params)]
    assert ref[0] != generate_text(model, tok, [PROMPTS[0]], params[1])[0].text  # the penalty changes the text
    assert engine_texts(model, tok, PROMPTS[:3], params) == ref


def test_stop_string_matches_generate(model_tok):
    model, tok = model_tok
    greedy = generate_text(model, tok, [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0))[0].text
    stop = greedy[10:13]  # a piece of text the model is known to produce
    sp = SamplingParams(max_new_tokens=40, temperature=0, stop=[stop])
    ref = generate_text(model, tok, [PROMPTS[0]], sp)[0]
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        col = run_all(engine, tok, [PROMPTS[0]], [sp])
    finally:
        engine.stop()
    assert col.text[0] == ref.text == greedy[: greedy.find(stop)]
    assert col.finish[0] == "stop"


def test_ignore_eos_generates_max_new_tokens(model_tok):
    """A request whose every token is eos (logit_bias +100) stops after one with the default and gives exactly
    max_new_tokens with ignore_eos, finishing on "length"."""
    model, tok = model_tok
    assert tok.eos_id is not None
    counts: dict[int, int] = {}
    finish: dict[int, str] = {}
    done = threading.Event()

    def sink(key: int):
        counts[key] = 0

        def f(ev: TokenEvent) -> None:
            counts[key] += len(ev.token_ids)
            if ev.finish_reason is not None:
                finish[key] = ev.finish_reason
                if len(finish) == 2:
                    done.set()
        return f

    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        for key, ignore in ((0, False), (1, True)):
            sp = SamplingParams(max_new_tokens=6, temperature=0, logit_bias={tok.eos_id: 100.0}, ignore_eos=ignore)
            engine.submit(new_request(engine, tok.encode(PROMPTS[0]), sp, sink(key)))
        assert done.wait(60)
    finally:
        engine.stop()
    assert (counts[0], finish[0]) == (0, "stop")  # the eos itself is not part of the output
    assert (counts[1], finish[1]) == (6, "length")


def test_cancel_frees_slot_at_once(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1)
    engine.start()
    try:
        col = Collector(engine)
        col.expected = 2
        long = new_request(engine, tok.encode("In"), SamplingParams(max_new_tokens=120, temperature=0), col.sink(0))
        engine.submit(long)
        short = new_request(engine, tok.encode("Jesus"), SamplingParams(max_new_tokens=5, temperature=0), col.sink(1))
        engine.submit(short)  # waits: the only slot is taken
        deadline = time.monotonic() + 10
        while 0 not in col.first_step and time.monotonic() < deadline:
            time.sleep(0.001)
        Engine.cancel(long)
        assert col.done.wait(30)
    finally:
        engine.stop()
    assert col.finish == {0: "abort", 1: "length"}
    assert engine.stats["aborted"] == 1
    assert len(tok.encode(col.text[0])) < 100  # stopped long before its 120 tokens


def test_mean_pool_embeddings_ignore_padding(model_tok):
    """Batched (right-padded) pooling equals pooling each text alone, computed here from `model.hidden`."""
    model, tok = model_tok
    ids = [tok.encode(t) for t in PROMPTS[:4]]
    got = torch.tensor(mean_pool_embeddings(model, tok, ids))
    with torch.no_grad():
        ref = torch.stack([model.hidden(torch.tensor([x]))[0].mean(0) for x in ids])
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)


def test_chunked_prefill_equals_whole_prefill(small_model):
    """A left-padded batch prefilled in 5-token chunks through the cache gives the logits of one whole
    prefill (atol 1e-5), for the last position of every row. Where a quantized model's long inputs run one
    bf16 GEMM (a CPU with bf16) and its 10-row chunks the fp32 kernels: 3e-2 of the largest logit."""
    from llmkit.data.batching import left_pad

    model, tok = small_model
    idx, mask = left_pad([tok.encode(PROMPTS[4])[:30], tok.encode(PROMPTS[1])], 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = model(idx, attention_mask=mask, position_ids=pos, cache=model.new_cache(2, idx.size(1)),
                      last_only=True).logits
        cache = model.new_cache(2, idx.size(1))
        for a in range(0, idx.size(1), 5):
            part = model(idx[:, a:a + 5], attention_mask=mask[:, a:a + 5], position_ids=pos[:, a:a + 5],
                         cache=cache, last_only=True).logits
    bf16 = any(getattr(m, "_act", None) == torch.bfloat16 for m in model.modules())
    tol = 3e-2 * float(whole.abs().max()) if bf16 else 1e-5
    assert torch.allclose(part, whole, atol=tol, rtol=0), float((part - whole).abs().max())


def test_engine_chunks_and_batches_prefills(small_model):
    """With 4-token chunks, prompts that arrive while others decode are prefilled in pieces between decode
    steps and several waiting prompts in one batch; the text still equals `generate_text`'s."""
    model, tok = small_model
    prompts = [PROMPTS[2], PROMPTS[5], PROMPTS[4], PROMPTS[1], PROMPTS[7]]
    # the first stream runs long (40 of the 48 context tokens), so it is still decoding when the others are
    # admitted even on a fast idle machine; the others stop at 14
    params = [SamplingParams(max_new_tokens=40 if i == 0 else 14, temperature=0) for i in range(len(prompts))]
    ref = [generate_text(model, tok, [p], sp)[0].text for p, sp in zip(prompts, params)]
    engine = Engine(model, tok, max_batch=4, prefill_chunk=4)
    col = Collector(engine)
    col.expected = len(prompts)
    engine.start()
    try:
        engine.submit(new_request(engine, tok.encode(prompts[0]), params[0], col.sink(0)))
        while engine.stats["steps"] < 2:  # a stream is decoding; the rest arrive together
            time.sleep(0.001)
        gate = threading.Event()
        engine.pending.put(lambda: gate.wait(10))  # hold the engine thread until all four are queued
        for i in range(1, len(prompts)):
            engine.submit(new_request(engine, tok.encode(prompts[i]), params[i], col.sink(i)))
        gate.set()
        assert col.done.wait(60)
    finally:
        engine.stop()
    assert [col.text[i] for i in range(len(prompts))] == ref
    assert engine.stats["prefill_chunks"] > engine.stats["prefill_batches"]  # long prompts took several chunks
    assert engine.stats["prefill_batches"] < engine.stats["prefills"]  # waiting prompts were prefilled together


def test_prefill_chunk_follows_measured_time(small_model):
    """Unfixed chunks aim at CHUNK_STEPS decode steps of time, moving at most 2x per chunk, never below 8."""
    from llmkit.serve.engine import CHUNK_STEPS

    model, tok = small_model
    engine = Engine(model, tok, max_batch=2)
    if engine._native is not None:  # chunks stay within one native call (piece: 16 tokens in all, 256 on AMX)
        piece = engine._native.piece
        assert engine._chunk_len(1) == min(32, piece) and engine._chunk_len(2) == min(16, piece // 2)
        engine._native = None  # the time-based rule below applies to the Python path
    assert engine._chunk_len(1) == 32 and engine._chunk_len(2) == 16  # before anything is measured
    engine._step_s = 0.1
    engine._adapt_chunk(100, CHUNK_STEPS * 0.1)  # on target: unchanged
    assert engine._chunk_len(1) == 100 and engine._chunk_len(4) == 25
    engine._adapt_chunk(100, 0.01)  # 15x too fast: doubles, not 15x
    assert engine._chunk_len(1) == 200
    engine._adapt_chunk(200, 0.3)  # 2x too slow: halves
    assert engine._chunk_len(1) == 100
    engine._adapt_chunk(10, 10.0)
    assert engine._chunk_len(1) == 8
