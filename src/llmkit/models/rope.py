"""Rotary position embeddings: cos/sin tables for plain RoPE and the scaled variants small models ship
(linear: Gemma 3; llama3: Llama 3.1/3.2; yarn: Qwen2.5/Qwen3 long context), following the formulas of
transformers' `modeling_rope_utils` so imported models compute the same angles.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.models.config import ModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: with cos/sin tables, x * cos + rotate_half(x) * sin rotates x."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/dim), i = 0 .. dim/2 - 1."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(s: dict[str, Any]) -> float:
    """YaRN's cos/sin multiplier: explicit `attention_factor`, else 0.1 ln(factor) + 1 (mscale-adjusted)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = float(s["factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


def _yarn(theta: float, dim: int, s: dict[str, Any]) -> torch.Tensor:
    """YaRN: interpolate low frequencies by `factor`, extrapolate high ones, linear ramp between."""
    factor = float(s["factor"])
    old = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(old / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_tables(cfg: ModelConfig, n_pos: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (n_pos, hd), half-split layout as in Llama; `local` = the local layers' own base (Gemma3)."""
    dim = cfg.head_dim
    s = cfg.rope_scaling
    if local and cfg.rope_local_theta is not None:  # local layers: plain RoPE with their own base
        theta, s = cfg.rope_local_theta, None
    else:
        theta = cfg.rope_theta
    scale = 1.0
    if s is None:
        inv_freq = _base_inv_freq(theta, dim)
    elif s["type"] == "linear":
        inv_freq = _base_inv_freq(theta, dim) / float(s["factor"])
    elif s["type"] == "llama3":
        inv_freq = llama3_inv_freq(_base_inv_freq(theta, dim), s)
    elif s["type"] == "yarn":
        inv_freq, scale = _yarn(theta, dim, s), yarn_attention_factor(s)
    else:
        raise LlmkitError(f"RoPE scaling {s['type']!r} is not supported; llmkit has linear, llama3, yarn")
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)  # (n_pos, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale
