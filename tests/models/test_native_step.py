"""The one-call native decode step (kernels/step.cpp): the Python step's logits for the same cache state
(left-padded rows, GQA, int8, int4 and fp32, a qkv bias), greedy tokens equal to the Python path, and the
models it declines named with a reason."""

from __future__ import annotations

import pytest
import torch

from llmkit.data.batching import left_pad
from llmkit.inference.generate import generate_ids
from llmkit.inference.sampling import SamplingParams
from llmkit.models import native_step as ns
from llmkit.models import qkernel
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.models.decode_step import StaticKVCache, decode_step
from llmkit.models.quant import prepare_quantized, quantize_model
from llmkit.models.quantize import quantize_in_place

pytestmark = pytest.mark.skipif(not qkernel.available(), reason=f"llmkit's kernel: {qkernel.why_unavailable()}")


@pytest.fixture(autouse=True)
def fp32_int4_products():
    """The step's structure is compared with fp32 products: the VNNI int4 product rounds x to int8 per block,
    where a 1e-7 difference between two correct paths can move one step (test_vnni_int4_step_is_close)."""
    old = qkernel.int4_act()
    qkernel.set_int4_act(32)
    yield
    qkernel.set_int4_act(old)


def _quantized(bits: int | None, group: int | None, **kw):
    """A random llama-tiny with GQA, quantized to `bits` (None: fp32 as built)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, block_size=128)
    kw = dict(kw)
    smoothed = kw.pop("smooth", False)
    model = build_model(preset("llama-tiny", **{**cfg, **kw})).eval()
    if kw.get("qkv_bias"):  # a bias that is not zero, so a dropped bias shows
        for b in model.blocks:
            torch.nn.init.normal_(b.attn.qkv.bias, std=0.5)
    if smoothed:  # as `llmkit quantize --bits 8`: smoothed inputs, int8 activations
        quantize_in_place(model, 8, calibration=torch.randint(0, 96, (600,)).tolist())
        prepare_quantized(model)
    elif bits is not None:
        quantize_model(model, bits, group)
        prepare_quantized(model)
    return model


def _compare(model, step, prompts: list[list[int]], cache_len: int, steps: int, tol: float = 1e-4) -> None:
    """Prefill left-padded `prompts` into two caches, then `steps` one-token steps on the same tokens: native
    vs `decode_step` (tol 1e-4 of the largest logit: the same products, norms and softmax, summed in
    another order), and the keys both cached. Int8 activations take tol 1e-2: where the two paths' inputs differ
    by an ulp at a rounding boundary, one element rounds a whole int8 step the other way."""
    B = len(prompts)
    idx, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [StaticKVCache(model.cfg, B, cache_len) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(idx, attention_mask=mask, position_ids=pos, cache=c, last_only=True)
        tok, p = torch.arange(5, 5 + B)[:, None], pos[:, -1:] + 1
        for _ in range(steps):
            out = []
            for c, native in zip(caches, (False, True)):
                c.write_pos.fill_(c.pos)
                c.static = True
                out.append(step(tok, p, c) if native else decode_step(model, tok, p, c))
                c.static = False
                c.pos += 1
            want, got = out
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= tol, err
            tok, p = want.argmax(-1, keepdim=True), p + 1
    assert all(torch.allclose(k0, k1, atol=max(1e-5, tol * float(k0.abs().max()) if tol > 1e-4 else 0))
               for k0, k1 in zip(caches[0].k, caches[1].k))


@pytest.mark.parametrize("bits,group,kw", [(8, None, {}), (4, 32, {}), (8, None, {"qkv_bias": True}),
                                           (8, None, {"smooth": True}), (8, None, {"smooth": True, "qkv_bias": True}),
                                           (4, 64, {"n_kv_head": 1}), (None, None, {}),
                                           (None, None, {"qkv_bias": True})])
def test_native_step_equals_python_step(bits, group, kw):
    """A left-padded batch of 3, 16 steps, int8 (int16 or int8 activations), int4 and fp32, a qkv bias, one KV
    head."""
    model = _quantized(bits, group, **kw)
    step = ns.native_step(model, 3)
    assert step is not None, ns.why_not(model)
    _compare(model, step, [list(range(3, 17)), list(range(40, 45)), [7, 8, 9, 10, 11, 12, 13]], 64, 16,
             1e-2 if kw.get("smooth") else 1e-4)


def test_generate_native_gives_python_path_tokens(monkeypatch):
    """Greedy generation of two ragged prompts: the native step's tokens are the Python step's."""
    model = _quantized(8, None)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    prompts = [[1, 5, 9, 3, 4, 6], [2, 7]]
    native = list(generate_ids(model, prompts, params))
    monkeypatch.setenv("LLMKIT_NATIVE_STEP", "0")
    assert ns.native_step(model, 2) is None
    assert list(generate_ids(model, prompts, params)) == native


def test_fp32_native_step_follows_moved_weights():
    """`.double().float()` gives every parameter new storage under the same object: the step is rebuilt for
    the new addresses (the old one would read freed memory) and still equals the Python step."""
    model = _quantized(None, None)
    first = ns.native_step(model, 1)
    model.double().float()
    again = ns.native_step(model, 1)
    assert again is not first and again.key != first.key
    _compare(model, again, [list(range(3, 12))], 32, 4)


def test_models_it_declines_say_why(monkeypatch):
    class Wrapped(torch.nn.Linear):  # a subclass has its own forward (LoRA and the like): not read as fp32
        pass

    torch.manual_seed(0)
    fp32 = build_model(preset("llama-tiny", vocab_size=96, d_model=64, n_layer=2, block_size=64)).eval()
    assert ns.why_not(fp32) == ""
    old = fp32.blocks[0].mlp.gate
    fp32.blocks[0].mlp.gate = Wrapped(old.in_features, old.out_features, bias=False)
    assert "neither is fp32" in ns.why_not(fp32) and ns.native_step(fp32, 1) is None
    assert "not fp32" in ns.why_not(_quantized(None, None).double())
    gemma = _quantized(8, None, norm_unit_offset=True)
    assert ns.why_not(gemma) == "not RMSNorm"
    model = _quantized(8, None)
    assert ns.native_step(model, ns.MAX_ROWS + 1) is None and ns.native_step(model, ns.MAX_ROWS) is not None
    monkeypatch.setenv("LLMKIT_NATIVE_STEP", "0")
    assert ns.why_not(model) == "LLMKIT_NATIVE_STEP=0"


def test_long_cache_split_attention_equals_python_step():
    """600+ cached keys: step.cpp splits each group's keys into parts of >= 256 merged by log-sum-exp
    (flash-decoding); a padded row included."""
    model = _quantized(8, None, block_size=1024)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (700,), generator=g).tolist(), torch.randint(1, 96, (520,), generator=g).tolist()]
    _compare(model, ns.native_step(model, 2), prompts, 1024, 3)


def test_chunk_of_tokens_equals_cached_forward_and_single_steps():
    """T = 5 new tokens per row in one call (speculative verification): the model's cached forward on the
    same chunk (rtol 1e-4), and bit for bit the logits of 5 one-token calls at 1 or 2 threads (the key
    split depends only on the key count)."""
    model = _quantized(4, 32, block_size=1024)
    step = ns.native_step(model, 10)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 96, (600,), generator=g).tolist(), torch.randint(1, 96, (9,), generator=g).tolist()]
    idx, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    chunk = torch.randint(1, 96, (2, 5), generator=g)
    cpos = pos[:, -1:] + 1 + torch.arange(5)
    caches = [model.new_cache(2, 1024, bounded=False) for _ in range(3)]
    threads = torch.get_num_threads()
    with torch.no_grad():
        for c in caches:
            model(idx, attention_mask=mask, position_ids=pos, cache=c, last_only=True)
        want = model(chunk, position_ids=cpos, cache=caches[0]).logits
        got = step.run(chunk, cpos, caches[1].k, caches[1].v, caches[1].valid, caches[1].pos)
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
        try:
            torch.set_num_threads(1)
            one = [step.run(chunk[:, t:t + 1], cpos[:, t:t + 1], caches[2].k, caches[2].v, caches[2].valid,
                            caches[2].pos + t) for t in range(5)]
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(torch.cat(one, 1), got)


def test_speculative_verifies_with_the_native_step(monkeypatch):
    """Prompt lookup on a repetitive prompt: drafts are accepted, verification runs natively (chunks of
    several tokens), and the output is plain greedy's token for token."""
    from llmkit.inference.speculative import SpecStats, speculative_greedy

    model = _quantized(8, None)
    prompt = [3, 4, 5, 6, 7, 8] * 4
    plain = [t for t, in generate_ids(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0))]
    chunks: list[int] = []
    run = ns.NativeStep.run

    def counting(self, idx, *a, **kw):
        chunks.append(idx.size(1))
        return run(self, idx, *a, **kw)

    monkeypatch.setattr(ns.NativeStep, "run", counting)
    stats = SpecStats()
    got = [t for c in speculative_greedy(model, prompt, 30, stats=stats) for t in c]
    assert got == plain and stats.accepted > 0 and max(chunks) > 1


