"""Attention probabilities recomputed from a module's fused qkv output, and readable token labels: the pieces
`explain.attention` (text) and `explain.image_attention` (image patches) share."""

from __future__ import annotations

import math

import torch

from llmkit.models.transformer import Attention, rotate_half


def attention_probs(attn: Attention, qkv: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, nh, T, T) and values (B, nh, T, hd) from a fused qkv output (B, T, ...)."""
    B, T, _ = qkv.shape
    nh, nkv, hd = attn.nh, attn.nkv, attn.hd
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q, k = q.view(B, T, nh, hd), k.view(B, T, nkv, hd)
    if attn.q_norm is not None:  # Qwen3/Gemma3 qk-norm, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.transpose(1, 2)  # (B, nh, T, hd)
    k = k.transpose(1, 2)  # (B, nkv, T, hd)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    if rope is not None:
        cos, sin = rope  # (B, 1, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    if nkv != nh:  # grouped-query attention: each KV head serves nh/nkv query heads
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(hd)  # Gemma: query_pre_attn_scalar^-1/2
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, T, T)
    if attn.softcap is not None:  # Gemma2: c * tanh(scores / c)
        scores = torch.tanh(scores / attn.softcap) * attn.softcap
    if mask is not None:  # bool, True = may attend
        scores = scores.masked_fill(~mask, float("-inf"))
    elif is_causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    return scores.softmax(-1), v


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable label per token: its own decoded text, spaces shown as '␣', empty pieces as their id."""
    labels = []
    for i in ids:
        s = tokenizer.decode([i], skip_special_tokens=False).replace(" ", "␣").replace("\n", "⏎")
        labels.append(s if s else f"#{i}")
    return labels
