"""OpenAI-compatible HTTP server (FastAPI): completions, chat, embeddings, models, health, metrics, playground.

Generation goes through the continuous-batching `Engine` (serve/engine.py); `Server` (serve/server.py) turns
HTTP bodies into engine requests; each route lives in its own module (routes, completions, chat, embeddings)
and streams through the one SSE writer (serve/streaming.py). This module assembles the app and runs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.load import load
from llmkit.serve import chat, completions, embeddings, routes, tokenize
from llmkit.serve.errors import install_error_handlers
from llmkit.serve.schemas import LOGIT_BIAS_KEY, token_key_pattern
from llmkit.serve.server import Guard, Limits, Server
from llmkit.tokenizer import Tokenizer

ROUTERS = [routes.router, completions.router, chat.router, embeddings.router, tokenize.router]
__all__ = ["BackgroundServer", "Limits", "create_app", "serve"]


def create_app(checkpoint: str | Path | tuple[nn.Module, Tokenizer], *, api_key: str | None = None,
               max_batch: int = 8, limits: Limits | None = None, model_name: str | None = None,
               device: str = "cpu", max_context: int | None = 2048, stream_interval: float = 0.02,
               open_pages: bool = False, prefill_chunk: int | None = None) -> FastAPI:
    """Build the FastAPI app serving one checkpoint folder (or an in-memory (model, tokenizer) pair)."""
    if isinstance(checkpoint, tuple):
        model, tok = checkpoint
        name = model_name or "llmkit"
    else:
        model, tok = load(checkpoint, device)
        if tok is None:
            raise LlmkitError(f"{checkpoint} has no tokenizer.json; the server needs one to read text")
        name = model_name or Path(checkpoint).resolve().name
    if getattr(model.cfg, "arch", "") == "lstm":
        raise LlmkitError("the server runs Transformer checkpoints; the LSTM baseline has no KV cache to batch")
    if max_context is not None and max_context < 2:
        raise LlmkitError(f"max_context must be at least 2 tokens, got {max_context}")
    if stream_interval < 0:
        raise LlmkitError(f"stream_interval must be >= 0 seconds, got {stream_interval}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise LlmkitError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}; omit it to size chunks "
                          "by time")
    srv = Server(model, tok, name, max_batch, limits or Limits(), max_context, stream_interval, prefill_chunk)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if srv.engine is not None:
            srv.engine.start()
        yield
        if srv.engine is not None:  # after uvicorn's graceful drain: cancel leftovers, stop the loop
            await asyncio.to_thread(srv.engine.stop)

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for an llmkit checkpoint")
    app.state.server, app.state.api_key = srv, api_key
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(Guard, limits=srv.limits, metrics=srv.metrics, api_key=api_key, open_pages=open_pages)
    return app


def _bound(node: Any, vocab: int, max_tokens: int) -> None:
    """Write this server's real limits into the spec: token ids < vocab (logit_bias keys too), max_tokens <=
    the server's cap."""
    if isinstance(node, dict):
        if node.pop("x-token-id", None):
            node["maximum"] = vocab - 1
        keys = node.get("patternProperties")
        if isinstance(keys, dict) and LOGIT_BIAS_KEY in keys:  # logit_bias: the served token ids only
            keys[token_key_pattern(vocab)] = keys.pop(LOGIT_BIAS_KEY)
        for key in ("max_tokens", "max_completion_tokens"):
            prop = node.get("properties", {}).get(key) if isinstance(node.get("properties"), dict) else None
            for alt in (prop or {}).get("anyOf", [prop] if prop else []):
                if alt.get("type") == "integer":
                    alt["maximum"] = max_tokens
        for v in node.values():
            _bound(v, vocab, max_tokens)
    elif isinstance(node, list):
        for v in node:
            _bound(v, vocab, max_tokens)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's spec with the served model's limits and without FastAPI's default 422 (this server answers
    validation errors 400, as OpenAI does)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        srv = app.state.server
        _bound(spec, srv.model.cfg.vocab_size, srv.limits.max_tokens or srv.block_size)
        for ops in spec.get("paths", {}).values():  # the one model id this server answers (others: 404)
            for op in ops.values():
                for param in op.get("parameters", []):
                    if param.get("name") == "model_id":
                        param["schema"] = {**param["schema"], "enum": [srv.name], "example": srv.name}
        app.openapi_schema = spec
    return app.openapi_schema


