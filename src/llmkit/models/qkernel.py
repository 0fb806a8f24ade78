"""llmkit's own int8/int4 matrix products for decode-sized inputs (kernels/qmm.cpp), built on first use,
with the one-call decode step that uses them (kernels/step.cpp, driven by models/native_step.py).

The C++ files are compiled once per machine with `g++ -O3 -march=native` (about 5 s) into a cache folder
(`$LLMKIT_CACHE` or ~/.cache/llmkit) and loaded with ctypes; the products run on PyTorch's own thread pool
(`at::parallel_for`, so `torch.set_num_threads` applies), the native step on as many threads of its own.
Where it cannot be built (no g++, a CPU without AVX2/FMA, not x86) `available()` says why and the quantized
layers keep PyTorch's kernels.
`LLMKIT_QUANT_KERNEL=torch` turns it off. Where the CPU has AVX-512 VNNI the products take integer activations:
int8 layers round x per row to int8 (layers quantized with int8 activations, `row_sums`) or int16 (the
others), int4 layers to int8 per 32-column block (`int8_act`, `int4_act`; LLMKIT_INT8_ACT=int16 rounds every
int8 layer's x to int16, LLMKIT_INT8_ACT=fp32 / LLMKIT_INT4_ACT=fp32 keep fp32). Inside `torch.compile` the products are custom ops,
so the compiled decode step calls the same code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from llmkit.errors import LlmkitError
from llmkit.io import atomic_file

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "qmm.cpp", KERNELS / "step.cpp")  # one library: the step calls the products
NB, CHUNK = 4, 16  # the tile layout of qmm.cpp: 4 output rows, 16-column chunks (int4: 32-column blocks)
ABI, STEP_ABI = 8, 8  # the C signatures this module calls, checked when the library is loaded


def cache_dir() -> Path:
    return Path(os.environ.get("LLMKIT_CACHE") or Path.home() / ".cache" / "llmkit") / "kernels"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


# The kernels' environment switches and the values each takes (unset: the default, the first).
SWITCHES = {"LLMKIT_KERNEL_ISA": ("native", "avx2"), "LLMKIT_INT4_ACT": ("int8", "fp32"),
            "LLMKIT_INT8_ACT": ("int8", "int16", "fp32"), "LLMKIT_AMX": ("on", "off")}


def switch(name: str) -> str:
    """The value of one of `SWITCHES` (its default when unset); a value it does not take is refused in one
    line, so a typo cannot silently keep the other numerics."""
    allowed = SWITCHES[name]
    value = os.environ.get(name, "") or allowed[0]
    if value not in allowed:
        raise LlmkitError(f"{name}={value!r} is not one of {', '.join(allowed)}; set one of those or unset it")
    return value


def isa_flags() -> list[str]:
    """Compiler flags that narrow -march=native: LLMKIT_KERNEL_ISA=avx2 builds the AVX2 code on a CPU with
    AVX-512 too (for tests that check both paths, and for A/B measurements)."""
    return ["-mno-avx512f"] if switch("LLMKIT_KERNEL_ISA") == "avx2" else []


def _build(out: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found")
    with atomic_file(out) as tmp:
        cmd = [cxx, "-O3", "-march=native", *isa_flags(), "-std=c++17", "-fopenmp", "-shared", "-fPIC",
               f"-I{torch_dir / 'include'}", *map(str, SOURCES), "-o", str(tmp),
               f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [""])[-1][:200]
            raise RuntimeError(f"{Path(cxx).name} exited with {r.returncode}" + (f": {last}" if last else ""))


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') or (None, why not)."""
    if os.environ.get("LLMKIT_QUANT_KERNEL", "") == "torch":
        return None, "LLMKIT_QUANT_KERNEL=torch"
    for name in SWITCHES:  # a typo is refused before anything is built or chosen
        switch(name)
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= cpu_flags():
        return None, "the CPU lacks AVX2/FMA"
    machine = f"{torch.__version__}|{sys.version}|{' '.join(sorted(cpu_flags()))}|{isa_flags()}"  # per CPU
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + machine.encode())
    path = cache_dir() / f"qmm-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        if lib.llmkit_qmm_abi() != ABI or lib.llmkit_step_abi() != STEP_ABI:
            raise RuntimeError("stale build")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
    P, N = ctypes.c_void_p, ctypes.c_int64
    lib.llmkit_f32_mm.argtypes = [P, P, P, N, N, N]
    lib.llmkit_int8_mm.argtypes = [P, P, P, P, P, N, N, N]
    lib.llmkit_int4_mm.argtypes = [P, P, P, P, N, N, N, N]
    for bits in (4, 8):  # the activation widths, LLMKIT_INT4_ACT / LLMKIT_INT8_ACT
        fn = getattr(lib, f"llmkit_int{bits}_act")
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        fn({"fp32": 32, "int16": 16, "int8": 8}[switch(f"LLMKIT_INT{bits}_ACT")])
    lib.llmkit_amx.argtypes, lib.llmkit_amx.restype = [ctypes.c_int], ctypes.c_int
    lib.llmkit_amx(int(switch("LLMKIT_AMX") == "on"))
    F = ctypes.c_float
    lib.llmkit_decode_step.argtypes = [P, F, F, P, P, P, P, P, P, P, P, P, P, P]
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


