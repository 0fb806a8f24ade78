"""Load a checkpoint folder into a ready model: a plain LM, or a fine-tuned backbone with its task heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import (
    CONFIG,
    WEIGHTS,
    load_tensors,
    load_weights,
    read_meta,
    resolve_checkpoint,
)
from llmkit.models.config import ModelConfig
from llmkit.models.heads import load_task_model
from llmkit.models.quant import apply_quant_layout, prepare_quantized
from llmkit.models.vision import load_multimodal
from llmkit.tokenizer import Tokenizer


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model config.json describes and load its weights. Returns (model in eval mode, meta)."""
    folder = resolve_checkpoint(folder)
    meta = read_meta(folder)
    if "model" not in meta:
        raise LlmkitError(f"{folder / CONFIG} has no 'model' section; is this a Hugging Face folder? "
                          f"import it with `llmkit convert from-hf {folder} OUT`")
    if "multimodal" in meta:  # CLIP or an image captioner (models/vision.py)
        return load_multimodal(folder, device)
    if "heads" in meta:  # a fine-tuned checkpoint: backbone + task heads in one module

        task_model, _, meta = load_task_model(folder, device)
        return task_model, meta
    cfg = ModelConfig.from_dict(meta["model"])
    model = build_model(cfg)
    if "quantization" in meta:  # int8/int4 Linear layers (llmkit quantize, or a GGUF Q8_0/Q4 import)
        apply_quant_layout(model, meta["quantization"])
    load_weights(model, load_tensors(folder / WEIGHTS), str(folder / WEIGHTS))
    model = model.to(device).eval()
    if "quantization" in meta:
        prepare_quantized(model, device)
    return model, meta


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer | None]:
    """`llmkit.load("runs/demo")` -> (model, tokenizer). The tokenizer is None if the folder has none."""
    model, _ = load_model(path, device)
    folder = resolve_checkpoint(path)
    tok = Tokenizer.load(folder) if (folder / "tokenizer.json").exists() else None
    return model, tok

