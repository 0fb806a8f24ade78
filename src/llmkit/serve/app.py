"""OpenAI-compatible HTTP server (FastAPI): completions, chat, embeddings, models, health, metrics, playground.

Generation goes through the continuous-batching `Engine`; this module turns HTTP bodies into engine
requests and engine events into OpenAI response objects (whole or as server-sent events).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import signal
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import chat_stop_strings, render_chat
from llmkit.inference.embed import embed_texts, mean_pool_embeddings
from llmkit.inference.sampling import SamplingParams
from llmkit.models.load import load
from llmkit.serve.engine import Engine, GenRequest, TokenEvent, new_request
from llmkit.serve.metrics import Metrics
from llmkit.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llmkit.tokenizer import Tokenizer


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Limits:
    """Per-server limits; each is answered with a clear 4xx rather than a crash."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the model's context - 1
    max_tokens: int | None = None  # most tokens one request may ask for; default: the model's context
    max_concurrent: int = 64  # sequences queued or running at once (n counts each choice)


class Guard:
    """ASGI middleware: request-body size limit (413) and request counting for /metrics."""

    def __init__(self, app: Any, limits: Limits, metrics: Metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                limit = self.limits.max_body_bytes
                declared = dict(scope["headers"]).get(b"content-length")
                too_big = declared is not None and declared.isdigit() and int(declared) > limit
                chunks: list[bytes] = []
                size, more = 0, not too_big
                while more:  # read the whole body up front (bounded), then replay it to the app
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        too_big = True
                        break
                if too_big:
                    err = APIError(413, f"request body is larger than the server's limit of {limit} bytes; "
                                        "send a shorter prompt or raise --max_body_bytes", code="body_too_large")
                    await err.response()(scope, receive, send_counted)
                    return
                body, replayed = b"".join(chunks), False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("(unmatched)" if status["code"] == 404 else scope["path"])
            self.metrics.count_request(path, status["code"])


class Server:
    """Everything one served model needs: model, tokenizer, engine, limits, metrics."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, model_name: str, max_batch: int, limits: Limits,
                 max_context: int | None = None, stream_interval: float = 0.0):
        self.model, self.tok, self.name, self.limits = model, tokenizer, model_name, limits
        self.block_size = min(model.cfg.block_size, max_context or model.cfg.block_size)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.engine: Engine | None = None
        if model.cfg.arch == "decoder":
            self.engine = Engine(model, tokenizer, max_batch, on_step=self.metrics.on_step, max_context=max_context)
        self.in_flight = 0  # sequences submitted and not finished (event-loop thread only)
        self.embed_lock = threading.Lock()
        # engine thread -> event loop: the events of one decode step (or of several, within stream_interval)
        # are handed over with one wake-up, and each stream writes what it got in one chunk; this bounds the
        # per-token cost of HTTP when many streams run at once
        self._outbox: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        self._outbox_lock = threading.Lock()
        self._wake_pending = False
        self.stream_interval = stream_interval
        self._last_delivery = 0.0

    def _post(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[TokenEvent], ev: TokenEvent) -> None:
        with self._outbox_lock:
            self._outbox.append((q, ev))
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            delay = self._last_delivery + self.stream_interval - time.monotonic()
            if delay > 0:
                loop.call_soon_threadsafe(loop.call_later, delay, self._deliver)
            else:
                loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._last_delivery = time.monotonic()
        with self._outbox_lock:
            items, self._outbox, self._wake_pending = self._outbox, [], False
        for q, ev in items:
            q.put_nowait(ev)

    # -- helpers ------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def prompt_ids(self, prompt: Any, param: str = "prompt") -> list[list[int]]:
        """Tokenize a prompt given as text, texts, token ids or lists of token ids."""
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, f"{param} is empty; give a text or a list of texts", param=param)
        out = []
        V = self.model.cfg.vocab_size
        for p in prompts:
            ids = self.tok.encode(p) if isinstance(p, str) else list(p)
            if any(not 0 <= t < V for t in ids):
                raise APIError(400, f"{param} holds token ids outside the vocabulary [0, {V})", param=param)
            if not ids and self.tok.bos_id is not None:
                ids = [self.tok.bos_id]  # an empty prompt starts from the beginning-of-text token
            out.append(ids)
        return out

    def check_lengths(self, prompts: list[list[int]], max_tokens: int | None, param: str = "prompt") -> int:
        """Validate prompt lengths and max_tokens against the limits; return the token budget per sequence."""
        limit = min(self.limits.max_prompt_tokens or self.block_size - 1, self.block_size - 1)
        for ids in prompts:
            if not ids:
                raise APIError(400, f"{param} is empty; give at least one token of text", param=param)
            if len(ids) > limit:
                raise APIError(400, f"This model's maximum prompt length is {limit} tokens, but the {param} has "
                                    f"{len(ids)} tokens; shorten it", param=param, code="context_length_exceeded")
        cap = self.limits.max_tokens or self.block_size
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {cap}; ask for fewer",
                           param="max_tokens", code="max_tokens_exceeded")
        return max_tokens if max_tokens is not None else cap

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(400, f"'{self.name}' is an {self.model.cfg.arch} model and cannot generate text; "
                                "use POST /v1/embeddings", code="model_cannot_generate")
        if not self.engine.alive:
            raise APIError(503, "the generation engine is not running", "server_error")
        return self.engine

    async def run(self, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None,
                  stop_ids: set[int]) -> AsyncIterator[list[TokenEvent]]:
        """Submit one engine request per (prompt, params); yield their events (as the batches available
        at once) until all have finished."""
        engine = self.require_engine()
        n = len(prompts)
        if self.in_flight + n > self.limits.max_concurrent:
            raise APIError(429, f"the server is at its limit of {self.limits.max_concurrent} concurrent "
                                "sequences; retry shortly", "rate_limit_exceeded", code="too_many_requests")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(ev: TokenEvent) -> None:
            self._post(loop, events, ev)

        reqs: list[GenRequest] = [new_request(engine, ids, p, sink, i, logprobs, stop_ids)
                                  for i, (ids, p) in enumerate(zip(prompts, params))]
        open_ = set(range(n))
        timed: set[int] = set()
        self.in_flight += n
        self.metrics.count_tokens(prompt=sum(len(p) for p in prompts))
        try:
            for r in reqs:
                engine.submit(r)
            while open_:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                for ev in batch:
                    r = reqs[ev.index]
                    if r.t_first is not None and ev.index not in timed:
                        timed.add(ev.index)
                        self.metrics.observe_ttft(r.t_first - r.t_submit)
                    self.metrics.count_tokens(generated=len(ev.token_ids))
                    if ev.finish_reason is not None:
                        open_.discard(ev.index)
                        if ev.finish_reason == "error":
                            if ev.internal:
                                raise APIError(500, ev.error or "generation failed", "server_error")
                            raise APIError(400, ev.error or "generation failed")
                yield batch
        finally:
            for i in open_:  # client went away or an error: free the slots at the next token boundary
                Engine.cancel(reqs[i])
            self.in_flight -= n

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)


def _sampling(body: CompletionRequest | ChatCompletionRequest, budget: int, stops: list[str],
              index: int) -> SamplingParams:
    seed = None if body.seed is None else body.seed + index  # n > 1: distinct but reproducible choices
    return SamplingParams(max_new_tokens=budget, temperature=body.temperature, top_k=body.top_k,
                          top_p=body.top_p if body.top_p < 1 else None,
                          repetition_penalty=body.repetition_penalty, stop=stops, seed=seed)


def _usage(prompts: list[list[int]], n_choices_per_prompt: int, generated: dict[int, int]) -> dict[str, int]:
    p = sum(len(x) for x in prompts) // max(n_choices_per_prompt, 1)
    c = sum(generated.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stop_ids(tok: Tokenizer, stops: list[str]) -> set[int]:
    """Stop strings that are single special tokens (decoding skips specials, so match their ids)."""
    ids = {tok.tok.token_to_id(s) for s in stops}
    return {i for i in ids if i is not None}


# ----------------------------------------------------------------------------------------------- the app


def create_app(checkpoint: str | Path | tuple[nn.Module, Tokenizer], *, api_key: str | None = None,
               max_batch: int = 8, limits: Limits | None = None, model_name: str | None = None,
               device: str = "cpu", max_context: int | None = 2048, stream_interval: float = 0.02) -> FastAPI:
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
    srv = Server(model, tok, name, max_batch, limits or Limits(), max_context, stream_interval)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if srv.engine is not None:
            srv.engine.start()
        yield
        if srv.engine is not None:  # after uvicorn's graceful drain: cancel leftovers, stop the loop
            await asyncio.to_thread(srv.engine.stop)

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for an llmkit checkpoint")
    app.state.server = srv

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'",
                           param=None, code="invalid_api_key")

    # -- errors in OpenAI's shape -------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                            code="invalid_json").response()
        param = ".".join(loc) or None
        msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
        return APIError(400, msg, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(LlmkitError)
    async def _llmkit(_r: Request, e: LlmkitError) -> JSONResponse:
        return APIError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def _crash(_r: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}", "server_error").response()

    # -- plain endpoints ----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("llmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = srv.engine is None or srv.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": srv.name},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        e = srv.engine
        text = srv.metrics.render(e.n_waiting if e else 0, e.n_running if e else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "llmkit",
                "max_model_len": srv.block_size, "arch": model.cfg.arch}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def get_model(model_id: str) -> dict[str, Any]:
        srv.check_model(model_id)
        return model_card()

    # -- completions --------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):  # noqa: ANN201 (JSON or a stream)
        srv.check_model(body.model)
        base = srv.prompt_ids(body.prompt)
        budget = srv.check_lengths(base, body.max_tokens)
        stops = body.stop_list()
        prompts = [ids for ids in base for _ in range(body.n)]
        params = [_sampling(body, budget, stops, i % body.n) for i in range(len(prompts))]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = srv.run(prompts, params, body.logprobs, _stop_ids(tok, stops))
        echo = [tok.decode(ids) if body.echo else "" for ids in prompts]

        def lp_obj(evs: list[TokenEvent], offset: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            toks, lps, tops, offs = [], [], [], []
            for ev in evs:
                for item in ev.logprobs:
                    s = srv.token_str(item["token_id"])
                    toks.append(s)
                    lps.append(item["logprob"])
                    tops.append({srv.token_str(t): v for t, v in item["top"]})
                    offs.append(offset)
                    offset += len(s)
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        if body.stream:
            first = await _first_or_error(events)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def gen() -> AsyncIterator[str]:
                generated: dict[int, int] = {}
                offsets = [len(e) for e in echo]
                started: set[int] = set()
                async for batch in _chain(first, events):
                    out = []
                    for ev in batch:
                        generated[ev.index] = ev.n_generated
                        text = ev.text
                        if ev.index not in started:
                            started.add(ev.index)
                            text = echo[ev.index] + text
                        if not text and not ev.logprobs and ev.finish_reason is None:
                            continue
                        choice = {"index": ev.index, "text": text, "logprobs": lp_obj([ev], offsets[ev.index]),
                                  "finish_reason": ev.finish_reason}
                        offsets[ev.index] += len(ev.text)
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                                 "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        out.append(_sse(chunk))
                    if out:
                        yield "".join(out)
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                                "choices": [], "usage": _usage(prompts, body.n, generated)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        per = await _collect(events, request, len(prompts))
        choices = []
        for i, evs in per.items():
            choices.append({"index": i, "text": echo[i] + "".join(e.text for e in evs),
                            "logprobs": lp_obj(evs, len(echo[i])), "finish_reason": evs[-1].finish_reason})
        usage = _usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                "choices": choices, "usage": usage}

    # -- chat completions ---------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):  # noqa: ANN201 (JSON or a stream)
        srv.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        text = render_chat(tok, messages)
        base = srv.prompt_ids(text, "messages")
        budget = srv.check_lengths(base, body.max_completion_tokens or body.max_tokens, "messages")
        stops = list(dict.fromkeys(chat_stop_strings(tok) + body.stop_list()))
        prompts = base * body.n
        params = [_sampling(body, budget, stops, i) for i in range(body.n)]
        top = (body.top_logprobs or 0) if body.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = srv.run(prompts, params, top, _stop_ids(tok, stops))

        def lp_items(evs: list[TokenEvent]) -> list[dict[str, Any]]:
            out = []
            for ev in evs:
                for item in ev.logprobs:
                    s = srv.token_str(item["token_id"])
                    out.append({"token": s, "logprob": item["logprob"], "bytes": list(s.encode()),
                                "top_logprobs": [{"token": srv.token_str(t), "logprob": v,
                                                  "bytes": list(srv.token_str(t).encode())} for t, v in item["top"]]})
            return out

        if body.stream:
            first = await _first_or_error(events)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
                obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                       "model": srv.name, "system_fingerprint": None, "choices": choices}
                if include_usage:
                    obj["usage"] = usage
                return _sse(obj)

            async def gen() -> AsyncIterator[str]:
                for i in range(body.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                generated: dict[int, int] = {}
                async for batch in _chain(first, events):
                    out = []
                    for ev in batch:
                        generated[ev.index] = ev.n_generated
                        if not ev.text and ev.finish_reason is None and not ev.logprobs:
                            continue
                        delta = {"content": ev.text} if ev.text else {}
                        lp = {"content": lp_items([ev])} if body.logprobs else None
                        out.append(chunk([{"index": ev.index, "delta": delta, "logprobs": lp,
                                           "finish_reason": ev.finish_reason}]))
                    if out:
                        yield "".join(out)
                if include_usage:
                    yield chunk([], _usage(prompts, body.n, generated))
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        per = await _collect(events, request, body.n)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in evs)},
                    "logprobs": {"content": lp_items(evs)} if body.logprobs else None,
                    "finish_reason": evs[-1].finish_reason} for i, evs in per.items()]
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name,
                "system_fingerprint": None, "choices": choices,
                "usage": _usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})}

    # -- embeddings ---------------------------------------------------------------------------------------
    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        srv.check_model(body.model)
        texts: list[str] | None = None
        if isinstance(body.input, str) or (body.input and isinstance(body.input[0], str)):
            texts = [body.input] if isinstance(body.input, str) else list(body.input)
            ids = [tok.encode(t, add_special_tokens=True) for t in texts]
        else:
            ids = srv.prompt_ids(body.input, "input")
        limit = srv.block_size
        for x in ids:
            if not x:
                raise APIError(400, "input holds an empty text; give at least one token", param="input")
            if len(x) > limit:
                raise APIError(400, f"an input has {len(x)} tokens but the model's context is {limit}; shorten it",
                               param="input", code="context_length_exceeded")
        if len(ids) > 2048:
            raise APIError(400, "at most 2048 inputs per request", param="input")

        def compute() -> list[list[float]]:
            if texts is not None:  # the same vectors as `llmkit embed` / `llmkit search`

                return embed_texts(model, tok, texts).tolist()
            return mean_pool_embeddings(model, tok, ids)  # token-id input

        if srv.engine is not None:
            vecs = await asyncio.to_thread(srv.engine.call, compute)
        else:
            def locked() -> list[list[float]]:
                with srv.embed_lock:
                    return compute()
            vecs = await asyncio.to_thread(locked)
        if body.dimensions is not None:
            vecs = [v[: body.dimensions] for v in vecs]
        n_tok = sum(len(x) for x in ids)
        srv.metrics.count_tokens(prompt=n_tok)
        data = []
        for i, v in enumerate(vecs):
            emb: Any = v
            if body.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": srv.name,
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    app.add_middleware(Guard, limits=srv.limits, metrics=srv.metrics)
    return app


async def _collect(events: AsyncIterator[list[TokenEvent]], request: Request, n: int) -> dict[int, list[TokenEvent]]:
    """All events of a non-streaming request, per choice; a client that disconnects cancels its sequences."""
    per: dict[int, list[TokenEvent]] = {i: [] for i in range(n)}

    async def consume() -> None:
        async for batch in events:
            for ev in batch:
                per[ev.index].append(ev)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # re-raise an APIError from the engine
            return per
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    finally:
        watch.cancel()
        if not work.done():  # cancelling the consumer closes `events`, whose finally frees the engine slots
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


async def _first_or_error(events: AsyncIterator[list[TokenEvent]]) -> list[TokenEvent] | None:
    """Wait for the first event before answering 200, so errors (429, bad prompt) get a proper status."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: list[TokenEvent] | None, rest: AsyncIterator[list[TokenEvent]]
                 ) -> AsyncIterator[list[TokenEvent]]:
    try:
        if first is not None:
            yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()  # a disconnected client cancels this generator: free the engine slots now


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
          graceful_timeout: float = 30.0) -> None:
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

    Examples:
        llmkit serve runs/demo
        llmkit serve runs/demo --port 8080 --api_key secret --max_batch 16
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
                     device=device, max_context=max_context, stream_interval=stream_interval)
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
