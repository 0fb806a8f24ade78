"""GGUF Q8_0 / Q4_0 / Q4_1 weights onto llmkit's int8 / int4 formats, instead of dequantizing them to fp32.

- Q4_0 (w = d (q - 8)) and Q4_1 (w = d q + m), blocks of 32: exactly llmkit's int4 with group size 32
  (scale d, min -8d or m); no value changes.
- Q8_0 (w = d q, a scale per block of 32): the int8 kernel takes one scale per output row, so the block
  scales are folded into one per row and the integers re-rounded (error at most half a step of the row scale).
Every mapped tensor is checked against the fp32 weight transformers' loader produced from the same file;
a tensor that does not match, a layer fed by several GGUF types, or any other type stays fp32, with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmkit.models.quant import QuantLinear, pack_int4, quantize_int8

MAPPED = ("Q8_0", "Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _sources(cfg: Any) -> dict[str, list[str]]:
    """llmkit Linear name -> the GGUF tensors its rows come from (in order), for llama-architecture files."""
    out: dict[str, list[str]] = {}
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        out[f"blocks.{i}.attn.qkv"] = [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"]
        out[f"blocks.{i}.attn.proj"] = [b + "attn_output.weight"]
        out[f"blocks.{i}.mlp.gate"] = [b + "ffn_gate.weight"]
        out[f"blocks.{i}.mlp.fc"] = [b + "ffn_up.weight"]
        out[f"blocks.{i}.mlp.proj"] = [b + "ffn_down.weight"]
    out["lm_head"] = ["output.weight"]
    return out


def _unrope_perm(n_rows: int, n_head: int) -> np.ndarray:
    """Row order transformers applies to GGUF attn_q/attn_k (llama.cpp interleaves each head's RoPE halves)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows)


def _decode(kind: str, raw: np.ndarray, n_rows: int, k: int) -> dict[str, torch.Tensor]:
    """Raw GGUF blocks (n_rows, bytes) -> {"ints": (N, K), "scales": (N, K/32)[, "mins"]} as torch tensors."""
    blocks = np.ascontiguousarray(raw).reshape(n_rows, k // 32, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = blocks[..., 2:34].copy().view(np.int8).reshape(n_rows, k)
        return {"ints": torch.from_numpy(q.astype(np.int8)), "scales": torch.from_numpy(d)}
    start = 4 if kind == "Q4_1" else 2
    qs = blocks[..., start:start + 16]
    ints = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(n_rows, k)  # element j low nibble, j+16 high
    mins = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d)
    return {"ints": torch.from_numpy(ints.astype(np.uint8)), "scales": torch.from_numpy(d),
            "mins": torch.from_numpy(np.ascontiguousarray(mins))}


def _dequant(kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    ints, scales = parts["ints"].float(), parts["scales"].repeat_interleave(32, 1)
    if kind == "Q8_0":
        return ints * scales
    return ints * scales + parts["mins"].repeat_interleave(32, 1)


def map_quantized(model: nn.Module, path: Path) -> dict[str, Any] | None:
    """Replace the Linear layers of an imported llama GGUF model whose weights are Q8_0/Q4_0/Q4_1 by
    `QuantLinear`s holding the file's integers; returns the config.json "quantization" record (None if none)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    tensors = {t.name: t for t in reader.tensors}
    if arch not in ("llama", "qwen2", "qwen3"):
        print(f"note: GGUF {arch} weights are dequantized to fp32 (the quantized mapping covers llama, qwen2 and "
              "qwen3 files)", file=sys.stderr)
        return None
    cfg = model.cfg
    sources = _sources(cfg)
    if "output.weight" not in tensors:  # tied embeddings: the head is the token embedding
        sources["lm_head"] = ["token_embd.weight"]
    modules: dict[str, dict[str, Any]] = {}
    kept: dict[str, str] = {}
    for name, srcs in sources.items():
        lin = model.get_submodule(name)
        kinds = {tensors[s].tensor_type.name for s in srcs if s in tensors}
        if len(kinds) != 1 or any(s not in tensors for s in srcs) or next(iter(kinds)) not in MAPPED:
            kept[name] = "/".join(sorted(kinds)) or "missing"
            continue
        kind = kinds.pop()
        rows = []
        for s in srcs:
            t = tensors[s]
            n = int(t.shape[1]) if len(t.shape) > 1 else 1
            parts = _decode(kind, np.asarray(t.data), n, int(t.shape[0]))
            if arch == "llama" and s.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.n_head if "attn_q" in s else cfg.n_kv_head
                perm = torch.from_numpy(_unrope_perm(n, heads))
                parts = {k: v[perm] for k, v in parts.items()}
            rows.append(parts)
        parts = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        ref = lin.weight.detach().float()
        exact = _dequant(kind, parts)
        if exact.shape != ref.shape or not torch.allclose(exact, ref, rtol=1e-5, atol=1e-6):
            kept[name] = f"{kind} (did not match the dequantized weight)"
            continue
        if kind == "Q8_0":
            q = QuantLinear(lin.in_features, lin.out_features, 8, None, lin.bias is not None)
            q.qweight, q.scales = quantize_int8(exact)
            spec = {"bits": 8, "group_size": None, "gguf": kind}
        else:
            q = QuantLinear(lin.in_features, lin.out_features, 4, 32, lin.bias is not None)
            q.qweight, q.scales, q.mins = pack_int4(parts["ints"]), parts["scales"], parts["mins"]
            spec = {"bits": 4, "group_size": 32, "gguf": kind}
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        modules[name] = spec
    if kept:
        shown = ", ".join(f"{n} ({k})" for n, k in list(kept.items())[:3])
        print(f"note: {len(kept)} layer(s) stay fp32: {shown}{' ...' if len(kept) > 3 else ''}", file=sys.stderr)
    if not modules:
        return None
    bits = sorted({s["bits"] for s in modules.values()})
    return {"bits": bits[0] if len(bits) == 1 else "mixed", "group_size": 32, "source": "gguf", "modules": modules}
