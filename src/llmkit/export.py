"""`llmkit export onnx` / `torchscript`: a checkpoint as one deployable graph file plus its tokenizer.

Python API: `llmkit.export.onnx(checkpoint, out)`, `llmkit.export.torchscript(checkpoint, out)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.checkpoint import _resolve, load_model
from llmkit.fsutil import atomic_folder


def _export(checkpoint: str, out: str, kind: str) -> Path:
    model, _ = load_model(checkpoint)
    folder = _resolve(checkpoint)
    with atomic_folder(out) as tmp:
        if kind == "onnx":
            from llmkit.interop.onnx import export_onnx

            name, output = "model.onnx", export_onnx(model, tmp / "model.onnx")
        else:
            from llmkit.interop.torchscript import export_torchscript

            name, output = "model.pt", export_torchscript(model, tmp / "model.pt")
        if (folder / "tokenizer.json").exists():
            from llmkit.tokenizer import Tokenizer

            Tokenizer.load(folder).save(tmp)
        info = {"format": kind, "file": name, "inputs": ["input_ids", "attention_mask"], "output": output,
                "arch": model.cfg.arch, "block_size": model.cfg.block_size, "vocab_size": model.cfg.vocab_size,
                "dtype": "float32", "source": str(checkpoint)}
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"exported {kind} ({output}) -> {Path(out) / name}")
    return Path(out) / name


def onnx(checkpoint: str, out: str) -> Path:
    """Export a decoder (-> logits) or encoder (-> hidden states) checkpoint to ONNX with dynamic batch/sequence axes.

    Inputs are int64 input_ids and attention_mask (B, T); left padding is handled (positions follow the
    mask). OUT gets model.onnx, tokenizer.json and export.json (input/output names).

    Args:
        checkpoint: llmkit checkpoint folder (decoder or encoder).
        out: folder to write model.onnx, the tokenizer and export.json into.

    Examples:
        llmkit export onnx runs/demo runs/demo-onnx
        python -c "import onnxruntime as ort; print(ort.InferenceSession('runs/demo-onnx/model.onnx').get_inputs())"
    """
    return _export(checkpoint, out, "onnx")


def torchscript(checkpoint: str, out: str) -> Path:
    """Export a decoder or encoder checkpoint as a traced TorchScript module (`torch.jit.load`, no llmkit needed).

    Args:
        checkpoint: llmkit checkpoint folder (decoder or encoder).
        out: folder to write model.pt, the tokenizer and export.json into.

    Examples:
        llmkit export torchscript runs/demo runs/demo-ts
        python -c "import torch; m = torch.jit.load('runs/demo-ts/model.pt'); print(m.code[:200])"
    """
    return _export(checkpoint, out, "torchscript")
