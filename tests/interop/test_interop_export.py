"""ONNX and TorchScript export: onnxruntime / torch.jit.load outputs equal eager PyTorch (fp32, <= 1e-4) on
shapes other than the traced example (dynamic batch and sequence axes), with and without padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.interop.commands import onnx, torchscript
from llmkit.models.build import build_model
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import preset
from llmkit.models.load import load_model

ort = pytest.importorskip("onnxruntime")
ATOL = 1e-4
SHAPES = [(1, 5, 0), (3, 23, 4), (2, 40, 0)]  # (batch, seq, left pads in row 0); the trace used (2, 8, 2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, bpe_tokenizer):
    """A Llama-style decoder (RMSNorm, RoPE, GQA) and a BERT-style encoder, random weights."""
    out = {}
    for name in ("llama-tiny", "bert-tiny"):
        torch.manual_seed(0)
        cfg = preset(name, vocab_size=bpe_tokenizer.vocab_size, n_layer=2, block_size=64)
        out[name] = save_checkpoint(tmp_path_factory.mktemp("exp") / name, build_model(cfg), cfg, bpe_tokenizer)
    return out


def _inputs(vocab: int, B: int, T: int, pad: int, encoder: bool):
    g = torch.Generator().manual_seed(B * 100 + T)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :pad] = 0
    return ids, mask.flip(1) if encoder else mask


def _reference(model, ids, mask):
    with torch.no_grad():
        if model.cfg.arch == "encoder":
            return model.hidden(ids, attention_mask=mask)
        return model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_onnx_matches_pytorch_with_dynamic_axes(ckpts, tmp_path, name):
    path = onnx(str(ckpts[name]), str(tmp_path / "onnx"))
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert (tmp_path / "onnx" / "tokenizer.json").exists()
    model, _ = load_model(ckpts[name])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert sess.get_outputs()[0].name == info["output"]
    for B, T, pad in SHAPES:
        ids, mask = _inputs(model.cfg.vocab_size, B, T, pad, model.cfg.arch == "encoder")
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        want = _reference(model, ids, mask).numpy()
        assert got.shape == want.shape
        valid = mask.bool().numpy()
        assert np.abs(got[valid] - want[valid]).max() <= ATOL, (B, T, pad)


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_torchscript_reloads_and_matches(ckpts, tmp_path, name):
    path = torchscript(str(ckpts[name]), str(tmp_path / "ts"))
    model, _ = load_model(ckpts[name])
    ts = torch.jit.load(str(path))
    for B, T, pad in SHAPES:
        ids, mask = _inputs(model.cfg.vocab_size, B, T, pad, model.cfg.arch == "encoder")
        with torch.no_grad():
            got = ts(ids, mask)
        want = _reference(model, ids, mask)
        valid = mask.bool()
        assert (got[valid] - want[valid]).abs().max().item() <= ATOL, (B, T, pad)


def test_export_rejects_seq2seq_and_writes_nothing(tmp_path):
    cfg = preset("transformer-tiny", n_layer=1, d_model=32, d_ff=64, vocab_size=50, block_size=16)
    save_checkpoint(tmp_path / "s2s", build_model(cfg), cfg)
    with pytest.raises(LlmkitError, match="seq2seq"):
        onnx(str(tmp_path / "s2s"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bench_reports_a_ratio():
    from llmkit.bench.onnx import bench

    r = bench(quick=True)
    assert r["torch_eager_ms"] > 0 and r["onnxruntime_ms"] > 0
    assert r["speedup"] == pytest.approx(r["torch_eager_ms"] / r["onnxruntime_ms"], rel=0.02)
    assert r["max_abs_diff"] <= ATOL
