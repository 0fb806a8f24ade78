"""The state behind one served model: limits, the body-size/metrics middleware, and `Server`, which validates
prompts and turns engine events into an async stream for the routes."""

from __future__ import annotations

import asyncio
import hmac
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.inference.constrained import Constraint, json_constraint
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scoring import Scored, batch_token_budget, chunk_by_tokens, score_tokens
from llmkit.serve.engine import Engine, GenRequest, TokenEvent, new_request
from llmkit.serve.errors import APIError, crash_response
from llmkit.serve.metrics import Metrics
from llmkit.serve.schemas import ChatCompletionRequest, CompletionRequest, token_key_pattern
from llmkit.tokenizer import Tokenizer


@dataclass
class Limits:
    """Per-server limits; each is answered with a clear 4xx rather than a crash."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the model's context - 1
    max_tokens: int | None = None  # most tokens one request may ask for; default: the model's context
    max_concurrent: int = 64  # sequences queued or running at once (n counts each choice)


PROTECTED_PAGES = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def key_ok(api_key: str | None, authorization: str) -> bool:
    """Whether an `Authorization` header carries the API key (constant-time; no key set = open)."""
    if api_key is None:
        return True
    given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    return hmac.compare_digest(given.encode(), api_key.encode())


class Guard:
    """ASGI middleware: a request id on every request and response (`x-request-id`, the client's own if it
    sends a sane one), the API key on /metrics and the API docs too (unless `open_pages`), the request-body
    size limit (413) and request counting for /metrics."""

    def __init__(self, app: Any, limits: Limits, metrics: Metrics, api_key: str | None = None,
                 open_pages: bool = False):
        self.app, self.limits, self.metrics = app, limits, metrics
        self.api_key, self.open_pages = api_key, open_pages

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {"code": 500, "started": False}
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if (self.api_key is not None and not self.open_pages and scope["path"] in PROTECTED_PAGES
                    and not key_ok(self.api_key, headers.get(b"authorization", b"").decode("latin-1"))):
                await APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY' (or start "
                                    "the server with --open_pages)", code="invalid_api_key"
                               ).response()(scope, receive, send_counted)
                return
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
        except Exception as e:
            if status["started"]:
                raise
            await crash_response(rid, scope["method"], scope["path"], e)(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("(unmatched)" if status["code"] == 404 else scope["path"])
            self.metrics.count_request(path, status["code"])


class Server:
    """Everything one served model needs: model, tokenizer, engine, limits, metrics."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, model_name: str, max_batch: int, limits: Limits,
                 max_context: int | None = None, stream_interval: float = 0.0, prefill_chunk: int | None = None):
        self.model, self.tok, self.name, self.limits = model, tokenizer, model_name, limits
        self.block_size = min(model.cfg.block_size, max_context or model.cfg.block_size)
        self.metrics = Metrics()
        self._token_key = re.compile(token_key_pattern(model.cfg.vocab_size))
        self.created = int(time.time())
        self.engine: Engine | None = None
        if model.cfg.arch == "decoder":
            self.engine = Engine(model, tokenizer, max_batch, on_step=self.metrics.on_step, max_context=max_context,
                                 prefill_chunk=prefill_chunk)
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
        return self.check_max_tokens(max_tokens)

    def check_max_tokens(self, max_tokens: int | None, param: str = "max_tokens") -> int:
        """400 when max_tokens is over the server's cap (the spec's maximum); the token budget otherwise."""
        cap = self.limits.max_tokens or self.block_size
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"{param} is {max_tokens} but this server allows at most {cap}; ask for fewer",
                           param=param, code="max_tokens_exceeded")
        return max_tokens if max_tokens is not None else cap

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(400, f"'{self.name}' is an {self.model.cfg.arch} model and cannot generate text; "
                                "use POST /v1/embeddings", code="model_cannot_generate")
        if not self.engine.alive:
            raise APIError(503, "the generation engine is not running", "server_error")
        return self.engine

    def check_request(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """400 for an output-changing field this server does not implement, or a logit_bias outside the vocab."""
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by this server and would change the output; remove it",
                           param=field, code="unsupported_field")
        V = self.model.cfg.vocab_size
        for key in body.logit_bias or {}:
            if not self._token_key.fullmatch(key):  # the spec's pattern: a decimal id in [0, V), no leading 0
                raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {V})", param="logit_bias")

    async def constraints(self, body: CompletionRequest | ChatCompletionRequest, n: int,
                          end_id: int | None = None, schema: dict[str, Any] | None = None,
                          force: bool = False) -> list[Constraint | None]:
        """One JSON constraint per sequence when response_format asks for JSON (or `force`, with `schema`)."""
        on, fmt_schema = body.json_mode()
        if not (on or force):
            return [None] * n
        use = schema if force else fmt_schema

        def build() -> list[Constraint | None]:  # the first use per tokenizer indexes its vocabulary (~1 s)
            return [json_constraint(self.tok, use, self.model.cfg.vocab_size, end_id) for _ in range(n)]

        try:
            return await asyncio.to_thread(build)
        except LlmkitError as e:
            raise APIError(400, str(e), param="tools" if force else "response_format") from None

    @contextmanager
    def admitted(self, n: int) -> Iterator[None]:
        """Count `n` sequences against --max_concurrent for the duration (429 when they do not fit)."""
        if self.in_flight + n > self.limits.max_concurrent:
            raise APIError(429, f"the server is at its limit of {self.limits.max_concurrent} concurrent "
                                "sequences; retry shortly", "rate_limit_exceeded", code="too_many_requests")
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n

    async def on_model(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` with the model: on the engine thread between decode steps (the model is not thread-safe),
        or under a lock for encoders."""
        if self.engine is not None:
            return await asyncio.to_thread(self.engine.call, fn)

        def locked() -> Any:
            with self.embed_lock:
                return fn()

        return await asyncio.to_thread(locked)

    async def in_batches(self, seqs: list[list[int]], fn: Callable[[list[list[int]]], list[Any]]) -> list[Any]:
        """fn over `seqs` in groups of bounded padded size, one model call each, so a big request (scoring,
        embeddings) lets decode steps of other requests run in between instead of starving them."""
        out: list[Any] = [None] * len(seqs)
        for group in chunk_by_tokens(seqs, batch_token_budget(self.model)):
            part = [seqs[i] for i in group]
            for i, r in zip(group, await self.on_model(lambda part=part: fn(part))):
                out[i] = r
        return out

    async def score(self, seqs: list[list[int]], top: int) -> list[Scored]:
        """Log-probabilities of every token of every sequence (echo + logprobs), batched."""
        self.require_engine()
        with self.admitted(len(seqs)):
            return await self.in_batches(seqs, lambda part: score_tokens(self.model, part, top, self.tok.pad_id,
                                                                          with_next=True))

    async def run(self, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None,
                  stop_ids: set[int], constraints: list[Constraint | None] | None = None
                  ) -> AsyncIterator[list[TokenEvent]]:
        """Submit one engine request per (prompt, params); yield their events (as the batches available
        at once) until all have finished."""
        engine = self.require_engine()
        n = len(prompts)
        with self.admitted(n):
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[TokenEvent] = asyncio.Queue()

            def sink(ev: TokenEvent) -> None:
                self._post(loop, events, ev)

            cons = constraints or [None] * n
            reqs: list[GenRequest] = [new_request(engine, ids, p, sink, i, logprobs, stop_ids, cons[i])
                                      for i, (ids, p) in enumerate(zip(prompts, params))]
            open_ = set(range(n))
            timed: set[int] = set()
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
                    failed = next((ev for ev in batch if ev.finish_reason == "error"), None)
                    if failed is None:
                        yield batch
                        continue
                    good = [ev for ev in batch if ev.finish_reason != "error"]
                    if good:  # what came before the error still goes out (a stream then ends in the error)
                        yield good
                    if failed.internal:  # the engine's exception as the cause: its traceback is logged
                        raise APIError(500, failed.error or "generation failed", "server_error") from failed.exc
                    raise APIError(400, failed.error or "generation failed")
            finally:
                for i in open_:  # client went away or an error: free the slots at the next token boundary
                    Engine.cancel(reqs[i])

    def token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)



def server_of(request: Request) -> Server:
    """The `Server` of the app handling `request` (a FastAPI dependency)."""
    return request.app.state.server


def sampling_params(body: CompletionRequest | ChatCompletionRequest, budget: int, stops: list[str],
              index: int) -> SamplingParams:
    seed = None if body.seed is None else body.seed + index  # n > 1: distinct but reproducible choices
    bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
    return SamplingParams(max_new_tokens=budget, temperature=body.temperature, top_k=body.top_k,
                          top_p=body.top_p if body.top_p < 1 else None,
                          repetition_penalty=body.repetition_penalty, stop=stops, seed=seed, logit_bias=bias,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          ignore_eos=body.ignore_eos)


def usage(prompts: list[list[int]], n_choices_per_prompt: int, generated: dict[int, int]) -> dict[str, int]:
    p = sum(len(x) for x in prompts) // max(n_choices_per_prompt, 1)
    c = sum(generated.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def stop_ids(tok: Tokenizer, stops: list[str]) -> set[int]:
    """Stop strings that are single special tokens (decoding skips specials, so match their ids)."""
    ids = {tok.tok.token_to_id(s) for s in stops}
    return {i for i in ids if i is not None}




async def check_api_key(request: Request) -> None:
    """With an API key set, require `Authorization: Bearer KEY` (constant-time comparison)."""
    if not key_ok(request.app.state.api_key, request.headers.get("authorization", "")):
        raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'",
                       param=None, code="invalid_api_key")
