"""`make soak`: 16 clients for 60 s against a live server, mixing streaming chat, JSON-schema, forced tool
calls and embeddings, some disconnecting mid-stream. Checks: no 5xx, every completed greedy stream equals
the whole (non-streamed) answer to the same request (no lost or duplicated chunk), JSON and tool arguments
validate, memory stays flat (server RSS before/after), and the server still answers at the end.
Not part of `make test`.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from llmkit.bench.serve import PROMPTS, tiny_checkpoint
from llmkit.serve.app import BackgroundServer, Limits, create_app

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"book": {"enum": ["Genesis", "Exodus", "Psalms"]}}, "required": ["book"],
    "additionalProperties": False}}}]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chat(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0, **kw}


async def _stream_text(c: httpx.AsyncClient, body: dict[str, Any], stop_after: int | None) -> str | None:
    """The streamed content (None if we hung up on purpose); raises on a malformed stream."""
    parts, finishes, chunks = [], 0, 0
    async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code >= 500:
            raise RuntimeError(f"stream answered {r.status_code}")
        lines = r.aiter_lines()
        async for line in lines:
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                if finishes != 1:
                    raise RuntimeError(f"a stream had {finishes} finish_reason chunks")
                return "".join(parts)
            obj = json.loads(line[6:])
            if "error" in obj:  # the server failed after answering 200 (serve/streaming.py)
                raise RuntimeError(f"a stream ended in an error event: {obj['error']}")
            ch = obj["choices"][0]
            parts.append(ch["delta"].get("content") or "")
            finishes += ch["finish_reason"] is not None
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return None  # leaving the block closes the connection mid-stream
    raise RuntimeError("a stream ended without [DONE]")


async def _client(url: str, end: float, k: int, whole: dict[str, str], stats: dict[str, int]) -> None:
    rng = random.Random(k)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < end:
            kind, prompt = rng.choice(["stream", "stream", "json", "tool", "embed"]), rng.choice(PROMPTS)
            if kind == "stream":
                text = await _stream_text(c, chat(prompt), rng.choice([None, None, 2]))
                if text is None:
                    stats["disconnects"] += 1
                elif text != whole[prompt]:
                    raise RuntimeError(f"stream {text!r} != whole {whole[prompt]!r}")
            elif kind == "json":
                r = await c.post("/v1/chat/completions", json=chat(prompt, max_tokens=48, temperature=1.0,
                                 seed=rng.randrange(1000), response_format={"type": "json_schema", "json_schema": {
                                     "name": "p", "schema": SCHEMA}}))
                r.raise_for_status()
                if r.json()["choices"][0]["finish_reason"] == "stop":
                    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
            elif kind == "tool":
                r = await c.post("/v1/chat/completions", json=chat(prompt, tools=TOOLS, tool_choice="required",
                                                                   max_tokens=40))
                r.raise_for_status()
                call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
                jsonschema.validate(json.loads(call["arguments"]), TOOLS[0]["function"]["parameters"])
            else:
                r = await c.post("/v1/embeddings", json={"input": [prompt, prompt[::-1]]})
                r.raise_for_status()
            stats[kind] += 1


def soak(clients: int = 16, seconds: float = 60.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "tiny", block_size=1024)  # room for the tool instructions
        app = create_app(str(ckpt), max_batch=8, limits=Limits(max_concurrent=256))
        with BackgroundServer(app) as s:
            whole = {p: httpx.post(s.url + "/v1/chat/completions", json=chat(p), timeout=60).json()["choices"][0]
                     ["message"]["content"] for p in PROMPTS}
            before = rss_mb()
            stats = {"stream": 0, "json": 0, "tool": 0, "embed": 0, "disconnects": 0}

            async def main() -> None:
                end = time.monotonic() + seconds
                await asyncio.gather(*(_client(s.url, end, k, whole, stats) for k in range(clients)))

            asyncio.run(main())
            after = rss_mb()
            alive = httpx.get(s.url + "/health").json()["status"] == "ok"
            n_running = app.state.server.engine.n_running
    return {**stats, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "alive": alive,
            "slots_in_use_after": n_running}


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    print(json.dumps(soak(16, secs), indent=2))