def test_cache_pointers_follow_every_buffer():
    """A new cache that shares its first layer's buffer with an old one (an allocator may hand a freed
    address back) still gets its own buffers for the other layers written."""
    model = _quantized(8, None)
    step = ns.native_step(model, 1)
    a = model.new_cache(1, 16, bounded=False)
    b = model.new_cache(1, 16, bounded=False)
    b.k[0], b.v[0] = a.k[0], a.v[0]
    tok, p = torch.tensor([[5]]), torch.tensor([[0]])
    step.run(tok, p, a.k, a.v, a.valid, 0)
    a_layer1 = a.k[1].clone()
    step.run(tok, p, b.k, b.v, b.valid, 1)
    assert torch.equal(a.k[1], a_layer1) and b.k[1][0, :, 1].abs().sum() > 0


@pytest.mark.parametrize("M,K,N", [(1, 576, 1000), (1, 104, 9), (2, 64, 13), (3, 1536, 36), (4, 72, 17), (5, 40, 7),
                                   (16, 96, 130)])
def test_fp32_product_equals_torch(M, K, N):
    """The fp32 product step.cpp runs for unquantized layers: x @ W^T at 1-16 rows, N not a multiple of the
    4-row pass, K a multiple of 8 but not of 16, 32 or 64 (the tail steps of the AVX-512 and AVX2 loops);
    atol 1e-5 of the largest output."""
    g = torch.Generator().manual_seed(M * N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    want = x @ w.T
    assert torch.allclose(qkernel.f32_mm(x, w), want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_row_start_skips_the_keys_before_it():
    """Rows that begin late in a shared buffer (the engine's): with `start` each row scans only its own span,
    and the logits are those of a scan over the whole buffer, whose earlier keys are invalid (rtol 1e-5);
    keys before a start are not read even where valid; a start past the write position is refused."""
    model = _quantized(8, None, block_size=1024)
    c = model.new_cache(2, 1024, bounded=False)
    g = torch.Generator().manual_seed(3)
    for k, v in zip(c.k, c.v):
        k.normal_(generator=g)
        v.normal_(generator=g)
    pos, begin = 700, torch.tensor([640, 90])
    for b, s in enumerate(begin.tolist()):
        c.valid[b, s:pos] = True
    idx, p = torch.tensor([[5], [9]]), (pos - begin)[:, None]
    step = ns.native_step(model, 2)
    full = step.run(idx, p, c.k, c.v, c.valid, pos)
    own = step.run(idx, p, c.k, c.v, c.valid, pos, start=begin)
    assert torch.allclose(own, full, atol=1e-5 * float(full.abs().max()), rtol=0)
    c.valid[0, :640] = True  # keys before a row's start are never read, valid or not
    assert torch.equal(step.run(idx, p, c.k, c.v, c.valid, pos, start=begin), own)
    assert not torch.allclose(step.run(idx, p, c.k, c.v, c.valid, pos)[0], own[0], atol=1e-3)
    with pytest.raises(ValueError, match="start"):
        step.run(idx, p, c.k, c.v, c.valid, pos, start=torch.tensor([pos + 1, 0]))


def test_head_last_and_none_keep_the_cache_writes():
    """head="last" gives each row's last token's logits of head="all" (exactly: the same sums), "none" no
    logits; all three write the same keys and values."""
    model = _quantized(8, None)
    step = ns.native_step(model, 8)
    idx, p = torch.tensor([[5, 6, 7], [9, 10, 11]]), torch.tensor([[0, 1, 2], [0, 1, 2]])
    outs, caches = [], []
    for head in ns.HEADS:
        c = model.new_cache(2, 16, bounded=False)
        outs.append(step.run(idx, p, c.k, c.v, c.valid, 0, head=head))
        caches.append(c)
    assert outs[0].shape == (2, 3, 96) and torch.equal(outs[1], outs[0][:, -1:]) and outs[2] is None
    assert all(torch.equal(a, b) for c in caches[1:] for a, b in zip(c.k + c.v, caches[0].k + caches[0].v))
    with pytest.raises(ValueError, match="head"):
        step.run(idx, p, caches[0].k, caches[0].v, caches[0].valid, 4, head="first")


def test_prefill_piece_size_changes_no_number():
    """A prefill in pieces of 64 tokens (AMX machines take 256) gives the logits and cache of 16-token pieces
    exactly: each token's products and attention do not depend on how many others share its call."""
    model = _quantized(8, None, smooth=True)
    step = ns.native_step(model, 1)
    prompts = [list(range(3, 40)), list(range(10, 30))]
    idx, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs, caches = [], []
    for piece in (16, 64):
        step.piece = piece
        c = model.new_cache(2, idx.size(1), bounded=False)
        outs.append(step.prefill(idx, pos, mask, c))
        caches.append(c)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))


