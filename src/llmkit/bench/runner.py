"""`llmkit bench` / `make bench`: speed measured against a reference in the same run, printed and saved as JSON.

(a) training tokens/s of char-shakespeare vs the same shape built with transformers' GPT2LMHeadModel,
(b) batch-1 decode tokens/s of the gpt2-small shape with our KV cache vs transformers' generate, and as a
    fraction of the memory-bandwidth bound (fp32 weight bytes per token vs a measured copy bandwidth),
plus the benchmarks other areas register (ONNX Runtime, serving, fine-tuning) when present.
"""

from __future__ import annotations

import importlib
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_json

# each suite is a module with `bench(quick: bool) -> dict`; a suite whose optional dependency is missing is skipped
SUITES = {"train": "llmkit.bench.train", "decode": "llmkit.bench.decode", "onnx": "llmkit.bench.onnx",
          "serve": "llmkit.bench.serve", "engine": "llmkit.bench.engine", "finetune": "llmkit.bench.finetune",
          "constrained": "llmkit.bench.constrained"}



def bench(*, quick: bool = False, only: str | None = None, out: str = "benchmarks/results",
          threads: int | None = None) -> dict[str, Any]:
    """Run the benchmarks, print tokens/s with the reference ratio, and write JSON under OUT.

    Args:
        quick: fewer steps (a smoke run; numbers are noisier).
        only: run just the benchmarks whose name contains this string (train, decode, onnx, serve, engine,
            finetune, constrained).
        out: folder for the JSON results (one timestamped file plus latest.json).
        threads: torch (and llama-bench) threads; default torch's own choice. On a shared machine, 1 thread
            pinned with `taskset -c 0` keeps same-run ratios meaningful (OpenMP barriers stall under load).

    Examples:
        llmkit bench
        llmkit bench --quick true --only decode
        LLMKIT_LLAMA_BENCH=~/llama.cpp/build/bin/llama-bench taskset -c 0 llmkit bench --only decode --threads 1
    """
    if threads is not None:
        if threads < 1:
            raise LlmkitError(f"--threads {threads}: give at least 1")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    results: list[dict[str, Any]] = []
    suites: list[tuple[str, Callable[[bool], dict[str, Any]]]] = []
    for name, mod in SUITES.items():
        try:
            suites.append((name, importlib.import_module(mod).bench))
        except ImportError:
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
        atomic_write_json(path, report)
    print(f"wrote {out_dir / f'bench-{stamp}.json'}")
    return report
