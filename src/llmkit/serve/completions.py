"""POST /v1/completions: text (or token-id) prompts in, completions out, whole or streamed."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from llmkit.serve.engine import TokenEvent
from llmkit.serve.schemas import CompletionRequest
from llmkit.serve.server import Server, check_api_key, sampling_params, server_of, stop_ids, usage
from llmkit.serve.streaming import collect, first_or_error, sse_response

router = APIRouter()


def _logprobs(srv: Server, evs: list[TokenEvent], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the tokens of `evs`, text offsets counted from `offset`."""
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


@router.post("/v1/completions", dependencies=[Depends(check_api_key)])
async def completions(body: CompletionRequest, request: Request,  # noqa: ANN201 (JSON or a stream)
                      srv: Server = Depends(server_of)):
    srv.check_model(body.model)
    base = srv.prompt_ids(body.prompt)
    budget = srv.check_lengths(base, body.max_tokens)
    stops = body.stop_list()
    prompts = [ids for ids in base for _ in range(body.n)]
    params = [sampling_params(body, budget, stops, i % body.n) for i in range(len(prompts))]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    events = srv.run(prompts, params, body.logprobs, stop_ids(srv.tok, stops))
    echo = [srv.tok.decode(ids) if body.echo else "" for ids in prompts]

    def lp_obj(evs: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        return None if body.logprobs is None else _logprobs(srv, evs, offset)

    if body.stream:
        first = await first_or_error(events)
        offsets = [len(e) for e in echo]
        started: set[int] = set()

        def choice_of(ev: TokenEvent) -> dict[str, Any] | None:
            text = ev.text
            if ev.index not in started:
                started.add(ev.index)
                text = echo[ev.index] + text
            if not text and not ev.logprobs and ev.finish_reason is None:
                return None
            choice = {"index": ev.index, "text": text, "logprobs": lp_obj([ev], offsets[ev.index]),
                      "finish_reason": ev.finish_reason}
            offsets[ev.index] += len(ev.text)
            return choice

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(first, events, choice_of=choice_of,
                            envelope=lambda choices: {"id": rid, "object": "text_completion", "created": created,
                                                      "model": srv.name, "choices": choices},
                            usage_of=(lambda gen: usage(prompts, body.n, gen)) if include_usage else None)

    per = await collect(events, request, len(prompts))
    choices = []
    for i, evs in per.items():
        choices.append({"index": i, "text": echo[i] + "".join(e.text for e in evs),
                        "logprobs": lp_obj(evs, len(echo[i])), "finish_reason": evs[-1].finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
            "choices": choices, "usage": usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})}
