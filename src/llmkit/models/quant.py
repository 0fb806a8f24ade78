"""Weight-only quantization: int8 per output channel and int4 in groups, run by llmkit's or PyTorch's CPU kernels.

Stored format (safetensors beside the fp32 tensors it replaces, recorded in config.json "quantization"):
- int8: `qweight` int8 (N, K), `scales` fp32 (N,): w = qweight * scale (symmetric, per output row); a layer
  recorded with "act_bits": 8 (inputs smoothed at quantize time, models/smooth.py) rounds its decode-sized
  inputs to int8 per row on llmkit's VNNI kernel, the others to int16;
- int4: `qweight` uint8 (N, K/2) with column 2j in the low nibble and 2j+1 in the high one, `scales` and
  `mins` fp32 (N, K/g): w = q * scale + min within each group of g input columns (asymmetric, like GGUF Q4_1).
At load time each layer picks its kernel (measurements in docs/inference.md): decode-sized inputs (<= 16 rows)
run llmkit's own tiled kernels where they build (qkernel.py, x86 with AVX2; integer activations with VNNI), else
`torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu` on bf16 activations where the CPU has bf16;
longer inputs (prefill) dequantize the weight for one GEMM (bf16 where the CPU has it); with neither kernel
(or on another device) the weights are dequantized once to fp32. The math of the stored weights is the same
in every path.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models import qkernel

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel supports
DECODE_ROWS = 16  # up to this many rows the int kernels win; above, one dequantized GEMM (measured)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX or Arm BF16), read from /proc/cpuinfo."""
    return bool(qkernel.cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def activation_dtype(device: torch.device | str = "cpu") -> torch.dtype | None:
    """bf16 for the int kernels where the CPU has bf16, else None (dequantized fp32 weights).

    LLMKIT_QUANT_ACT=bf16|fp32 overrides the choice (for tests and measurements).
    """
    forced = os.environ.get("LLMKIT_QUANT_ACT", "")
    if torch.device(device).type != "cpu" or forced == "fp32":
        return None
    return torch.bfloat16 if forced == "bf16" or cpu_has_bf16() else None


# ----------------------------------------------------------------------------------------------- the math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (qweight int8 (N, K), scales fp32 (N,))."""
    w = w.float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grouped int4: (packed uint8 (N, K/2), scales (N, K/g), mins (N, K/g)), w ~ q * scale + min."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return pack_int4(q), scales, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, even columns in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15 (inverse of `pack_int4`)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.size(0), -1)


def check_format(bits: int, group_size: int | None, in_features: int | None = None) -> None:
    """Refuse bit widths and group sizes the formats do not have, with one line naming the fix."""
    if bits not in BITS:
        raise LlmkitError(f"--bits {bits} is not supported; use --bits 8 (per-channel) or --bits 4 (grouped)")
    if bits == 8 and group_size is not None:
        raise LlmkitError("int8 weights are quantized per output channel; --group_size applies to --bits 4 only")
    if bits == 4:
        if group_size not in GROUP_SIZES:
            raise LlmkitError(f"--group_size {group_size} is not supported for int4; use one of "
                              f"{', '.join(map(str, GROUP_SIZES))}")
        if in_features is not None and in_features % group_size:
            raise LlmkitError(f"a layer has {in_features} inputs, not a multiple of --group_size {group_size}; "
                              f"pick a group size that divides it")


# ----------------------------------------------------------------------------------------------- the layer


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as int8 (per row) or int4 (grouped); call `prepare()` after loading."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, act_bits: int = 16):
        super().__init__()
        check_format(bits, group_size, in_features)
        if act_bits not in (8, 16) or (act_bits == 8 and bits != 8):
            raise LlmkitError(f"act_bits {act_bits} with int{bits} weights is not supported; int8 activations "
                              "are for int8 weights (act_bits 8 or 16)")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.act_bits = act_bits
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(N))
        else:
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(N, K // group_size))
            self.register_buffer("mins", torch.zeros(N, K // group_size))
        self.bias = nn.Parameter(torch.zeros(N)) if bias else None
        self._act: torch.dtype | None = None
        self._dense: torch.Tensor | None = None  # fp32 fallback weight
        self._kernel: tuple[torch.Tensor, ...] = ()
        self._tiles: torch.Tensor | None = None  # llmkit's kernel layout
        self._sums: torch.Tensor | None = None  # its int8-activation row sums (act_bits 8)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int | None, act_bits: int = 16) -> QuantLinear:
        """Quantize an fp32 `nn.Linear`."""
        q = cls(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, act_bits)
        with torch.no_grad():
            if bits == 8:
                q.qweight, q.scales = quantize_int8(lin.weight)
            else:
                q.qweight, q.scales, q.mins = quantize_int4(lin.weight, group_size)
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        return q.to(lin.weight.device)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight (N, K) the stored integers and scales stand for."""
        if self.bits == 8:
            return self.qweight.float() * self.scales[:, None]
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().reshape(N, K // g, g)
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(N, K)

    def prepare(self, act_dtype: torch.dtype | None, own_kernel: bool = False) -> None:
        """Build the runtime form. own_kernel: decode-sized inputs run llmkit's tiled kernels (qkernel.py; fp32
        activations, or integer ones where the CPU has VNNI), longer ones one dequantized GEMM (bf16 where
        act_dtype says so, else fp32), and no dense copy is kept. Otherwise: PyTorch's integer kernels on bf16
        activations (act_dtype bf16) or a dense fp32 weight (act_dtype None)."""
        self._act = act_dtype
        self._dense, self._kernel, self._tiles, self._sm, self._sums = None, (), None, None, None
        if own_kernel and qkernel.fits(self.out_features, self.in_features, self.bits):
            if self.bits == 8:
                self._tiles = qkernel.tile_int8(self.qweight)
                self._sums = qkernel.row_sums(self.qweight) if self.act_bits == 8 else None
            else:
                self._tiles = qkernel.tile_int4(self.qweight)
                self._sm = qkernel.tile_int4_scales(self.scales, self.mins)
        elif act_dtype is None:
            self._dense = self.dequantize()
        elif self.bits == 8:
            self._kernel = (self.qweight.contiguous(), self.scales.to(act_dtype))
        else:
            q = unpack_int4(self.qweight).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            zeros = self.mins + 8 * self.scales  # the kernel computes (q - 8) * scale + zero
            sz = torch.stack((self.scales, zeros), -1).transpose(0, 1).contiguous().to(act_dtype)  # (K/g, N, 2)
            self._kernel = (packed, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tiles is None and self._act is None:
            if self._dense is None:
                self.prepare(None)
            return F.linear(x, self._dense.to(x.dtype), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) > DECODE_ROWS:  # prefill: one GEMM on the dequantized weight beats the int kernels (measured)
            act = self._act or torch.float32
            y = F.linear(x2.to(act), self.dequantize().to(act))
        elif self._tiles is not None:  # llmkit's kernels (fp32 activations, or integer ones with VNNI)
            x2 = x2.float()
            y = (qkernel.int8_mm(x2, self._tiles, self.scales, self._sums) if self.bits == 8 else
                 qkernel.int4_mm(x2, self._tiles, self._sm, self.group_size))
        elif self.bits == 8:
            y = torch._weight_int8pack_mm(x2.to(self._act), *self._kernel)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(self._act), self._kernel[0], self.group_size, self._kernel[1])
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        a = ", act_bits=8" if self.act_bits == 8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}{a}"


# ----------------------------------------------------------------------------------------------- whole models


def quantizable(model: nn.Module) -> list[str]:
    """Names of the Linear layers weight-only quantization replaces: every nn.Linear of the model."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


HEAD = "lm_head"


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   head_bits: int | None = None, act8: Collection[str] = ()) -> dict[str, Any]:
    """Swap every nn.Linear for a `QuantLinear` in place; returns the config.json "quantization" record.

    act8: int8 layers (by name) that take int8 activations; their inputs must have been smoothed first
    (models/smooth.py, as `llmkit quantize` does), or per-row int8 rounding costs several % perplexity.

    head_bits: the vocabulary projection's width (default: `bits`). 4-bit models keep it at 8 by default in
    `llmkit quantize`, as llama.cpp's Q4 files keep their output tensor wider: one int4 head costs SmolLM2-135M
    8 % more held-out perplexity, an int8 head 0 % (measured, docs/inference.md)."""
    check_format(bits, group_size)
    specs: dict[str, tuple[int, int | None]] = {}
    for name in quantizable(model):
        b, g = bits, group_size
        if name == HEAD and head_bits is not None:
            b, g = head_bits, (group_size or 32) if head_bits == 4 else None
        check_format(b, g, model.get_submodule(name).in_features)
        specs[name] = (b, g)
    act = {n: 8 if n in act8 and b == 8 else 16 for n, (b, _) in specs.items()}
    for name, (b, g) in specs.items():
        _set(model, name, QuantLinear.from_linear(model.get_submodule(name), b, g, act[name]))
    return {"bits": bits, "group_size": group_size,
            "modules": {n: {"bits": b, "group_size": g, **({"act_bits": 8} if act[n] == 8 else {})}
                        for n, (b, g) in specs.items()}}


def apply_quant_layout(model: nn.Module, record: dict[str, Any]) -> None:
    """Replace the Linear layers a config.json "quantization" record names by empty `QuantLinear`s (to load into)."""
    modules = record.get("modules")
    if not isinstance(modules, dict):
        raise LlmkitError("config.json 'quantization' has no 'modules' map; the checkpoint is corrupt")
    for name, spec in modules.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise LlmkitError(f"config.json quantizes {name!r}, which the model does not have; the checkpoint "
                              "is corrupt") from e
        if not isinstance(lin, nn.Linear):
            raise LlmkitError(f"config.json quantizes {name!r}, which is not a Linear layer")
        _set(model, name, QuantLinear(lin.in_features, lin.out_features, int(spec["bits"]), spec.get("group_size"),
                                      lin.bias is not None, int(spec.get("act_bits", 16))))


def prepare_quantized(model: nn.Module, device: torch.device | str = "cpu") -> torch.dtype | None:
    """Pick the kernels for this machine and build every QuantLinear's runtime form (docs/inference.md):
    llmkit's own kernels where they build (x86 with AVX2), PyTorch's integer kernels on bf16 activations
    where the CPU has bf16, else dense fp32 weights. Returns the activation dtype of the long-input path."""
    act = activation_dtype(device)
    own = torch.device(device).type == "cpu" and qkernel.available()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare(act, own_kernel=own)
    return act


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def dequantize_model(model: nn.Module) -> int:
    """Swap every QuantLinear back for an fp32 nn.Linear holding its dequantized weight (for exporters that
    need plain layers); returns how many were swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        _set(model, name, lin.to(q.qweight.device))
    return len(names)