def why_unavailable() -> str:
    return _load()[1]


def fits(out_features: int, in_features: int, bits: int) -> bool:
    """Whether a layer's shape has the kernel's tile layout (4 output rows, 16 or 32 input columns)."""
    return out_features % NB == 0 and in_features % (CHUNK if bits == 8 else 2 * CHUNK) == 0


# ------------------------------------------------------------------------------------------- weight layouts


def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> the kernel's (N/4, K/16, 4, 16) tiles: each tile's chunks lie side by side."""
    N, K = q.shape
    return q.reshape(N // NB, NB, K // CHUNK, CHUNK).transpose(1, 2).contiguous()


def row_sums(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (N,) int32 128 * sum_k q[n, k]: what the int8-activation product (x stored as x + 128
    in unsigned bytes) takes back from its sums, exactly."""
    return q.to(torch.int32).sum(1).mul_(128).to(torch.int32).contiguous()


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) packed uint8 (32-column blocks of 16 bytes) -> (N/4, K/32, 4, 16) tiles."""
    N, H = packed.shape
    return packed.reshape(N // NB, NB, H // CHUNK, CHUNK).transpose(1, 2).contiguous()


def tile_int4_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """(N, G) scales and mins -> (N/4, G, 2, 4): per tile and group the 4 rows' scales, then their mins, so
    the kernel reads one group's 8 numbers for a tile in one place."""
    N, G = scales.shape
    t = torch.stack((scales.float(), mins.float()), 0).reshape(2, N // NB, NB, G)
    return t.permute(1, 3, 0, 2).contiguous()


def has_vnni() -> bool:
    """Whether the built library has the AVX-512 VNNI products (the CPU has VNNI and the build is native)."""
    lib = _load()[0]
    return lib is not None and bool(lib.llmkit_vnni())


def _act(bits: int, width: int) -> int:
    lib = _load()[0]
    return int(getattr(lib, f"llmkit_int{bits}_act")(width)) if lib is not None else 32


def int4_act() -> int:
    """The activation width of the int4 product: 8 where the CPU has AVX-512 VNNI (x quantized to int8 per
    32-column block, as llama.cpp does), 32 otherwise or with LLMKIT_INT4_ACT=fp32."""
    return _act(4, 0)


def int8_act() -> int:
    """The activation width of the int8 product where the CPU has AVX-512 VNNI: 8 (the default: x rounded per
    row to int8 in the layers quantized for int8 activations, to int16, ~1.5e-5 of its largest value, in the
    others) or 16 (int16 in every layer, LLMKIT_INT8_ACT=int16); 32 otherwise or with LLMKIT_INT8_ACT=fp32."""
    return _act(8, 0)


def amx(on: bool | None = None) -> bool:
    """Whether prefill-sized int8 x int8 products (32 rows of x or more) run on AMX tiles: where the build has
    AMX-INT8, Linux grants the tile state, and LLMKIT_AMX is not off; `on` switches it in this process.
    Same sums, same outputs as the VNNI kernel."""
    lib = _load()[0]
    return bool(lib.llmkit_amx(-1 if on is None else int(on))) if lib is not None else False


def set_int8_act(bits: int) -> int:
    """Choose 8 or 16 (where built with VNNI) or 32 for the int8 product in this process; returns what is in
    effect."""
    return _act(8, bits)


def set_int4_act(bits: int) -> int:
    """Choose 8 (where built with VNNI) or 32 for the int4 product in this process; returns what is in effect."""
    return _act(4, bits)


# ----------------------------------------------------------------------------------------- the products


def f32_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x (M, K) @ weight^T for a contiguous fp32 (N, K) weight, K % 8 == 0: the product the native
    step runs for unquantized layers (eager only; exposed for tests and measurements)."""
    x = x.contiguous()
    M, K = x.shape
    N = weight.size(0)
    y = torch.empty(M, N, dtype=torch.float32)
    _load()[0].llmkit_f32_mm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, K, N)
    return y


def _int8_mm(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    N = scales.numel()
    y = torch.empty(M, N, dtype=torch.float32)
    c = None if sums is None else sums.data_ptr()
    _load()[0].llmkit_int8_mm(x.data_ptr(), tiles.data_ptr(), scales.data_ptr(), c, y.data_ptr(), M, K, N)
    return y


def _int4_mm(x: torch.Tensor, tiles: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    M, K = x.shape
    N = tiles.size(0) * NB
    y = torch.empty(M, N, dtype=torch.float32)
    _load()[0].llmkit_int4_mm(x.data_ptr(), tiles.data_ptr(), sm.data_ptr(), y.data_ptr(), M, K, N, group_size)
    return y


# Operators for torch.compile, registered with the low-level define/impl API: its Python dispatch costs about
# 10 us a call against about 45 us for torch.library.custom_op (measured), and a decode step makes ~150 calls.
torch.library.define("llmkit::int8_mm", "(Tensor x, Tensor tiles, Tensor scales, Tensor? sums) -> Tensor")
torch.library.define("llmkit::int4_mm", "(Tensor x, Tensor tiles, Tensor sm, int group_size) -> Tensor")


@torch.library.impl("llmkit::int8_mm", "CPU")
def _int8_mm_cpu(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
                 sums: torch.Tensor | None) -> torch.Tensor:
    return _int8_mm(x.contiguous(), tiles, scales, sums)


@torch.library.impl("llmkit::int4_mm", "CPU")
def _int4_mm_cpu(x: torch.Tensor, tiles: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    return _int4_mm(x.contiguous(), tiles, sm, group_size)


@torch.library.register_fake("llmkit::int8_mm")
def _int8_mm_fake(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
                  sums: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.size(0), scales.numel())


@torch.library.register_fake("llmkit::int4_mm")
def _int4_mm_fake(x: torch.Tensor, tiles: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty(x.size(0), tiles.size(0) * NB)


def int8_mm(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
            sums: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) fp32 @ (q * scales)^T from `tile_int8` tiles; the direct call when eager. sums
    (`row_sums`): the layer takes int8 activations (where the CPU has VNNI), else int16 ones."""
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.int8_mm(x, tiles, scales, sums)
    return _int8_mm(x.contiguous(), tiles, scales, sums)


def int4_mm(x: torch.Tensor, tiles: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    """y (M, N) = x (M, K) fp32 @ (q * scales + mins)^T from `tile_int4` tiles and `tile_int4_scales`."""
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.int4_mm(x, tiles, sm, group_size)
    return _int4_mm(x.contiguous(), tiles, sm, group_size)
