"""Weight-only int8/int4 quantization: the kernels against an independent dequantize-then-matmul, the model
against fp32, the command's round trip through `llmkit.load`, and its refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.models import qkernel
from llmkit.models.build import build_model
from llmkit.models.checkpoint import read_meta, save_checkpoint
from llmkit.models.config import preset
from llmkit.models.load import load
from llmkit.models.quant import QuantLinear, prepare_quantized, quantize_model

HERE = Path(__file__).parent


def reference_dequant(q: QuantLinear) -> torch.Tensor:
    """The stored format, decoded straight from its definition (not via QuantLinear.dequantize)."""
    if q.bits == 8:
        return q.qweight.double() * q.scales.double()[:, None]
    lo, hi = (q.qweight & 15).double(), (q.qweight >> 4).double()
    ints = torch.empty(q.out_features, q.in_features, dtype=torch.float64)
    ints[:, 0::2], ints[:, 1::2] = lo, hi
    g = q.group_size
    scale = q.scales.double().repeat_interleave(g, 1)
    mins = q.mins.double().repeat_interleave(g, 1)
    return ints * scale + mins


def reference_rounded_act(x: torch.Tensor, block: int, top: int) -> torch.Tensor:
    """x as a VNNI product sees it: each `block` columns rounded to integer steps of max|x| / top (int4: blocks
    of 32, int8 steps, top 127; int8: whole rows, int16 steps, top 32767), with the kernel's fp32 arithmetic
    (x * (top / max), rounded half to even, times max / top), in fp64."""
    xb = x.reshape(x.size(0), -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(float(top)) / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).double() * (amax / top).double()).reshape_as(x)


needs_kernel = pytest.mark.skipif(not qkernel.available(), reason=f"llmkit's kernel: {qkernel.why_unavailable()}")


@pytest.mark.parametrize("act,own", [(torch.bfloat16, False), (None, False),
                                     pytest.param(None, True, marks=needs_kernel),
                                     pytest.param(torch.bfloat16, True, marks=needs_kernel)])
@pytest.mark.parametrize("bits,group,act_bits", [(8, None, 16), (8, None, 8), (4, 32, 16), (4, 64, 16), (4, 128, 16)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 20])  # <= 16 rows: the int kernels; 20: one GEMM
def test_quant_linear_matches_dequantized_matmul(bits, group, act_bits, act, own, rows):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    q = QuantLinear.from_linear(lin, bits, group, act_bits)
    q.prepare(act, own_kernel=own)
    assert (q._tiles is not None) == own
    x = torch.randn(rows, 256)
    kernel = own and rows <= 16
    w = reference_dequant(q)
    if kernel and bits == 4 and qkernel.int4_act() == 8:  # int8 x against q * scale, exact x against the mins
        mins = q.mins.double().repeat_interleave(group, 1)
        want = (reference_rounded_act(x, 32, 127) @ (w - mins).T + x.double() @ mins.T + lin.bias.double()).float()
    elif kernel and bits == 8 and act_bits == 8 and qkernel.int8_act() == 8:  # int8 x per row against q * scale
        want = (reference_rounded_act(x, x.size(1), 127) @ w.T + lin.bias.double()).float()
    elif kernel and bits == 8 and qkernel.int8_act() != 32:  # int16 x per row against q * scale
        want = (reference_rounded_act(x, x.size(1), 32767) @ w.T + lin.bias.double()).float()
    else:
        want = (x.double() @ w.T + lin.bias.double()).float()
    got = q(x).detach()
    # bf16 activations carry ~3 significant digits: 2% of the output scale; fp32 (llmkit's kernel on fp32
    # activations for <= 16 rows, a dense fp32 weight otherwise) and the VNNI products against x rounded the
    # same way (int8 per 32-column block for int4, int16 or int8 per row for int8; the products are then
    # exact): 1e-5
    tol = 2e-2 if act is not None and not (own and rows <= 16) else 1e-5
    assert (got - want).abs().max() <= tol * want.abs().max()
    # and the quantization error itself is small against the fp32 layer (int4 groups: ~5-10%)
    full = lin(x)
    assert (got - full).norm() / full.norm() < (0.02 if bits == 8 and act_bits == 16 else 0.12)


@needs_kernel
def test_own_kernel_takes_only_the_shapes_it_tiles():
    """A layer whose outputs are not a multiple of 4 keeps PyTorch's path, with the same numbers."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 98, bias=False)
    q = QuantLinear.from_linear(lin, 8, None)
    q.prepare(None, own_kernel=True)
    assert q._tiles is None and q._dense is not None
    x = torch.randn(2, 64)
    assert torch.allclose(q(x), x @ q.dequantize().T, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_compiled_step_with_own_kernel_equals_eager(bits, group, monkeypatch):
    """The kernels are custom ops inside torch.compile (aot_eager here, as the other compile tests): the
    compiled decode step gives eager's greedy tokens and logits."""
    from llmkit.inference.generate import generate_ids
    from llmkit.inference.sampling import SamplingParams
    from llmkit.models import decode_step as ds

    monkeypatch.setattr(ds, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("LLMKIT_NATIVE_STEP", "0")  # the Python step, compiled (native_step.py has its own tests)
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=96, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                               block_size=128)).eval()
    quantize_model(model, bits, group)
    prepare_quantized(model)
    assert any(m._tiles is not None for m in model.modules() if isinstance(m, QuantLinear))
    p = SamplingParams(max_new_tokens=12, temperature=0)
    eager = [t for t, *_ in generate_ids(model, [[1, 5, 9, 3]], p)]
    compiled = [t for t, *_ in generate_ids(model, [[1, 5, 9, 3]], p, compile=True)]
    assert compiled == eager


