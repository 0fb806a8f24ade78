"""Build the model a config describes: a Transformer, or the LSTM baseline."""

from __future__ import annotations

from torch import nn

from llmkit.models.config import ModelConfig
from llmkit.models.lstm import LSTMLM
from llmkit.models.transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes: a `Transformer`, or the `LSTMLM` baseline for arch='lstm'."""
    if cfg.arch == "lstm":
        return LSTMLM(cfg)
    return Transformer(cfg)

