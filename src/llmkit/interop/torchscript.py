"""TorchScript export: trace the same (input_ids, attention_mask) wrapper the ONNX export uses."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from llmkit.interop.onnx import example_inputs, wrap


def export_torchscript(model: nn.Module, path: Path) -> str:
    """Trace `model` to a TorchScript file that `torch.jit.load` runs without llmkit; returns the output name."""
    wrapper, out_name = wrap(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example_inputs(model), check_trace=False)
    torch.jit.save(traced, str(path))
    return out_name