def test_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLMKIT_QUANT_KERNEL", "torch")
    qkernel._load.cache_clear()
    try:
        assert not qkernel.available() and "LLMKIT_QUANT_KERNEL" in qkernel.why_unavailable()
    finally:
        monkeypatch.delenv("LLMKIT_QUANT_KERNEL")
        qkernel._load.cache_clear()


@pytest.mark.parametrize("name", sorted(qkernel.SWITCHES))
def test_kernel_switch_typo_is_refused(name, monkeypatch):
    """LLMKIT_INT4_ACT=FP32 (say) must not silently keep the other numerics: one clear line naming the values."""
    monkeypatch.setenv(name, "bogus")
    qkernel._load.cache_clear()
    try:
        with pytest.raises(LlmkitError, match=f"{name}='bogus' is not one of .*; set one of those or unset it"):
            qkernel.available()
    finally:
        monkeypatch.delenv(name)
        qkernel._load.cache_clear()
    assert qkernel.int4_act() in (8, 32) and qkernel.int8_act() in (8, 16, 32)


@pytest.mark.skipif(not qkernel.amx(), reason="no AMX-INT8 here (or LLMKIT_AMX=off)")
@pytest.mark.parametrize("M", [32, 47, 80])
def test_amx_product_equals_vnni(M):
    """The AMX int8 x int8 product (32 rows of x or more) gives the VNNI kernel's outputs exactly: the same int32
    sums and epilogue. N = 84 covers two-strip, one-strip and leftover tiles; 47 and 80 rows leave rows to VNNI."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (84, 128), dtype=torch.int8)
    scales = torch.rand(84) + 0.01
    x = torch.randn(M, 128)
    tiles, sums = qkernel.tile_int8(q), qkernel.row_sums(q)
    try:
        qkernel.amx(False)
        ref = qkernel.int8_mm(x, tiles, scales, sums)
        qkernel.amx(True)
        out = qkernel.int8_mm(x, tiles, scales, sums)
    finally:
        qkernel.amx(True)
    assert torch.equal(out, ref)
    dense = (x @ (q.float() * scales[:, None]).T)
    assert (out - dense).abs().max() <= 0.02 * dense.abs().max()  # int8 x: ~1/127 of each row's largest value


def test_int4_pack_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    q = QuantLinear.from_linear(nn.Linear(64, 64, bias=False), 4, 32)
    from llmkit.models.quant import pack_int4, unpack_int4

    ints = torch.randint(0, 16, (64, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(ints)), ints)
    assert q.qweight.shape == (64, 32) and w.shape == (64, 64)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, bpe_tokenizer):
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=bpe_tokenizer.vocab_size, n_layer=2, tie_embeddings=True)
    model = build_model(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("q") / "llama", model, cfg, bpe_tokenizer)


def _run(*args: str) -> subprocess.CompletedProcess:
    """The CLI in-process (a subprocess costs seconds of imports per call): exit status + captured output."""
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("bits,extra,tol,head", [(8, [], 0.02, 8), (4, ["--group_size", "32"], 0.15, 8),
                                                 (4, ["--head_bits", "4"], 0.15, 4)])
def test_quantize_command_round_trip(llama_ckpt, tmp_path, bits, extra, tol, head):
    out = tmp_path / f"int{bits}"
    r = _run("quantize", str(llama_ckpt), str(out), "--bits", str(bits), *extra)
    assert r.returncode == 0, r.stderr
    meta = read_meta(out)
    assert meta["quantization"]["bits"] == bits and "lm_head" in meta["quantization"]["modules"]
    acts = {n: spec.get("act_bits", 16) for n, spec in meta["quantization"]["modules"].items()}
    # int8: every block layer smoothed (the embedded Bible as calibration) and given int8 activations, and the
    # head int8 activations unsmoothed
    assert acts == {n: 8 if bits == 8 else 16 for n in acts}
    assert ("smoothing" in meta["quantization"]) == (bits == 8)
    qmodel, tok = load(out)
    fmodel, _ = load(llama_ckpt)
    assert tok is not None and isinstance(qmodel.lm_head, QuantLinear)
    assert qmodel.lm_head.bits == head  # 4-bit models keep an int8 vocabulary projection unless asked
    assert {m.bits for n, m in qmodel.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"} == {bits}
    assert qmodel.tok_emb.weight.dtype == torch.float32  # embeddings stay fp32
    x = torch.randint(0, qmodel.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        f, q = fmodel(x).logits, qmodel(x).logits
        # relative L2 error of the logits: int8 < 2%, int4 (group 32) < 15% on this random-init model
        assert (q - f).norm() / f.norm() < tol
        # cache = no cache for the quantized model too (one-token steps use the int kernels)
        cache = qmodel.new_cache(1, 24)
        qmodel(x[:1, :20], cache=cache)
        steps = torch.cat([qmodel(x[:1, i:i + 1], cache=cache).logits for i in range(20, 24)], 1)
        assert torch.allclose(steps, qmodel(x[:1]).logits[:, 20:], atol=3e-2, rtol=0)
    r = _run("generate", str(out), "--prompt", "In the beginning", "--max_new_tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr


def test_quantize_refusals(llama_ckpt, tmp_path):
    out = tmp_path / "q8"
    assert _run("quantize", str(llama_ckpt), str(out), "--bits", "8").returncode == 0
    for args, words in [((str(out), str(tmp_path / "again"), "--bits", "4"), "already quantized"),
                        ((str(llama_ckpt), str(tmp_path / "b3"), "--bits", "3"), "--bits 3"),
                        ((str(llama_ckpt), str(tmp_path / "g48"), "--bits", "4", "--group_size", "48"), "group_size 48"),
                        ((str(llama_ckpt), str(tmp_path / "g8"), "--bits", "8", "--group_size", "32"), "per output channel"),
                        ((str(llama_ckpt), str(tmp_path / "h2"), "--bits", "4", "--head_bits", "2"), "--head_bits 2"),
                        ((str(llama_ckpt), str(tmp_path / "a4"), "--bits", "8", "--act_bits", "4"), "--act_bits 4"),
                        ((str(llama_ckpt), str(tmp_path / "c"), "--calibration", str(tmp_path / "none.txt")),
                         "no such file")]:
        r = _run("quantize", *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / args[1].rsplit("/", 1)[-1]).exists() or args[1] == str(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_quantize_model_in_place_keeps_outputs_close():
    torch.manual_seed(0)
    m = build_model(preset("gpt2-tiny", vocab_size=256, n_layer=1)).eval()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        f = m(x).logits
        quantize_model(m, 8)
        q = m(x).logits
    assert (q - f).norm() / f.norm() < 0.02


def test_quantized_checkpoint_exports_dequantized(llama_ckpt, tmp_path):
    """Exporters take a quantized checkpoint and write its dequantized fp32 weights (same function up to bf16)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    q = tmp_path / "q8"
    assert _run("quantize", str(llama_ckpt), str(q), "--bits", "8").returncode == 0
    r = _run("convert", "to-hf", str(q), str(tmp_path / "hf"))
    assert r.returncode == 0 and "dequantized" in r.stderr, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    qmodel, _ = load(q)
    x = torch.randint(0, qmodel.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        got, want = hf(x).logits, qmodel(x).logits
    # the tied head is exported as the fp32 embedding (HF ties them), so allow the int8 head's error too
    assert (got - want).norm() / want.norm() < 0.03


@needs_kernel
@pytest.mark.skipif("avx512f" not in qkernel.cpu_flags() or bool(qkernel.isa_flags()),
                    reason="the CPU has no AVX-512 (the AVX2 code is what the other tests ran)")
def test_avx2_build_on_an_avx512_cpu():
    """The AVX2 code paths (what a CPU without AVX-512 runs) built with -mno-avx512f and checked by the same
    kernel and native-step tests, in a subprocess (the library is loaded once per process)."""
    import os
    import sys

    env = {**os.environ, "LLMKIT_KERNEL_ISA": "avx2", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(HERE / "test_quant.py"), str(HERE / "test_native_step.py"),
                        "-k", "matches_dequantized or equals_python_step or chunk_of_tokens or fp32_product"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]