def test_rows_step_only_the_named_buffer_rows():
    """`rows` maps each new token's row onto a row of the buffers (the engine steps its occupied slots only):
    the logits equal those of the same rows stepped in place (the same sums: exact), only the named rows'
    K/V and valid columns are written, and repeated or out-of-range rows are refused."""
    model = _quantized(8, None)
    c = model.new_cache(4, 64, bounded=False)
    g = torch.Generator().manual_seed(5)
    for k, v in zip(c.k, c.v):
        k.normal_(generator=g)
        v.normal_(generator=g)
    pos = 20
    c.valid[:, :pos] = True
    before = [k.clone() for k in c.k]
    step = ns.native_step(model, 4)
    idx, p = torch.tensor([[5], [9]]), torch.tensor([[pos], [pos]])
    got = step.run(idx, p, c.k, c.v, c.valid, pos, rows=torch.tensor([3, 1]))
    for b, r in enumerate((3, 1)):  # row r alone, as row 0 of a one-row copy of its buffers
        one = model.new_cache(1, 64, bounded=False)
        for dst, src in zip(one.k + one.v, before + [v for v in c.v]):
            dst[0] = src[r]
        one.valid[0, :pos] = True
        want = step.run(idx[b:b + 1], p[b:b + 1], one.k, one.v, one.valid, pos)
        assert torch.equal(got[b], want[0])
        assert torch.equal(c.k[0][r, :, pos], one.k[0][0, :, pos])
    assert all(torch.equal(k[[0, 2]], k0[[0, 2]]) for k, k0 in zip(c.k, before))  # other rows untouched
    assert c.valid[[1, 3], pos].all() and not c.valid[[0, 2], pos].any()
    for bad in ([1, 1], [1, 4]):
        with pytest.raises(ValueError, match="rows"):
            step.run(idx, p, c.k, c.v, c.valid, pos, rows=torch.tensor(bad))


@pytest.mark.skipif(not qkernel.has_vnni(), reason="no AVX-512 VNNI: the int4 product is fp32")
def test_vnni_int4_step_is_close():
    """With int8 activations (per 32-column block) in the int4 products, the native step still follows the
    Python step within the activations' rounding: 3e-2 of the largest logit."""
    qkernel.set_int4_act(8)
    model = _quantized(4, 32)
    B, prompts = 2, [list(range(3, 17)), list(range(40, 45))]
    idx, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [StaticKVCache(model.cfg, B, 64) for _ in range(2)]
    step = ns.native_step(model, B)
    with torch.no_grad():
        for c in caches:
            model(idx, attention_mask=mask, position_ids=pos, cache=c, last_only=True)
            c.write_pos.fill_(c.pos)
            c.static = True
        tok, p = torch.tensor([[5], [6]]), pos[:, -1:] + 1
        want, got = decode_step(model, tok, p, caches[0]), step(tok, p, caches[1])
    assert torch.allclose(got, want, atol=3e-2 * float(want.abs().max()), rtol=0)
