"""POST /v1/chat/completions: messages rendered through the checkpoint's chat template, replies whole or
streamed; structured outputs (response_format) and tool calling (tools, tool_choice; inference/tools.py)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import chat_stop_strings, encode_chat
from llmkit.inference.tools import call_schema, may_be_call, parse_tool_calls, prepare_messages
from llmkit.serve.engine import TokenEvent
from llmkit.serve.errors import APIError
from llmkit.serve.schemas import ERROR_RESPONSES, STREAM_OR_JSON, ChatCompletionRequest
from llmkit.serve.server import Server, check_api_key, sampling_params, server_of, stop_ids, usage
from llmkit.serve.streaming import collect, first_or_error, sse_response

router = APIRouter(responses=ERROR_RESPONSES)


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


def _tool_mode(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | None, bool]:
    """(tool definitions in use or None, the function a call is forced to (None = any), whether forced)."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice != "none":
        raise APIError(400, "tool_choice is set but tools is empty; give the tools to choose from",
                       param="tool_choice")
    tools = [t.model_dump(exclude_none=True, include={"type", "function"}) for t in body.tools or []]
    if not tools or choice == "none":
        return None, None, False
    if choice is None or choice == "auto":
        return tools, None, False
    if choice == "required":
        return tools, None, True
    name = choice.function.name
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice")
    return tools, name, True


def _message(text: str, tools: list[dict[str, Any]] | None, parallel: bool) -> tuple[dict[str, Any], bool]:
    """The assistant message for `text` (tool calls parsed out when tools are in use); True if it calls."""
    content, calls = parse_tool_calls(text, tools) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}, False
    calls = calls[:1] if not parallel else calls
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": n, "arguments": a}} for n, a in calls]}, True


@router.post("/v1/chat/completions", dependencies=[Depends(check_api_key)], responses=STREAM_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request,  # noqa: ANN201 (JSON or a stream)
                           srv: Server = Depends(server_of)):
    srv.check_model(body.model)
    if (body.model_extra or {}).get("echo"):
        raise APIError(400, "echo is not supported on chat completions; for prompt log-probabilities use "
                            "POST /v1/completions with echo and logprobs", param="echo", code="unsupported_field")
    srv.check_request(body)
    tok = srv.tok
    tools, forced_name, forced = _tool_mode(body)
    json_on, _ = body.json_mode()
    if forced and json_on:
        raise APIError(400, "a forced tool call and response_format JSON cannot both shape the output; "
                            "drop one", param="response_format")
    try:
        messages, template_tools = prepare_messages(tok, [m.rendered() for m in body.messages], tools)
        base = [encode_chat(tok, messages, tools=template_tools)]
    except LlmkitError as e:
        raise APIError(400, str(e), param="messages") from None
    srv.prompt_ids(base, "messages")  # checks the ids against the vocabulary
    srv.check_max_tokens(body.max_tokens)  # both are checked against the cap, whichever is used
    srv.check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    budget = srv.check_lengths(base, body.max_completion_tokens or body.max_tokens, "messages")
    turn_end = chat_stop_strings(tok)
    stops = list(dict.fromkeys(turn_end + body.stop_list()))
    prompts = base * body.n
    params = [sampling_params(body, budget, stops, i) for i in range(body.n)]
    top = (body.top_logprobs or 0) if body.logprobs else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    end_ids = stop_ids(tok, stops)
    end_id = next((i for i in (stop_ids(tok, turn_end) or end_ids)), None)
    cons = await srv.constraints(body, body.n, end_id, call_schema(tools, forced_name) if forced else None, forced)
    events = srv.run(prompts, params, top, end_ids, cons)

    if body.stream:
        first = await first_or_error(events)
        held = {i: "" for i in range(body.n)}  # text held back while it may still become a tool call
        streaming = {i: not tools for i in range(body.n)}

        def lp(ev: TokenEvent) -> dict[str, Any] | None:
            return {"content": _logprob_items(srv, [ev])} if body.logprobs else None

        def choice_of(ev: TokenEvent) -> dict[str, Any] | list[dict[str, Any]] | None:
            i = ev.index
            if not streaming[i]:
                held[i] += ev.text
                if ev.finish_reason is None and (forced or may_be_call(held[i])):
                    return None
                if ev.finish_reason is None:  # plain text after all: send what was held, then stream
                    streaming[i] = True
                    return {"index": i, "delta": {"content": held[i]}, "logprobs": lp(ev), "finish_reason": None}
                msg, called = _message(held[i], tools, body.parallel_tool_calls)
                if not called:
                    return {"index": i, "delta": {"content": held[i]} if held[i] else {}, "logprobs": lp(ev),
                            "finish_reason": ev.finish_reason}
                out = []
                for k, c in enumerate(msg["tool_calls"]):  # the name first, then the arguments, as OpenAI does
                    out.append({"index": i, "delta": {"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                "function": {"name": c["function"]["name"], "arguments": ""}}]},
                                "logprobs": None, "finish_reason": None})
                    out.append({"index": i, "delta": {"tool_calls": [{"index": k, "function": {
                                "arguments": c["function"]["arguments"]}}]}, "logprobs": None, "finish_reason": None})
                out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"})
                return out
            if not ev.text and ev.finish_reason is None and not ev.logprobs:
                return None
            return {"index": i, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp(ev),
                    "finish_reason": ev.finish_reason}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            request, first, events, choice_of=choice_of,
            envelope=lambda choices: {"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": srv.name, "system_fingerprint": None, "choices": choices},
            usage_of=(lambda gen: usage(prompts, body.n, gen)) if include_usage else None,
            prelude=[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)])

    per = await collect(events, request, body.n)
    choices = []
    for i, evs in per.items():
        msg, called = _message("".join(e.text for e in evs), tools, body.parallel_tool_calls)
        choices.append({"index": i, "message": msg,
                        "logprobs": {"content": _logprob_items(srv, evs)} if body.logprobs else None,
                        "finish_reason": "tool_calls" if called else evs[-1].finish_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name,
            "system_fingerprint": None, "choices": choices,
            "usage": usage(prompts, body.n, {i: evs[-1].n_generated for i, evs in per.items()})}
