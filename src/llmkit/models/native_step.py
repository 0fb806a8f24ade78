"""The decode step as one C++ call (kernels/step.cpp) for Llama-shaped decoders whose Linear layers are
llmkit's int8/int4 layers on its own kernels or plain fp32 `nn.Linear`s: it replaces `decode_step`'s ~30
layers of Python operators, whose dispatch cost as much as reading the quantized weights (measured in
docs/inference.md).

It covers what step.cpp implements: pre-norm RMSNorm blocks, RoPE, grouped-query global attention, a SwiGLU
MLP and a plain LM head, batches of up to 16 rows, fp32 activations on the CPU. Every other model keeps `decode_step`
(eager or compiled). `LLMKIT_NATIVE_STEP=0` turns it off. The embeddings and RoPE tables come from the
model's own `embed`, so positions and scaling are the model's.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmkit.models import qkernel
from llmkit.models.kv_cache import KVCache
from llmkit.models.quant import DECODE_ROWS, QuantLinear

MAX_ROWS = DECODE_ROWS  # new tokens per call: step.cpp's products use the decode kernels, for at most this many rows
# Prompts of up to this many tokens (all rows together) are prefilled by the native step in pieces of
# MAX_ROWS tokens, by `generate` and the serving engine; longer ones by the model's forward, one GEMM per layer.
# Measured on SmolLM2 int8: a 17-token prompt took ~100 ms on the forward (its GEMM path dequantizes every
# layer) against ~20 ms native; at 96-100 tokens the two tie (AVX2: 379 against 398 tok/s; AVX-512 VNNI with
# bf16 GEMMs: 684 against 707), and past that the forward wins (200 tokens: 624 against 980 on the latter).
NATIVE_PREFILL_TOKENS = 96
# The serving engine's switch, on its own thread, with nothing decoding (serve/engine.py): there the forward's
# OpenMP GEMMs run up to 2x slower than on the main thread (libgomp throttles a second thread's team). SmolLM2
# int8 measured on the engine thread (medians of 5), forward against native: 8 x 18 tokens 375 against 172 ms,
# 4 x 64 549 against 342, 256 tokens 494 against 417, 384 tokens 668 against 661.
ENGINE_PREFILL_TOKENS = 384
# Where the int8 x int8 products run on AMX tiles (qkernel.amx: 32 rows of x or more, the VNNI kernel's sums
# exactly) a prefill goes in pieces of up to AMX_PIECE tokens, and the native step stays ahead of the forward
# up to ~800 tokens (measured on SmolLM2 int8, 2 threads, native in 256-token pieces against the forward: 8 x
# 20 tokens 38 against 121 ms (16-token pieces on VNNI: 73), 512 tokens 259 against 305, 1,000 tokens 732
# against 676, where attention's cost per token grows with the keys): AMX_PREFILL_TOKENS. On the engine's
# thread the forward is slower still (above), so there every prompt is prefilled by the native step.
AMX_PIECE, AMX_PREFILL_TOKENS, AMX_ENGINE_PREFILL_TOKENS = 256, 768, 1 << 62


HEADS = ("all", "last", "none")  # which logits `NativeStep.run` computes (step.cpp's dims[11])


class _Lin(ctypes.Structure):
    """step.cpp's `Lin`: one Linear, quantized in qmm.cpp's tile layout (bits 8/4) or fp32 as it is (bits 32)."""

    _fields_ = [("bits", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("g", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("c", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def why_not(model: nn.Module) -> str:
    """'' when the native step can run `model`, else the first reason it cannot."""
    from llmkit.models.transformer import OffsetRMSNorm, Transformer

    if os.environ.get("LLMKIT_NATIVE_STEP", "1") == "0":
        return "LLMKIT_NATIVE_STEP=0"
    if not isinstance(model, Transformer):
        return "not a Transformer"
    c = model.cfg
    checks = [
        (c.arch == "decoder" and c.prenorm and not c.post_norms, "not a pre-norm decoder"),
        (c.norm == "rmsnorm" and not c.norm_unit_offset, "not RMSNorm"),
        (c.mlp == "gated" and c.activation == "silu", "not a SwiGLU MLP"),
        (c.pos == "rope" and set(c.layer_kinds) == {"global"}, "not global RoPE attention"),
        (not c.qk_norm and c.attn_softcap is None and c.logit_softcap is None, "qk-norm or soft-capping"),
        (c.head_dim % 8 == 0 and c.n_head // c.n_kv_head <= 8, "head_dim not a multiple of 8 or > 8 heads per group"),
        (model.tok_emb.weight.dtype == torch.float32 and model.tok_emb.weight.device.type == "cpu", "not fp32 CPU"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    for i, norm in enumerate(_norms(model)):
        if isinstance(norm, OffsetRMSNorm) or not isinstance(norm, nn.RMSNorm) or norm.weight is None:
            return f"{_norm_name(i, c.n_layer)} is not an affine RMSNorm"
    for i, m in enumerate(_linears(model)):
        if type(m) is nn.Linear:  # exactly: subclasses (LoRA, ...) have their own forward
            w = m.weight
            if w.dtype != torch.float32 or not w.is_contiguous() or m.in_features % 8:
                return f"{_linear_name(i, c.n_layer)} is not a contiguous fp32 weight with in_features % 8 == 0"
        elif not isinstance(m, QuantLinear) or m._tiles is None:
            return f"{_linear_name(i, c.n_layer)} neither is fp32 nor runs llmkit's quantized kernels"
    if not qkernel.available():
        return qkernel.why_unavailable()
    return ""


# The modules step.cpp is given, in its order, by attribute (a dotted `get_submodule` per module made every
# `native_step` call cost ~4 ms on SmolLM2); names only for messages.
_PER_LAYER = ("attn.qkv", "attn.proj", "mlp.gate", "mlp.fc", "mlp.proj")


def _linears(model: nn.Module) -> list[nn.Module]:
    """5 Linears per layer (qkv, o, gate, up, down), then the head."""
    return [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.gate, b.mlp.fc, b.mlp.proj)] + [
        model.lm_head]


def _linear_name(i: int, n_layer: int) -> str:
    return "lm_head" if i == 5 * n_layer else f"blocks.{i // 5}.{_PER_LAYER[i % 5]}"


def _norms(model: nn.Module) -> list[nn.Module]:
    """2 norms per layer, then the final one."""
    return [n for b in model.blocks for n in (b.norm1, b.norm2)] + [model.final_norm]


def _norm_name(i: int, n_layer: int) -> str:
    return "final_norm" if i == 2 * n_layer else f"blocks.{i // 2}.norm{i % 2 + 1}"


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor whose address step.cpp is given: the Linears' weights or tiles, scales, mins and biases,
    and the norms' weights."""
    out = []
    for m in _linears(model):
        parts = ((m.weight, m.bias) if type(m) is nn.Linear else
                 (m._tiles, m.scales if m.bits == 8 else m._sm, m._sums, m.bias))
        out += [t for t in parts if t is not None]
    return out + [n.weight for n in _norms(model)]


