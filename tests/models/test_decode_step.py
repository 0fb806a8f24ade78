"""The fixed-shape decode step: equal to the model's own cached forward (GQA, sliding-window layers, padding),
compiled equal to eager, and `--compile` refused in one line without a compiler."""

from __future__ import annotations

import pytest
import torch

from llmkit.data.batching import left_pad
from llmkit.errors import LlmkitError
from llmkit.inference.generate import generate_ids
from llmkit.inference.sampling import SamplingParams
from llmkit.models import decode_step as ds
from llmkit.models.build import build_model
from llmkit.models.config import preset


def _model(**kw):
    torch.manual_seed(0)
    return build_model(preset("llama-tiny", vocab_size=128, n_layer=2, block_size=96, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 6, "layer_types": ["local", "global"]},
                                {"qk_norm": True, "n_kv_head": 1}])
def test_static_step_equals_cached_forward(kw):
    """Prefill a left-padded batch, then 12 one-token steps: the static step against `model(..., cache=...)`
    (atol 1e-5: the same math, attention over the full buffer with masked keys)."""
    model = _model(**kw)
    prompts = [list(range(3, 17)), list(range(40, 45))]
    idx, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model.new_cache(2, 40, bounded=False)
    st = ds.StaticKVCache(model.cfg, 2, 64)
    with torch.no_grad():
        model(idx, attention_mask=mask, position_ids=pos, cache=ref)
        model(idx, attention_mask=mask, position_ids=pos, cache=st)
        tok, p = torch.tensor([[5], [9]]), pos[:, -1:] + 1
        for _ in range(12):
            want = model(tok, position_ids=p, cache=ref, last_only=True).logits[:, -1]
            st.write_pos.fill_(st.pos)
            st.static = True
            got = ds.decode_step(model, tok, p, st)
            st.static, st.pos = False, st.pos + 1
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
            tok, p = want.argmax(-1, keepdim=True), p + 1


def test_gqa_decode_equals_repeated_heads():
    """The GQA decode fold (a KV head's query heads as query rows) against explicit repeated K/V attention."""
    model = _model()
    attn = model.blocks[0].attn
    x = torch.randn(2, 1, model.cfg.d_model)
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model.blocks[0].attn(torch.randn(2, 5, model.cfg.d_model), None, True, None, cache, 0)
        cache.pos = 5
        got = attn(x, None, False, None, cache, 0)
        q, k, v = attn.qkv(x).split([attn.nh * attn.hd, attn.nkv * attn.hd, attn.nkv * attn.hd], -1)
        q = q.view(2, 1, attn.nh, attn.hd).transpose(1, 2)
        k = torch.cat([cache.k[0][:, :, :5], k.view(2, 1, attn.nkv, attn.hd).transpose(1, 2)], 2)
        v = torch.cat([cache.v[0][:, :, :5], v.view(2, 1, attn.nkv, attn.hd).transpose(1, 2)], 2)
        g = attn.nh // attn.nkv
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        w = (q @ k.transpose(-1, -2) / attn.hd ** 0.5).softmax(-1)
        want = attn.proj((w @ v).transpose(1, 2).reshape(2, 1, -1))
    assert torch.allclose(got, want, atol=1e-5)


def test_compiled_generation_equals_eager(monkeypatch):
    """Greedy tokens, batched and left-padded: the compiled step (aot_eager here: the same graph capture as
    inductor without a C++ build, which would take minutes; bench checks inductor) against eager."""
    monkeypatch.setattr(ds, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("LLMKIT_NATIVE_STEP", "0")  # else both runs take the native step (test_native_step.py)
    model = _model()
    prompts = [list(range(10, 30)), list(range(5, 12))]
    p = SamplingParams(max_new_tokens=16, temperature=0)
    eager = list(generate_ids(model, prompts, p))
    assert list(generate_ids(model, prompts, p, compile=True)) == eager


def test_compile_refused_without_a_compiler(monkeypatch, tiny_ckpt, capsys):
    from llmkit.cli import main

    monkeypatch.setattr(ds.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(LlmkitError, match="C\\+\\+ compiler"):
        ds.check_compiler()
    capsys.readouterr()
    assert main(["generate", str(tiny_ckpt), "--prompt", "In", "--max_new_tokens", "2", "--compile", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "C++ compiler" in err and "\n" not in err
