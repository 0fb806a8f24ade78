"""Deployment graphs: wrap a Transformer as (input_ids, attention_mask) -> logits (decoder) / hidden states
(encoder), then export it to ONNX (legacy TorchScript-based exporter, dynamic batch and sequence axes).
The same wrappers serve the TorchScript export (torchscript.py).

Why trace with a padded example: the model picks a fast attention path in Python when nothing is padded;
tracing a padded batch records the general masked path, which is also exact when there is no padding.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.transformer import OffsetRMSNorm

OPSET = 18


class DecoderLogits(nn.Module):
    """(input_ids (B,T), attention_mask (B,T)) -> logits (B,T,V); positions follow the mask, so left padding works."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


class EncoderHidden(nn.Module):
    """(input_ids (B,T), attention_mask (B,T)) -> last hidden states (B,T,C), what embeddings pool over."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(input_ids, attention_mask=attention_mask)


def wrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The export wrapper for `model` and the name of its output."""
    arch = getattr(getattr(model, "cfg", None), "arch", None)
    if arch == "decoder":
        return DecoderLogits(model).eval(), "logits"
    if arch == "encoder":
        return EncoderHidden(model).eval(), "last_hidden_state"
    raise LlmkitError(f"export supports decoder and encoder checkpoints, not arch={arch!r} "
                      "(seq2seq and LSTM models have no single-graph forward)")


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded example batch (row 0 left-padded by 2) so tracing records the masked attention path; longer
    than a sliding window, so local layers record their window mask too."""
    window = getattr(model.cfg, "sliding_window", None)
    seq = min(max(seq, window + 2) if window else seq, model.cfg.block_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : min(2, seq - 1)] = 0
    return ids, mask


class DecomposedRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w (Gemma: * (1 + w)) in plain ops: the legacy ONNX exporter has no
    aten::rms_norm."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.offset = 1.0 if isinstance(norm, OffsetRMSNorm) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.weight + self.offset)


def onnx_friendly(model: nn.Module) -> nn.Module:
    """A copy of `model` with RMSNorm decomposed (the original is left untouched)."""
    if not any(isinstance(m, nn.RMSNorm) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.RMSNorm):
                setattr(parent, name, DecomposedRMSNorm(child))
    return model


def export_onnx(model: nn.Module, path: Path) -> str:
    """Write `model` to an .onnx file with dynamic batch/sequence axes; returns the output name."""
    wrapper, out_name = wrap(onnx_friendly(model))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            out_name: {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches we chose on purpose
        torch.onnx.export(wrapper, example_inputs(model), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=[out_name], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return out_name
