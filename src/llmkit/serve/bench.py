"""Serving benchmark: aggregate tokens/s with 1, 4 and 8 concurrent streaming clients, time to first token.

The server runs in its own process (as in production) on a tiny random-weight gpt2 checkpoint; clients
are asyncio tasks streaming chat completions back to back for a fixed time. Continuous batching should
make 8 clients together much faster than 1 (target: aggregate(8) >= 4 x aggregate(1)).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek",
           "Jesus wept", "Love is patient", "Let there be light", "Our Father in heaven"]


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random-weight gpt2-tiny checkpoint with a 512-token BPE tokenizer trained on Bible verses."""
    import itertools

    import torch

    from llmkit.checkpoint import save_checkpoint
    from llmkit.config import preset
    from llmkit.data.corpus import bible_verses
    from llmkit.model import build_model
    from llmkit.tokenizer import train_from_iterator

    tok = train_from_iterator(itertools.islice(bible_verses(), 3000), "bpe", vocab_size=512, show_progress=False)
    torch.manual_seed(seed)
    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size)
    return save_checkpoint(folder, build_model(cfg), cfg, tok)


def _reference_generate(ckpt: Path, seconds: float, max_tokens: int, threads: int) -> float:
    """Tokens/s of plain in-process `generate_text` (one prompt at a time, no HTTP): the single-stream baseline."""
    import torch

    from llmkit.checkpoint import load
    from llmkit.generate import SamplingParams, generate_text

    model, tok = load(ckpt)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or i == 0:
            out = generate_text(model, tok, [PROMPTS[i % len(PROMPTS)]], SamplingParams(max_tokens, temperature=0))
            n, i = n + len(out[0].ids), i + 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(url: str, end: float, max_tokens: int, k: int, ttfts: list[float], tokens: list[int]) -> None:
    import httpx

    i = k
    async with httpx.AsyncClient(timeout=60) as http:
        while time.perf_counter() < end:
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            i += 1
            t0 = time.perf_counter()
            first = None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():  # parse only what is measured: keep the client light
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - t0
                    elif '"usage": {' in line:
                        tokens.append(json.loads(line[6:])["usage"]["completion_tokens"])
            if first is not None:
                ttfts.append(first)


async def _level(url: str, n_clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(url, t0 + seconds, max_tokens, k, ttfts, tokens) for k in range(n_clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [ttfts[0]] * 19 if ttfts else [float("nan")] * 19
    return {"clients": n_clients, "requests": len(tokens), "tokens": sum(tokens), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1), "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1)
            if ttfts else None, "ttft_p95_ms": round(1000 * q[18], 1)}


def bench(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Aggregate streaming tokens/s with 1, 4 and 8 concurrent clients against `llmkit serve` (tiny model).

    Returns {"levels": [{clients, requests, tokens, seconds, tokens_per_s, ttft_p50_ms, ttft_p95_ms}, ...],
    "reference_generate_tokens_per_s": single-stream in-process `generate_text` in the same run,
    "speedup_8_vs_1": aggregate(8) / aggregate(1), "target": 4.0, "pass": bool}. The server uses `threads`
    torch threads (1 by default: stable numbers on a shared machine, and the batch is what is measured).
    """
    import httpx

    seconds = 4.0 if quick else 20.0
    max_tokens = 48
    with tempfile.TemporaryDirectory(prefix="llmkit-serve-bench-") as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "gpt2-tiny")
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        code = ("import sys; from llmkit.cli import main; sys.exit(main(['serve', sys.argv[1], '--port', sys.argv[2],"
                " '--max_batch', '8', '--threads', sys.argv[3]]))")
        proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(port), str(threads)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 60 s")
                time.sleep(0.2)
            asyncio.run(_level(url, 2, 1.0, 8))  # warm-up
            levels = [asyncio.run(_level(url, n, seconds, max_tokens)) for n in (1, 4, 8)]
            reference = round(_reference_generate(ckpt, min(seconds, 5.0), max_tokens, threads), 1)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    one, eight = levels[0]["tokens_per_s"], levels[-1]["tokens_per_s"]
    speedup = round(eight / one, 2) if one else float("nan")
    result = {"name": "serve", "model": "gpt2-tiny (random weights, 4 layers, d_model 128)", "max_tokens": max_tokens,
              "levels": levels, "speedup_8_vs_1": speedup, "target": 4.0, "pass": bool(speedup >= 4.0),
              "reference_generate_tokens_per_s": reference, "server_threads": threads}
    for lv in levels:
        print(f"serve  {lv['clients']} client(s): {lv['tokens_per_s']:8.1f} tok/s aggregate  "
              f"TTFT p50 {lv['ttft_p50_ms']} ms  p95 {lv['ttft_p95_ms']} ms  ({lv['requests']} requests)")
    print(f"serve  reference: in-process generate_text, one stream, no HTTP: {reference} tok/s")
    print(f"serve  aggregate(8) / aggregate(1) = {speedup} (target >= 4)")
    return result


if __name__ == "__main__":
    bench("--quick" in sys.argv)
