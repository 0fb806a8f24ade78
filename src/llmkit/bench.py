"""`llmkit bench` / `make bench`: speed measured against a reference in the same run, printed and saved as JSON.

(a) training tokens/s of char-shakespeare vs the same shape built with transformers' GPT2LMHeadModel,
(b) batch-1 decode tokens/s of the gpt2-small shape with our KV cache vs transformers' generate, and as a
    fraction of the memory-bandwidth bound (fp32 weight bytes per token vs a measured copy bandwidth),
plus the benchmarks other areas register (ONNX Runtime, serving, fine-tuning) when present.
"""

from __future__ import annotations

import importlib
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmkit.config import preset
from llmkit.model import build_model

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
# other areas' benchmarks: module with `bench(quick: bool) -> dict`; skipped if not importable
PLUGINS = ["llmkit.interop.bench", "llmkit.serve.bench", "llmkit.finetune.bench"]


def _timeit(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Seconds per call after warmup calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _train_step_fn(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor],
                   batches: list[torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    it = iter(range(10**9))

    def step() -> None:
        x = batches[next(it) % len(batches)]
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(quick: bool = False) -> dict[str, Any]:
    """char-shakespeare training throughput vs transformers.GPT2LMHeadModel of the same shape, same loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if SHAKESPEARE.exists():
        text, corpus = SHAKESPEARE.read_text(encoding="utf-8"), "tinyshakespeare"
    else:
        from llmkit.data.corpus import bible_text

        text, corpus = bible_text()[:1_000_000], "bible (Tiny Shakespeare not found)"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text[:200_000]], dtype=torch.long)
    cfg = preset("char-shakespeare", vocab_size=len(chars))
    B, T = 12, cfg.block_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(16):
        ix = torch.randint(len(data) - T - 1, (B,), generator=g)
        batches.append(torch.stack([data[i : i + T + 1] for i in ix]))
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=T, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu")
    ref = GPT2LMHeadModel(hf_cfg).train()
    steps = 20 if quick else 100
    ours_s = _timeit(_train_step_fn(ours, lambda b: ours(b[:, :-1], b[:, 1:]).loss, batches), 5, steps)
    ref_s = _timeit(_train_step_fn(ref, lambda b: ref(input_ids=b[:, :-1], labels=b[:, :-1]).loss, batches), 5, steps)
    tokens = B * T
    return {"name": "train char-shakespeare", "corpus": corpus, "batch": B, "block": T,
            "params_llmkit": ours.num_params(), "params_reference": sum(p.numel() for p in ref.parameters()),
            "llmkit_tokens_per_s": tokens / ours_s, "reference": "transformers GPT2LMHeadModel",
            "reference_tokens_per_s": tokens / ref_s, "ratio": ref_s / ours_s, "target_ratio": 1.15}


def copy_bandwidth(n_bytes: int = 256 * 2**20) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy reads and writes n_bytes each."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s = min(_timeit(lambda: dst.copy_(src), 1, 3) for _ in range(3))
    return 2 * n_bytes / s


def bench_decode(quick: bool = False) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s, gpt2-small shape, our KV cache vs transformers generate."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmkit.generate import SamplingParams, generate_ids

    cfg = preset("gpt2-small")
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    ref = GPT2LMHeadModel(GPT2Config(activation_function="gelu_new")).eval()
    new = 16 if quick else 64
    prompt = list(range(100, 132))
    params = SamplingParams(max_new_tokens=new, temperature=0)

    def run_ours() -> None:
        for _ in generate_ids(ours, [prompt], params):
            pass

    ids = torch.tensor([prompt])
    with torch.no_grad():
        def run_ref() -> None:
            ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        ours_s = _timeit(run_ours, 1, 2 if quick else 3)
        ref_s = _timeit(run_ref, 1, 2 if quick else 3)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bw = copy_bandwidth()
    bound = bw / weight_bytes
    ours_tps, ref_tps = new / ours_s, new / ref_s
    return {"name": "decode gpt2-small batch 1", "new_tokens": new, "prompt_tokens": len(prompt),
            "llmkit_tokens_per_s": ours_tps, "reference": "transformers GPT2LMHeadModel.generate (KV cache)",
            "reference_tokens_per_s": ref_tps, "ratio": ours_tps / ref_tps,
            "weight_bytes": weight_bytes, "copy_bandwidth_GBps": bw / 1e9,
            "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": ours_tps / bound, "target_fraction": 0.8}


def bench(*, quick: bool = False, only: str | None = None, out: str = "benchmarks/results") -> dict[str, Any]:
    """Run the benchmarks, print tokens/s with the reference ratio, and write JSON under OUT.

    Args:
        quick: fewer steps (a smoke run; numbers are noisier).
        only: run just the benchmarks whose name contains this string (train, decode, onnx, serve, finetune).
        out: folder for the JSON results (one timestamped file plus latest.json).

    Examples:
        llmkit bench
        llmkit bench --quick true --only decode
    """
    threads = torch.get_num_threads()
    results: list[dict[str, Any]] = []
    suites: list[tuple[str, Callable[[bool], dict[str, Any]]]] = [("train", bench_training), ("decode", bench_decode)]
    for mod in PLUGINS:
        try:
            suites.append((mod.split(".")[1], importlib.import_module(mod).bench))
        except (ImportError, AttributeError):
            continue
    for name, fn in suites:
        if only and only not in name:
            continue
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            r = fn(quick)
        except Exception as e:  # one failing suite must not hide the others' numbers
            r = {"name": name, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print("   " + ", ".join(f"{k}={v:,.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
    report = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "threads": threads, "machine": platform.machine(), "processor": platform.processor(),
              "quick": quick, "results": results}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for path in (out_dir / f"bench-{stamp}.json", out_dir / "latest.json"):
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / f'bench-{stamp}.json'}")
    return report
