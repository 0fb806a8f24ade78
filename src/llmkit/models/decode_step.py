"""The one-token decode step with fixed shapes (gpt-fast's recipe), so `torch.compile` traces it once.

`StaticKVCache` has full-length buffers; the step writes this token's K/V at a position held in a (1,)
tensor and attends over the whole buffer with a mask (keys after the position, padding and, for local
layers, keys outside the window are masked). Nothing in the step depends on a Python int that changes
per token, so one compiled graph serves every length of a cache size; `generate_ids` rounds cache sizes
up to powers of two, so a run compiles once per size bucket. Blocks, norms and heads are the model's own.
"""

from __future__ import annotations

import os
import shutil
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.config import ModelConfig
from llmkit.models.kv_cache import KVCache

COMPILE_MODE = os.environ.get("LLMKIT_COMPILE_MODE", "default")  # measured in docs/inference.md
# inductor (C++ codegen) for speed; tests use aot_eager: the same capture of the fixed-shape graph, no C++ build
COMPILE_BACKEND = os.environ.get("LLMKIT_COMPILE_BACKEND", "inductor")


class StaticKVCache(KVCache):
    """Full-length K/V buffers; while `static` is set, `update` writes at `write_pos` and returns the whole buffer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(cfg, batch, max_len, device, dtype, bounded=False)
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.static = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.static:  # prefill: the ordinary path
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.write_pos, k)
        self.v[layer].index_copy_(2, self.write_pos, v)
        return self.k[layer], self.v[layer]


def decode_step(model: nn.Module, idx: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Logits (B, V) of one new token per row (idx, position_ids: (B, 1)) written at `cache.write_pos`."""
    cfg = model.cfg
    x, rope = model.embed(idx, position_ids)
    cache.valid.index_fill_(1, cache.write_pos, True)
    k_pos = torch.arange(cache.max_len, device=idx.device)
    seen = (k_pos <= cache.write_pos) & cache.valid  # (B, S)
    per_kind: dict[str, tuple[torch.Tensor, Any]] = {"global": (seen[:, None, None, :], rope)}
    if "local" in cfg.layer_kinds:
        local = seen & (cache.write_pos - k_pos < cfg.sliding_window)
        local_rope = model._local_rope(position_ids, 1, 0, x.dtype) if cfg.rope_local_theta is not None else rope
        per_kind["local"] = (local[:, None, None, :], local_rope)
    for i, block in enumerate(model.blocks):
        mask, r = per_kind[cfg.layer_kinds[i]]
        x = block(x, mask, False, r, cache, i)
    h = model.final_norm(x) if model.final_norm is not None else x
    return model.logits(h)[:, -1]


def check_compiler() -> None:
    """torch.compile's CPU backend (inductor) writes C++: refuse `--compile` in one line when it cannot run."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # a build without inductor
        raise LlmkitError(f"--compile needs torch.compile's inductor backend, which this torch lacks ({e}); "
                          "run without --compile") from e
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
        raise LlmkitError("--compile needs a C++ compiler (g++ or clang++) for torch.compile's CPU backend; "
                          "install one or run without --compile")


_compiled: weakref.WeakKeyDictionary[nn.Module, Callable[..., torch.Tensor]] = weakref.WeakKeyDictionary()


def step_fn(model: nn.Module, compile: bool) -> Callable[[torch.Tensor, torch.Tensor, StaticKVCache], torch.Tensor]:
    """The decode step for `model`: compiled once per model (and per cache shape), or eager."""
    if not compile:
        return lambda idx, pos, cache: decode_step(model, idx, pos, cache)
    if model not in _compiled:
        if COMPILE_BACKEND == "inductor":
            check_compiler()
        mode = None if COMPILE_MODE == "default" or COMPILE_BACKEND != "inductor" else COMPILE_MODE
        fn = torch.compile(decode_step, backend=COMPILE_BACKEND, mode=mode, dynamic=False)
        state = {"failed": False}

        def run(idx: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
            if not state["failed"]:
                try:
                    return fn(model, idx, pos, cache)
                except Exception as e:  # a compiler failure must not lose the generation: fall back to eager
                    state["failed"] = True
                    print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "decoding eagerly", file=sys.stderr)
            return decode_step(model, idx, pos, cache)

        _compiled[model] = run
    return _compiled[model]


def bucket(n: int, lo: int = 64) -> int:
    """Cache length for n positions: the next power of two >= n (>= lo), so compiled graphs are reused."""
    size = lo
    while size < n:
        size *= 2
    return size
