"""The static KV cache: preallocated K/V buffers per layer, written in place at each decode step.

Local (sliding-window) layers of a bounded cache keep only their last `sliding_window - 1` positions in a
ring buffer: with the step's own keys that is exactly the window, so memory stays bounded however long
the generation runs.
"""

from __future__ import annotations

import torch

from llmkit.models.config import ModelConfig


class KVCache:
    """Static key/value buffers per layer (B, nkv, L, hd): prefill once, then decode one token a step.

    `valid` marks which positions hold real tokens (left padding in batched generation is False).
    `ring[layer]` is the ring size of a bounded local layer (L = ring), None for a full-length buffer.
    """

    ring: list[int | None] | None = None  # class default: views built with __new__ have full buffers

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, n_layer: int | None = None, bounded: bool = True):
        n = n_layer if n_layer is not None else cfg.n_layer
        kinds = cfg.layer_kinds if n == cfg.n_layer and cfg.sliding_window is not None else ["global"] * n
        ring = min(max_len, cfg.sliding_window - 1) if cfg.sliding_window is not None else 0
        self.ring = [ring if bounded and kind == "local" else None for kind in kinds]
        self.k = [torch.zeros(batch, cfg.n_kv_head, max_len if r is None else r, cfg.head_dim, device=device,
                              dtype=dtype) for r in self.ring]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = 0  # number of positions already written
        self.max_len = max_len
        self.memory: torch.Tensor | None = None  # seq2seq: encoder output, computed once
        self.memory_mask: torch.Tensor | None = None
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def bounded(self) -> bool:
        """Whether some layer keeps a ring buffer (its keys are positioned by `key_positions(ring=True)`)."""
        return self.ring is not None and any(r is not None for r in self.ring)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, nkv, T, hd) at positions pos..pos+T-1; return what attention sees.

        Full buffer: positions 0..pos+T-1 in order. Ring: the ring's slots (old positions, see
        `key_positions`) followed by this step's T keys; then the newest positions overwrite the ring.
        """
        T = k.size(2)
        start, end = self.pos, self.pos + T
        r = self.ring[layer] if self.ring is not None else None
        if r is None:
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        k_all = torch.cat([self.k[layer], k], 2)  # (B, nkv, r + T, hd)
        v_all = torch.cat([self.v[layer], v], 2)
        n = min(T, r)
        if n:
            slots = torch.arange(end - n, end, device=k.device) % r  # position p lives in slot p % r
            self.k[layer].index_copy_(2, slots, k[:, :, T - n:])
            self.v[layer].index_copy_(2, slots, v[:, :, T - n:])
        return k_all, v_all

    def key_positions(self, T: int, ring: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (S,) and validity (B, S) of the keys `update` returns for a T-token step.

        A ring slot s holds the newest position p < pos with p % r == s (invalid while p < 0).
        """
        start, end = self.pos, self.pos + T
        device = self.valid.device
        r = next((x for x in self.ring or [] if x is not None), None) if ring else None
        if r is None:
            return torch.arange(end, device=device), self.valid[:, :end]
        s = torch.arange(r, device=device)
        old = start - 1 - (start - 1 - s) % r  # (r,)
        new = torch.arange(start, end, device=device)
        old_valid = self.valid[:, old.clamp(min=0)] & (old >= 0)
        return torch.cat([old, new]), torch.cat([old_valid, self.valid[:, start:end]], 1)

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