def _key(model: nn.Module) -> tuple[int, ...]:
    """The addresses of `_tensors`: a step built for other addresses would read freed memory (`model.to`,
    `.double().float()` or re-preparing layers gives a parameter new storage under the same object)."""
    return tuple(t.data_ptr() for t in _tensors(model))


def _lin(m: nn.Module) -> _Lin:
    if type(m) is nn.Linear:
        return _Lin(32, m.out_features, m.in_features, 0, _ptr(m.weight), None, None, _ptr(m.bias))
    return _Lin(m.bits, m.out_features, m.in_features, m.group_size or 0, _ptr(m._tiles),
                _ptr(m.scales if m.bits == 8 else m._sm), _ptr(m._sums), _ptr(m.bias))


class NativeStep:
    """`decode_step`'s signature and result for one model, run by step.cpp."""

    def __init__(self, model: nn.Module):
        c = model.cfg
        self.model = weakref.proxy(model)
        self.cfg = c
        lins = _linears(model)
        # the storages the pointers below point into, held (detached views) so that even a step kept past a
        # change of its model's weights reads live memory; `native_step` rebuilds when the addresses change
        self.held = [t.detach() for t in _tensors(model)]
        self.key = tuple(t.data_ptr() for t in self.held)
        self.lins = (_Lin * len(lins))(*[_lin(m) for m in lins])
        norms = _norms(model)
        self.norms = (ctypes.c_void_p * len(norms))(*[n.weight.data_ptr() for n in norms])
        eps = model.final_norm.eps
        self.eps = float(eps if eps is not None else torch.finfo(torch.float32).eps)
        self.scale = float(c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5)
        self._cache_ptrs: tuple[tuple[int, ...], ctypes.Array] | None = None
        amx = qkernel.amx() and any(m.bits == 8 and m.c for m in self.lins)  # int8 x int8 layers on AMX
        self.piece = AMX_PIECE if amx else MAX_ROWS  # tokens per call, at most, in a prefill
        # prompts of up to this many tokens (all rows) are prefilled here rather than by the model's forward
        self.prefill_tokens = AMX_PREFILL_TOKENS if amx else NATIVE_PREFILL_TOKENS
        self.engine_prefill_tokens = AMX_ENGINE_PREFILL_TOKENS if amx else ENGINE_PREFILL_TOKENS

    def _kv(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> int:
        """Address of the 2L cache buffer pointers step.cpp reads, rebuilt when any buffer changes (a new
        cache may reuse some of a freed one's addresses, so every pointer is compared)."""
        ptrs = tuple(t.data_ptr() for t in k) + tuple(t.data_ptr() for t in v)
        if self._cache_ptrs is None or self._cache_ptrs[0] != ptrs:
            for t in k + v:
                if not t.is_contiguous() or t.dtype != torch.float32:
                    raise ValueError("the native step needs contiguous fp32 K/V buffers")
            self._cache_ptrs = (ptrs, (ctypes.c_void_p * len(ptrs))(*ptrs))
        return ctypes.addressof(self._cache_ptrs[1])

    def run(self, idx: torch.Tensor, position_ids: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
            valid: torch.Tensor, pos: int, rows_valid: torch.Tensor | None = None,
            start: torch.Tensor | None = None, rows: torch.Tensor | None = None,
            head: str = "all") -> torch.Tensor | None:
        """Logits (B, T, V) of T new tokens per row (idx, position_ids: (B, T); B * T <= self.piece). Each layer's
        K/V buffers (>= B rows, nkv, S, hd) get token t at buffer position pos + t, which attends to the valid
        keys up to its own; valid (>= B rows, S) marks those keys, and its columns pos..pos+T-1 are first set
        to `rows_valid` ((B,) or (B, T) for left padding; all True by default). `start` ((B,) int64, default
        zeros) is each row's first key that may be valid: attention scans [start, pos + t] only, which matters
        where rows begin late in a long shared buffer. `rows` ((B,) distinct int64, default 0..B-1) is each
        row's row of the buffers and `valid`: the serving engine steps its occupied slots only. A padding
        token's own output is zeros where it sees no valid key. head="last" gives each row's last token's
        logits only, (B, 1, V), and "none" none (None): a prefill piece skips the head, a fifth of SmolLM2."""
        c = self.cfg
        B, T = idx.shape
        S = k[0].size(2)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if B * T > self.piece or pos + T > S:
            raise ValueError(f"the native step takes at most {self.piece} tokens and needs pos + T <= S")
        if valid.dtype != torch.bool or valid.size(1) != S or not valid.is_contiguous():
            raise ValueError("valid must be a contiguous bool (rows, S) mask")
        need = B
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
            if rows.shape != (B,) or int(rows.min()) < 0 or len(set(rows.tolist())) != B:
                raise ValueError(f"rows must be ({B},) distinct non-negative row indices")
            need = int(rows.max()) + 1
        if min(k[0].size(0), valid.size(0)) < need or tuple(k[0].shape[1::2]) != (c.n_kv_head, c.head_dim):
            raise ValueError(f"the K/V buffers and valid mask need >= {need} rows of ({c.n_kv_head}, S, {c.head_dim})")
        if start is not None:
            start = start.to(torch.int64).contiguous()
            if start.shape != (B,) or int(start.min()) < 0 or int(start.max()) > pos:
                raise ValueError(f"start must be ({B},) with 0 <= start <= pos ({pos})")
        x, rope = self.model.embed(idx, position_ids)
        x = x.reshape(B * T, c.d_model).contiguous()
        cos, sin = (t.reshape(B * T, c.head_dim).contiguous() for t in rope)
        mark = True if rows_valid is None else rows_valid.reshape(B, -1)
        if rows is None:
            valid[:B, pos:pos + T] = mark
        else:
            valid[rows, pos:pos + T] = mark
        kv = self._kv(k, v)
        L = c.n_layer
        dims = (ctypes.c_int64 * 12)(L, B, T, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size,
                                     S, pos, HEADS.index(head))
        logits = None if head == "none" else torch.empty(B, T if head == "all" else 1, c.vocab_size)
        qkernel._load()[0].llmkit_decode_step(dims, self.eps, self.scale, self.lins, self.norms, kv,
                                              kv + ctypes.sizeof(ctypes.c_void_p) * L, valid.data_ptr(),
                                              _ptr(start), _ptr(rows), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                              _ptr(logits))
        return logits

    def prefill(self, idx: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                begin: int = 0, end: int | None = None, logits: bool = True) -> torch.Tensor | None:
        """Tokens [begin, end) of left-padded prompts (idx, position_ids, mask: (B, T)) into `cache`, whose
        column j holds token j (`cache.pos` == begin), in pieces of at most `self.piece` tokens in all; `cache.pos`
        ends at `end`. Returns the logits (B, V) of each row's last token of the span (None with logits=False:
        a chunk of a longer prefill)."""
        B, T = idx.shape
        end = T if end is None else end
        step = max(1, self.piece // B)
        out = None
        for a in range(begin, end, step):
            sl = slice(a, min(end, a + step))
            out = self.run(idx[:, sl], position_ids[:, sl], cache.k, cache.v, cache.valid, cache.pos,
                           mask[:, sl].bool(), head="last" if logits and sl.stop == end else "none")
            cache.pos = sl.stop
        return None if out is None else out[:, -1]

    def __call__(self, idx: torch.Tensor, position_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`decode_step`'s contract (cache: a `StaticKVCache`): the token goes to `cache.write_pos`."""
        return self.run(idx, position_ids, cache.k, cache.v, cache.valid, int(cache.write_pos))[:, -1]


_steps: weakref.WeakKeyDictionary[nn.Module, NativeStep] = weakref.WeakKeyDictionary()


def native_step(model: nn.Module, rows: int) -> NativeStep | None:
    """The native step for `model` at `rows` new tokens in all, or None where it does not apply (see `why_not`)."""
    if rows > MAX_ROWS or why_not(model):
        return None
    step = _steps.get(model)
    if step is None or step.key != _key(model):  # new or moved weights: new pointers
        step = _steps[model] = NativeStep(model)
    return step


@contextmanager
def native_disabled() -> Iterator[None]:
    """Within the block every model takes the Python decode step (for references and measurements)."""
    old = os.environ.get("LLMKIT_NATIVE_STEP")
    os.environ["LLMKIT_NATIVE_STEP"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLMKIT_NATIVE_STEP"]
        else:
            os.environ["LLMKIT_NATIVE_STEP"] = old
