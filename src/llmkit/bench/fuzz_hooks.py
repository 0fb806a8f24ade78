"""schemathesis hooks for `make fuzz` (loaded through SCHEMATHESIS_HOOKS): the one request rule the OpenAPI
spec cannot state. A named `tool_choice` must name one of the request's own `tools` (JSON Schema cannot
compare two values of a body), so a generated valid chat request that names another function is made to
name its first tool; the server answers the mismatch 400, as OpenAI does. Invalid (negative) cases are left
as generated, so their rejection is still checked."""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.generation import GenerationMode


@schemathesis.hook("map_case")
def named_tool_in_tools(_context: Any, case: Any) -> Any:
    meta, body = case.meta, case.body
    if (meta is None or meta.generation.mode != GenerationMode.POSITIVE or case.operation.path != "/v1/chat/completions"
            or not isinstance(body, dict)):
        return case
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and tools:
        choice["function"]["name"] = tools[0]["function"]["name"]
    return case
