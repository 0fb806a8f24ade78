"""Serving benchmark: aggregate tokens/s with 1, 4 and 8 concurrent streaming clients, time to first token.

The server runs in its own process (as in production) on a tiny random-weight gpt2 checkpoint; clients
are asyncio tasks streaming chat completions back to back for a fixed time. Continuous batching should
make 8 clients together much faster than 1 (target: aggregate(8) >= 4 x aggregate(1)).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmkit.data.corpus import bible_verses
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models.build import build_model
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import preset
from llmkit.models.load import load
from llmkit.tokenizer import train_from_iterator

LEVELS = (1, 4, 8)
PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the meek",
           "Jesus wept", "Love is patient", "Let there be light", "Our Father in heaven"]


def tiny_checkpoint(folder: Path, seed: int = 0, block_size: int = 128) -> Path:
    """A random-weight gpt2-tiny checkpoint with a 512-token BPE tokenizer trained on Bible verses."""
    import itertools

    import torch

    tok = train_from_iterator(itertools.islice(bible_verses(), 3000), "bpe", vocab_size=512, show_progress=False)
    torch.manual_seed(seed)
    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size, block_size=block_size)
    return save_checkpoint(folder, build_model(cfg), cfg, tok)


def _reference_generate(ckpt: Path, seconds: float, max_tokens: int, threads: int) -> tuple[int, float]:
    """(tokens, seconds) of plain in-process `generate_text`, one prompt at a time, no HTTP: the single-stream
    baseline."""
    import torch

    model, tok = load(ckpt)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or i == 0:
            out = generate_text(model, tok, [PROMPTS[i % len(PROMPTS)]], SamplingParams(max_tokens, temperature=0))
            n, i = n + len(out[0].ids), i + 1
        return n, time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONTENT = re.compile(rb'"content": "[^"]')  # a chunk that carries text
_USAGE = re.compile(rb'"completion_tokens": (\d+)')


async def _client(port: int, end: float, max_tokens: int, k: int, ttfts: list[float], tokens: list[int]) -> None:
    """One streaming client on a keep-alive connection. A minimal HTTP/1.1 reader (no parsing library) keeps
    the client's CPU small, since on a small machine the client competes with the server it measures."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = k
    try:
        while time.perf_counter() < end:
            body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                               "max_tokens": max_tokens, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}}).encode()
            i += 1
            t0 = time.perf_counter()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"server answered {head.splitlines()[0].decode()}")
            buf, first, seen = b"", None, 0
            while not buf.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked response
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError("the server closed the connection")
                buf += data
                if first is None and _CONTENT.search(buf, max(seen - 16, 0)):
                    first = time.perf_counter() - t0
                seen = len(buf)
            usage = _USAGE.findall(buf)
            if not usage or b"data: [DONE]" not in buf:
                raise RuntimeError("a stream ended without usage or [DONE]")
            tokens.append(int(usage[-1]))
            if first is not None:
                ttfts.append(first)
    finally:
        writer.close()


async def _window(url: str, n_clients: int, seconds: float, max_tokens: int) -> tuple[list[float], list[int], float]:
    """Run `n_clients` streaming clients for `seconds`; (TTFTs, completion tokens per request, wall seconds)."""
    ttfts: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    port = int(url.rsplit(":", 1)[1])
    await asyncio.gather(*(_client(port, t0 + seconds, max_tokens, k, ttfts, tokens) for k in range(n_clients)))
    return ttfts, tokens, time.perf_counter() - t0


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _summary(n: int, ttfts: list[float], tokens: list[int], wall: float, cpu: float | None) -> dict[str, Any]:
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else (ttfts * 19 if ttfts else [float("nan")] * 19)
    return {"clients": n, "requests": len(tokens), "tokens": sum(tokens), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
            "ttft_p95_ms": round(1000 * q[18], 1),
            "server_cpu_ms_per_token": round(1000 * cpu / sum(tokens), 3) if cpu is not None and tokens else None}


def bench(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Aggregate streaming tokens/s with 1, 4 and 8 concurrent clients against `llmkit serve` (tiny model).

    Returns {"levels": [{clients, requests, tokens, seconds, tokens_per_s, ttft_p50_ms, ttft_p95_ms,
    server_cpu_ms_per_token}, ...], "server_cpu_per_token_1_vs_8" (batching efficiency, robust to load),
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
            asyncio.run(_window(url, 2, 1.0, 8))  # warm-up
            # levels are interleaved in short windows so that load drifting on a shared machine hits all alike
            rounds = 1 if quick else 4
            acc: dict[int, dict[str, Any]] = {n: {"ttft": [], "tokens": [], "wall": 0.0, "cpu": 0.0} for n in LEVELS}
            ref_tokens, ref_wall = 0, 0.0
            for _ in range(rounds):
                for n in LEVELS:
                    c0 = _cpu_seconds(proc.pid)
                    ttfts, tokens, wall = asyncio.run(_window(url, n, seconds / rounds, max_tokens))
                    c1 = _cpu_seconds(proc.pid)
                    a = acc[n]
                    a["ttft"] += ttfts
                    a["tokens"] += tokens
                    a["wall"] += wall
                    a["cpu"] = None if c0 is None or c1 is None or a["cpu"] is None else a["cpu"] + c1 - c0
                n_tok, wall = _reference_generate(ckpt, seconds / rounds / 4, max_tokens, threads)
                ref_tokens, ref_wall = ref_tokens + n_tok, ref_wall + wall
            levels = [_summary(n, a["ttft"], a["tokens"], a["wall"], a["cpu"]) for n, a in acc.items()]
            reference = round(ref_tokens / ref_wall, 1)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    one, eight = levels[0], levels[-1]
    speedup = round(eight["tokens_per_s"] / one["tokens_per_s"], 2) if one["tokens_per_s"] else float("nan")
    cpu1, cpu8 = one["server_cpu_ms_per_token"], eight["server_cpu_ms_per_token"]
    result = {"name": "serve", "model": "gpt2-tiny (random weights, 4 layers, d_model 128)", "max_tokens": max_tokens,
              "levels": levels, "speedup_8_vs_1": speedup, "target": 4.0, "pass": bool(speedup >= 4.0),
              "server_cpu_per_token_1_vs_8": round(cpu1 / cpu8, 2) if cpu1 and cpu8 else None,
              "reference_generate_tokens_per_s": reference, "server_threads": threads,
              "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    for lv in levels:
        print(f"serve  {lv['clients']} client(s): {lv['tokens_per_s']:8.1f} tok/s aggregate  "
              f"TTFT p50 {lv['ttft_p50_ms']} ms  p95 {lv['ttft_p95_ms']} ms  ({lv['requests']} requests, "
              f"server CPU {lv['server_cpu_ms_per_token']} ms/token)")
    print(f"serve  reference: in-process generate_text, one stream, no HTTP: {reference} tok/s")
    print(f"serve  aggregate(8) / aggregate(1) = {speedup} (target >= 4); server CPU per token "
          f"1 client / 8 clients = {result['server_cpu_per_token_1_vs_8']}; load average {result['load_average']}")
    return result


if __name__ == "__main__":
    bench("--quick" in sys.argv)
