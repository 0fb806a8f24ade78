"""Smoothing for int8 activations (models/smooth.py): exact in fp32, and what makes per-row int8 rounding cheap."""

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.models import qkernel, smooth
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.models.quant import QuantLinear, prepare_quantized, quantize_model
from llmkit.models.quantize import quantize_in_place


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, block_size=128)
    model = build_model(preset("llama-tiny", **{**cfg, **kw})).eval()
    with torch.no_grad():  # outlier channels, as trained models have: a few norm weights 30x the rest
        for b in model.blocks:
            b.norm1.weight[[3, 17]] *= 30
            b.norm2.weight[[5, 40]] *= 30
            if b.attn.qkv.bias is not None:
                torch.nn.init.normal_(b.attn.qkv.bias, std=0.5)
    return model


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"n_kv_head": 1}])
def test_smoothing_keeps_the_fp32_outputs(kw):
    """The folded scales cancel: logits within 1e-4 of their largest value (fp32 rounding of the rescaled
    weights), and every block's 5 layers are reported smoothed."""
    model = _model(**kw)
    x = torch.tensor([_ids(40, 1)])
    with torch.no_grad():
        want = model(x).logits
        done = smooth.smooth(model, smooth.calibrate(model, _ids(600, 2)))
        got = model(x).logits
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    assert sorted(done) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                  for n in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.fc", "mlp.proj"))


@pytest.mark.skipif(not qkernel.has_vnni(), reason="int8 activations run on llmkit's AVX-512 VNNI kernel")
def test_smoothing_is_what_makes_int8_activations_close():
    """One-token steps (the int8 x int8 kernel) against fp32 logits: smoothed first is closer than the same int8
    activations on unsmoothed inputs (relative L2 error)."""
    x = torch.tensor([_ids(24, 3)])
    ref = _model()
    with torch.no_grad():
        want = ref(x).logits

    def steps(model) -> torch.Tensor:
        cache = model.new_cache(1, 24)
        with torch.no_grad():
            return torch.cat([model(x[:, i:i + 1], cache=cache).logits for i in range(24)], 1)

    smoothed = _model()
    quantize_in_place(smoothed, 8, calibration=_ids(600, 2))
    prepare_quantized(smoothed)
    plain = _model()
    names = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    quantize_model(plain, 8, act8=names)
    prepare_quantized(plain)
    # every layer takes int8 activations, the head too (unsmoothed, in both models)
    assert all(m.act_bits == 8 for m in smoothed.modules() if isinstance(m, QuantLinear))
    err_s = float((steps(smoothed) - want).norm() / want.norm())
    err_p = float((steps(plain) - want).norm() / want.norm())
    assert err_s < 0.05 and err_s < 0.7 * err_p, (err_s, err_p)


def test_models_it_cannot_smooth_keep_int16_activations(capsys):
    torch.manual_seed(0)
    bert = build_model(preset("bert-tiny", vocab_size=96)).eval()
    assert smooth.why_not(bert)
    record = quantize_in_place(bert, 8, calibration=_ids(100, 0))
    assert all("act_bits" not in spec for spec in record["modules"].values())
    assert "int16 activations kept" in capsys.readouterr().out
    with pytest.raises(LlmkitError, match="--act_bits 16"):
        smooth.smooth(bert, {})
    with pytest.raises(LlmkitError, match="calibration"):
        quantize_in_place(_model(), 8, calibration=[])
