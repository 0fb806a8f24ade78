"""Server-sent events: the one SSE writer shared by completions and chat, and the helpers that turn the
engine's event stream into a whole response or a stream while watching for a client that goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmkit.serve.engine import TokenEvent
from llmkit.serve.errors import APIError, request_id, stream_error


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"



def sse_response(request: Request, first: list[TokenEvent] | None, events: AsyncIterator[list[TokenEvent]], *,
                 envelope: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 choice_of: Callable[[TokenEvent], dict[str, Any] | list[dict[str, Any]] | None],
                 usage_of: Callable[[dict[int, int]], dict[str, int]] | None,
                 prelude: Iterable[dict[str, Any]] = ()) -> StreamingResponse:
    """Stream engine events as OpenAI chunks: `prelude` choices first, then one chunk per event that
    `choice_of` turns into a choice (or several, one chunk each; None = nothing to send), all events of a
    decode step in one write, a usage chunk when `usage_of` is given (stream_options.include_usage), and
    `data: [DONE]`. An error once the 200 is out becomes an error event (`data: {"error": {..., "request_id"}}`,
    logged under the request id) before `[DONE]`: the client learns the answer is cut short, and why."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = envelope(choices)
        if usage_of is not None:
            obj["usage"] = usage
        return sse(obj)

    async def gen() -> AsyncIterator[str]:
        try:
            for c in prelude:
                yield chunk([c])
            generated: dict[int, int] = {}
            async for batch in chain(first, events):
                out = []
                for ev in batch:
                    generated[ev.index] = ev.n_generated
                    choice = choice_of(ev)
                    for c in [choice] if isinstance(choice, dict) else choice or []:
                        out.append(chunk([c]))
                if out:
                    yield "".join(out)
            if usage_of is not None:
                yield chunk([], usage_of(generated))
        except Exception as e:  # not a disconnect (CancelledError/GeneratorExit are BaseExceptions)
            yield sse(stream_error(request_id(request), request.method, request.url.path, e))
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def collect(events: AsyncIterator[list[TokenEvent]], request: Request, n: int) -> dict[int, list[TokenEvent]]:
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


async def first_or_error(events: AsyncIterator[list[TokenEvent]]) -> list[TokenEvent] | None:
    """Wait for the first event before answering 200, so errors (429, bad prompt) get a proper status."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def chain(first: list[TokenEvent] | None, rest: AsyncIterator[list[TokenEvent]]
                 ) -> AsyncIterator[list[TokenEvent]]:
    try:
        if first is not None:
            yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()  # a disconnected client cancels this generator: free the engine slots now

