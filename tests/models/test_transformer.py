"""The config-driven Transformer: presets, masks, KV cache and architecture options."""

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.config import PRESETS, ModelConfig, preset
from llmkit.models.transformer import Transformer, sinusoidal_table


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_train_step(name):
    cfg = preset(name, vocab_size=97, block_size=32) if name != "gpt2-small" else preset(name)
    if name == "gpt2-small":  # the 124M shape: check size without running it
        m = build_model(cfg)
        assert 123e6 < m.num_params() < 125e6
        return
    torch.manual_seed(0)
    m = build_model(cfg)
    x = torch.randint(0, 97, (2, 16))
    out = m.seq2seq_loss(x, x, x) if cfg.arch == "seq2seq" else m(x, x)
    assert out.logits.shape == (2, 16, 97)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_char_shakespeare_is_nanogpt_shape():
    cfg = preset("char-shakespeare")
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.block_size) == (4, 4, 128, 64)


def test_llama_preset_uses_rope_rmsnorm_swiglu_gqa():
    cfg = preset("llama-tiny")
    m = build_model(cfg)
    assert cfg.n_kv_head < cfg.n_head and cfg.pos == "rope" and cfg.mlp == "gated"
    assert isinstance(m.final_norm, torch.nn.RMSNorm)
    assert m.blocks[0].attn.qkv.out_features == (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    assert m.lm_head.weight is not m.tok_emb.weight  # untied


def test_gpt2_ties_embeddings():
    m = build_model(preset("gpt2-tiny"))
    assert m.lm_head.weight is m.tok_emb.weight


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_kv_cache_logits_match_full_forward(name):
    torch.manual_seed(0)
    m = build_model(preset(name, vocab_size=101)).eval()
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full = m(x).logits
        cache = m.new_cache(2, 20)
        parts = [m(x[:, :12], cache=cache).logits]
        for t in range(12, 20):
            parts.append(m(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_causal_decoder_does_not_see_the_future():
    torch.manual_seed(0)
    m = build_model(preset("gpt2-tiny", vocab_size=50)).eval()
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits[:, :7], m(y).logits[:, :7])


def test_encoder_is_bidirectional_and_padding_is_masked():
    torch.manual_seed(0)
    m = build_model(preset("bert-tiny", vocab_size=50)).eval()
    x = torch.randint(1, 50, (1, 8))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 50
    with torch.no_grad():
        assert not torch.allclose(m(x).logits[:, 0], m(y).logits[:, 0])  # sees the last token
        padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], 1).long()
        torch.testing.assert_close(m(padded, attention_mask=mask).logits[:, :8], m(x).logits, atol=1e-5, rtol=1e-5)


def test_sinusoidal_positions_follow_the_formula():
    pe = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert pe[pos, 2 * i] == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (2 * i / 16))).item(), abs=1e-6)
    assert pe[pos, 2 * i + 1] == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * i / 16))).item(), abs=1e-6)
    m = Transformer(ModelConfig(pos="sinusoidal", vocab_size=30, block_size=16))
    assert m.pos_emb is None and m.sin_pe.shape == (16, 128)


def test_context_overflow_is_a_clear_error():
    m = build_model(preset("gpt2-tiny", block_size=8, vocab_size=20))
    with pytest.raises(LlmkitError, match="exceeds the model's context"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_bad_configs_are_rejected():
    with pytest.raises(LlmkitError, match="divisible"):
        ModelConfig(d_model=130, n_head=4)
    with pytest.raises(LlmkitError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(LlmkitError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(LlmkitError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"n_layers": 3})
