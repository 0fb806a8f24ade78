"""The static KV cache: preallocated K/V buffers per layer, written in place at each decode step."""

from __future__ import annotations

import torch

from llmkit.models.config import ModelConfig


class KVCache:
    """Static key/value buffers per layer (B, nkv, max_len, hd): prefill once, then decode one token a step.

    `valid` marks which cached positions hold real tokens (left padding in batched generation is False).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, n_layer: int | None = None):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        n = n_layer if n_layer is not None else cfg.n_layer
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = 0  # number of positions already written
        self.max_len = max_len
        self.memory: torch.Tensor | None = None  # seq2seq: encoder output, computed once
        self.memory_mask: torch.Tensor | None = None
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.valid = self.valid.index_select(0, index)
        self.cross_kv = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross_kv.items()}
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)

