"""POST /v1/completions: text (or token-id) prompts in, completions out, whole or streamed.

`echo` + `logprobs` also scores the prompt tokens (the first one `null`, as OpenAI's legacy API does), and
`max_tokens: 0` scores without generating: what lm-evaluation-harness's `local-completions` sends for
log-likelihoods. Many prompts in one request are scored in batched forwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from llmkit.inference.scoring import Scored
from llmkit.serve.engine import TokenEvent
from llmkit.serve.schemas import ERROR_RESPONSES, STREAM_OR_JSON, CompletionRequest
from llmkit.serve.server import Server, check_api_key, sampling_params, server_of, stop_ids, usage
from llmkit.serve.streaming import collect, first_or_error, sse_response

router = APIRouter(responses=ERROR_RESPONSES)


def _logprobs(srv: Server, evs: list[TokenEvent], offset: int, prompt: tuple[list[int], Scored] | None = None
              ) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the prompt (when echoed and scored) and the tokens of `evs`, text
    offsets counted from `offset`."""
    toks: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offs: list[int] = []

    def add(token_id: int, lp: float | None, top: list[tuple[int, float]] | None) -> None:
        nonlocal offset
        s = srv.token_str(token_id)
        toks.append(s)
        lps.append(lp)
        tops.append(None if top is None else {srv.token_str(t): v for t, v in top})
        offs.append(offset)
        offset += len(s)

    if prompt is not None:
        ids, sc = prompt
        offset = 0
        add(ids[0], None, None)
        for j, t in enumerate(ids[1:]):
            add(t, sc.logprobs[j], sc.top[j] if sc.top else [])
    for ev in evs:
        for item in ev.logprobs:
            add(item["token_id"], item["logprob"], item["top"])
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


async def _ready(events: list[TokenEvent]) -> AsyncIterator[list[TokenEvent]]:
    yield events


def _from_scores(srv: Server, scored: list[Scored], budget: int, want_lp: bool) -> list[TokenEvent]:
    """The whole answer without the engine: nothing to generate (max_tokens 0), or the one greedy token the
    scoring forward already gives (max_tokens 1, temperature 0: lm-eval's log-likelihood requests)."""
    out = []
    for i, sc in enumerate(scored):
        if budget == 0:
            out.append(TokenEvent(i, "", [], [], "length", 0))
            continue
        t, lp = sc.next_greedy
        if t == srv.tok.eos_id:
            out.append(TokenEvent(i, "", [], [], "stop", 1))
            continue
        items = [{"token_id": t, "logprob": lp, "top": sc.next_top}] if want_lp else []
        out.append(TokenEvent(i, srv.tok.decode([t]), [t], items, "length", 1))
    return out


@router.post("/v1/completions", dependencies=[Depends(check_api_key)], responses=STREAM_OR_JSON)
async def completions(body: CompletionRequest, request: Request,  # noqa: ANN201 (JSON or a stream)
                      srv: Server = Depends(server_of)):
    srv.check_model(body.model)
    srv.check_request(body)
    base = srv.prompt_ids(body.prompt)
    budget = srv.check_lengths(base, body.max_tokens)
    stops = body.stop_list()
    prompts = [ids for ids in base for _ in range(body.n)]
    params = [sampling_params(body, budget, stops, i % body.n) for i in range(len(prompts))]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    scored: list[Scored] | None = None
    if body.echo and body.logprobs is not None:
        scored = [s for s in await srv.score(base, body.logprobs) for _ in range(body.n)]
    json_on, _ = body.json_mode()
    one_greedy = budget == 1 and params[0].plain_greedy and not stops and not json_on
    if budget == 0 or (scored is not None and one_greedy):
        srv.require_engine()
        if scored is None:
            scored = [Scored([], [])] * len(prompts)
        srv.metrics.count_tokens(prompt=sum(len(p) for p in prompts))
        events: AsyncIterator[list[TokenEvent]] = _ready(_from_scores(srv, scored, budget, body.logprobs is not None))
    else:
        cons = await srv.constraints(body, len(prompts))
        events = srv.run(prompts, params, body.logprobs, stop_ids(srv.tok, stops), cons)
    echo = [srv.tok.decode(ids) if body.echo else "" for ids in prompts]

    def lp_obj(i: int, evs: list[TokenEvent], offset: int, first: bool) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        return _logprobs(srv, evs, offset, (prompts[i], scored[i]) if first and scored is not None else None)

    if body.stream:
        first = await first_or_error(events)
        offsets = [len(e) for e in echo]
        started: set[int] = set()

        def choice_of(ev: TokenEvent) -> dict[str, Any] | None:
            text, opening = ev.text, ev.index not in started
            if opening:
                started.add(ev.index)
                text = echo[ev.index] + text
            if not text and not ev.logprobs and ev.finish_reason is None:
                return None
            choice = {"index": ev.index, "text": text, "logprobs": lp_obj(ev.index, [ev], offsets[ev.index], opening),
                      "finish_reason": ev.finish_reason}
            offsets[ev.index] += len(ev.text)
            return choice

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(request, first, events, choice_of=choice_of,
                            envelope=lambda choices: {"id": rid, "object": "text_completion", "created": created,
                                                      "model": srv.name, "choices": choices},
                            usage_of=(lambda gen: usage(prompts, body.n, gen)) if include_usage else None)

    per = await collect(events, request, len(prompts))
    choices = []
    for i, evs in per.items():
        choices.append({"index": i, "text": echo[i] + "".join(e.text for e in evs),
                        "logprobs": lp_obj(i, evs, len(echo[i]), True), "finish_reason": evs[-1].finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
            "choices": choices, "usage": usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})}
