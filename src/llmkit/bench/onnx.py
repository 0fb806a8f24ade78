"""ONNX Runtime vs PyTorch eager: forward latency of the same exported model on the same input, as a ratio.

Both run on the CPU with the same thread count; each side is warmed up, then timed as the median of
several runs. `speedup` > 1 means onnxruntime is faster than eager PyTorch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from llmkit.bench.timer import median_seconds
from llmkit.interop.onnx import DecoderLogits, export_onnx
from llmkit.models.build import build_model
from llmkit.models.config import preset


def bench(quick: bool = False) -> dict[str, Any]:
    """Latency of a gpt2-small-shaped (quick: gpt2-tiny) decoder forward pass in onnxruntime and in PyTorch."""
    import numpy as np
    import onnxruntime as ort

    name = "gpt2-tiny" if quick else "gpt2-small"
    cfg = preset(name, n_layer=2 if quick else 6, block_size=256)
    torch.manual_seed(0)

    model = build_model(cfg).eval()
    B, T = (1, 64) if quick else (4, 128)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        export_onnx(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        wrapper = DecoderLogits(model).eval()
        repeats = 5 if quick else 20
        with torch.no_grad():
            torch_ms = median_seconds(lambda: wrapper(ids, mask), repeats) * 1000
            ort_ms = median_seconds(lambda: sess.run(None, feeds), repeats) * 1000
            diff = float(np.abs(sess.run(None, feeds)[0] - wrapper(ids, mask).numpy()).max())
    return {"model": f"{name} ({cfg.n_layer} layers, d_model {cfg.d_model})", "batch": B, "seq_len": T,
            "threads": threads, "torch_eager_ms": round(torch_ms, 2), "onnxruntime_ms": round(ort_ms, 2),
            "speedup": round(torch_ms / ort_ms, 2), "max_abs_diff": diff}
