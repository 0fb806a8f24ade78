"""Tool (function) calling: tool definitions into the prompt, tool calls out of the model's text.

A chat template that renders `tools` itself (it mentions them, as Qwen's or Llama 3.1's do) gets them the
way transformers' `apply_chat_template(tools=...)` passes them. Any other template gets the Hermes format
that most open tool-tuned models use: a system message listing the functions as JSON inside `<tools>` and
asking for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls are rendered back that
way and `role: "tool"` results as `<tool_response>` user turns. A forced call (tool_choice "required" or a
named function) is decoded under `call_schema`, so it always parses.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmkit.inference.chat_template import template_supports_tools
from llmkit.tokenizer import Tokenizer

TOOL_SYSTEM = (
    "You may call one or more functions to assist with the user query. The functions you can call are "
    "listed as JSON within <tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, answer with a "
    "JSON object holding its name and arguments within <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _args(call: dict[str, Any]) -> Any:
    """The arguments of an earlier call as a mapping (they arrive as JSON text). Text that is not JSON (a
    model's broken call sent back, as OpenAI's API allows) stays the string it is, rendered as one."""
    args = call["function"]["arguments"]
    if not isinstance(args, str):
        return args or {}
    try:
        return json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
        return args


def _call_text(call: dict[str, Any]) -> str:
    fn, args = call["function"], _args(call)
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def prepare_messages(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render: passed through for a template with tool support; otherwise tools are
    described in a system message, calls become <tool_call> text and tool results <tool_response> turns."""
    if template_supports_tools(tok):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # templates expect the arguments as a mapping, as transformers passes them
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _args(c)}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, tools
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join(([content] if content else []) + [_call_text(c) for c in m["tool_calls"]])
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        text = TOOL_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """JSON schema of one call {"name", "arguments"} to `name` (or to any of `tools`)."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        options.append({"type": "object", "properties": {
            "name": {"const": fn["name"]},
            "arguments": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _as_call(obj: Any, names: set[str]) -> tuple[str, str] | None:
    if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict):
        return obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)
    return None


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(remaining content or None, [(function name, arguments JSON text), ...]) from the model's output:
    <tool_call> blocks, or the whole output being one call object (a forced call)."""
    names = {t["function"]["name"] for t in tools}
    calls: list[tuple[str, str]] = []
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            call = _as_call(json.loads(stripped), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return None, [call]
    for block in _CALL.findall(text):
        try:
            call = _as_call(json.loads(block), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            calls.append(call)
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return rest or None, calls


def may_be_call(text: str) -> bool:
    """Whether text produced so far could still turn into a tool call (a stream holds it back until known)."""
    s = text.lstrip()
    return s.startswith("{") or s.startswith("<tool_call>") or "<tool_call>".startswith(s)
