"""POST /v1/chat/completions: messages rendered through the checkpoint's chat template, replies whole or
streamed."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from llmkit.inference.chat_template import chat_stop_strings, render_chat
from llmkit.serve.engine import TokenEvent
from llmkit.serve.schemas import ChatCompletionRequest
from llmkit.serve.server import Server, check_api_key, sampling_params, server_of, stop_ids, usage
from llmkit.serve.streaming import collect, first_or_error, sse_response

router = APIRouter()


def _logprob_items(srv: Server, evs: list[TokenEvent]) -> list[dict[str, Any]]:
    """Chat-style logprobs: one {token, logprob, bytes, top_logprobs} item per generated token."""
    out = []
    for ev in evs:
        for item in ev.logprobs:
            s = srv.token_str(item["token_id"])
            out.append({"token": s, "logprob": item["logprob"], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": srv.token_str(t), "logprob": v,
                                          "bytes": list(srv.token_str(t).encode())} for t, v in item["top"]]})
    return out


@router.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request,  # noqa: ANN201 (JSON or a stream)
                           srv: Server = Depends(server_of)):
    srv.check_model(body.model)
    tok = srv.tok
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    base = srv.prompt_ids(render_chat(tok, messages), "messages")
    budget = srv.check_lengths(base, body.max_completion_tokens or body.max_tokens, "messages")
    stops = list(dict.fromkeys(chat_stop_strings(tok) + body.stop_list()))
    prompts = base * body.n
    params = [sampling_params(body, budget, stops, i) for i in range(body.n)]
    top = (body.top_logprobs or 0) if body.logprobs else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    events = srv.run(prompts, params, top, stop_ids(tok, stops))

    if body.stream:
        first = await first_or_error(events)

        def choice_of(ev: TokenEvent) -> dict[str, Any] | None:
            if not ev.text and ev.finish_reason is None and not ev.logprobs:
                return None
            return {"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                    "logprobs": {"content": _logprob_items(srv, [ev])} if body.logprobs else None,
                    "finish_reason": ev.finish_reason}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            first, events, choice_of=choice_of,
            envelope=lambda choices: {"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": srv.name, "system_fingerprint": None, "choices": choices},
            usage_of=(lambda gen: usage(prompts, body.n, gen)) if include_usage else None,
            prelude=[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)])

    per = await collect(events, request, body.n)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in evs)},
                "logprobs": {"content": _logprob_items(srv, evs)} if body.logprobs else None,
                "finish_reason": evs[-1].finish_reason} for i, evs in per.items()]
    return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name,
            "system_fingerprint": None, "choices": choices,
            "usage": usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})}