# ----------------------------------------------------------------------------------------------- running it


class BackgroundServer:
    """Run an app with uvicorn in a background thread (tests, benchmarks): `with BackgroundServer(app) as s:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="llmkit-serve", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_concurrent: int = 64, max_tokens: int | None = None,
          max_prompt_tokens: int | None = None, max_body_bytes: int = 1_000_000, max_context: int | None = 2048,
          model_name: str | None = None,
          device: str = "cpu", threads: int | None = None, stream_interval: float = 0.02,
          graceful_timeout: float = 30.0, open_pages: bool = False, prefill_chunk: int | None = None) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat playground at `/`.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with SSE),
    POST /v1/embeddings, GET /health, GET /metrics (Prometheus). Requests share one continuously
    batched decode loop. SIGTERM/Ctrl-C stops accepting connections and lets running requests finish.

    Args:
        checkpoint: checkpoint folder (config.json + model.safetensors + tokenizer.json).
        host: interface to bind; the default 127.0.0.1 is reachable from this machine only.
        port: TCP port.
        api_key: require `Authorization: Bearer KEY` on /v1/*; defaults to $LLMKIT_API_KEY (none = open).
        max_batch: sequences decoded together in one batch (slots of the KV cache).
        max_concurrent: sequences queued or running at once; more are answered 429.
        max_tokens: most tokens one request may ask for (default: the model's context).
        max_prompt_tokens: longest prompt accepted (default: the model's context - 1).
        max_body_bytes: largest request body; larger bodies are answered 413.
        max_context: serve at most this many tokens of context per sequence (prompt + output), to bound the
            KV cache (max_batch x 1.5 x max_context positions); null = the model's full block_size.
        model_name: model id shown by /v1/models and expected in requests (default: the folder name).
        device: cpu or cuda.
        threads: CPU threads for torch (default: torch's choice; 1 is often best on a busy machine).
        stream_interval: seconds between writes to a stream (0 = after every token); tokens produced in
            between go out together, still one SSE event each. 0.02 s is smooth to read and saves CPU.
        graceful_timeout: seconds to let running requests finish after SIGTERM before cancelling them.
        open_pages: with an API key, still serve /metrics, /docs and /openapi.json without it.
        prefill_chunk: prompt tokens prefilled per chunk while other streams decode. Default: sized by time,
            so running streams' token gaps stay near 2.5x their usual gap; larger chunks give a long prompt its
            first token sooner at the cost of longer pauses for the others (docs/inference.md).

    Examples:
        llmkit serve runs/demo
        llmkit serve runs/demo --port 8080 --api_key secret --max_batch 16
        llmkit serve runs/smollm2-int8 --threads 2 --prefill_chunk 256
        LLMKIT_API_KEY=secret llmkit serve runs/sft --host 0.0.0.0
    """
    import torch
    import uvicorn

    if threads is not None:
        torch.set_num_threads(threads)
    api_key = api_key or os.environ.get("LLMKIT_API_KEY") or None
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                    max_concurrent=max_concurrent)
    app = create_app(checkpoint, api_key=api_key, max_batch=max_batch, limits=limits, model_name=model_name,
                     device=device, max_context=max_context, stream_interval=stream_interval, open_pages=open_pages,
                     prefill_chunk=prefill_chunk)
    name = app.state.server.name
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    print(f"serving {name!r} on http://{shown}:{port}  (playground: http://{shown}:{port}/ , "
          f"API: http://{shown}:{port}/v1 , auth: {'bearer key' if api_key else 'none'})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("warning: listening beyond this machine without --api_key; anyone who can reach it can use it",
              flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the previous handler: make that a clean exit
    def stopped(signum: int, _frame: object) -> None:
        print(f"llmkit serve: stopped ({signal.Signals(signum).name})", flush=True)
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopped)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout)

