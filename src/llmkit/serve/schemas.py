"""Request bodies of the OpenAI-compatible API (pydantic).

Nothing that changes the output is silently ignored: every field of OpenAI's API is either implemented or,
with a non-neutral value, answered 400 naming it (`unsupported_field`); so are the output-changing
extensions of vLLM and llama.cpp's servers. Other unknown fields (`user`, `metadata`, `store`, ...) are
accepted, as OpenAI clients send many."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_STOPS, MAX_STOP_LEN = 4, 64


def _integral(v: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; strict pydantic would not."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


def Int(**bounds: Any) -> Any:  # noqa: N802 (used as a type)
    """An integer field (bounds as Field's ge/le) that takes 5.0 as 5; bounds stay JSON Schema minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def token_key_pattern(vocab_size: int) -> str:
    """Regex of the decimal token ids 0 .. vocab_size-1 (no leading zeros): logit_bias keys, exactly."""
    hi = str(vocab_size - 1)
    alts = ["[0-9]" if k == 1 else f"[1-9][0-9]{{{k - 1}}}" for k in range(1, len(hi))]
    for i, c in enumerate(hi):  # same prefix, a smaller digit here, anything after
        lo, rest = (1 if i == 0 and len(hi) > 1 else 0), len(hi) - i - 1
        if int(c) > lo:
            alts.append(hi[:i] + f"[{lo}-{int(c) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(?:" + "|".join([*alts, hi]) + ")$"


LOGIT_BIAS_KEY = r"^[0-9]{1,9}$"  # app._openapi narrows it to the served vocabulary (token_key_pattern)
# a token id; app._openapi writes the served vocabulary's bound into the spec as its maximum
TokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-token-id": True}), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]
_StopStr = Annotated[str, Field(max_length=MAX_STOP_LEN)]
Stop = _StopStr | Annotated[list[_StopStr], Field(max_length=MAX_STOPS)] | None
# fields other servers implement that would change the output here, with the value that changes nothing
_NEUTRAL: dict[str, Any] = {
    "suffix": None, "best_of": 1, "functions": None, "function_call": None, "audio": None, "modalities": ["text"],
    "reasoning_effort": None, "web_search_options": None, "verbosity": None, "min_p": 0.0, "min_tokens": 0,
    "use_beam_search": False, "length_penalty": 1.0, "typical_p": 1.0, "tfs_z": 1.0,
    "mirostat": 0, "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "structured_outputs": None, "grammar": None, "json_schema": None, "bad_words": None,
    "allowed_token_ids": None, "include_stop_str_in_output": False, "skip_special_tokens": True,
    "truncate_prompt_tokens": None, "prompt_logprobs": None, "dry_multiplier": 0.0, "xtc_probability": 0.0,
    "echo": False,  # chat: prompt log-probabilities are a /v1/completions feature
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # JSON types as the spec says: no "0" for false

    def unsupported(self) -> str | None:
        """The first output-changing field this server does not implement that the request sets, if any."""
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and value is not None and value != _NEUTRAL[name]:
                return name
        return None


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the output follows")
    strict: bool | None = None


class ResponseFormat(_Body):
    """Structured outputs: free text, any JSON object, or JSON matching a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="served model id (GET /v1/models); defaults to it")
    max_tokens: Int(ge=1) | None = Field(None, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Int(ge=1) | None = Field(None, description="llmkit extension: sample among the k best")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="llmkit extension: CTRL penalty (> 1 discourages repeats)")
    n: Int(ge=1, le=16) = Field(1, description="choices per prompt")
    stop: Stop = Field(None, description=f"up to {MAX_STOPS} stop strings of at most {MAX_STOP_LEN} characters")
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=LOGIT_BIAS_KEY)],
                               Annotated[float, Field(ge=-100, le=100)]],
                          Field(json_schema_extra={"additionalProperties": False})] | None = Field(
        None, description="token id (as a string) -> bias added to its logit; -100 bans, 100 forces")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from tokens already generated")
    ignore_eos: bool = Field(False, description="vLLM extension: generate past end-of-sequence and end-of-turn "
                             "tokens until max_tokens or a stop string (for benchmarks)")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted per earlier occurrence")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained JSON")
    seed: Int(ge=0, le=2**53) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def json_mode(self) -> tuple[bool, dict[str, Any] | None]:
        """(constrain to JSON?, its schema or None for any object) from response_format."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return False, None
        if rf.type == "json_object":
            return True, None
        return True, rf.json_schema.schema_ if rf.json_schema is not None else None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | Texts | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
        ..., description="text, a list of texts, or token ids")
    max_tokens: Int(ge=0) | None = Field(
        16, description="most tokens to generate (OpenAI default 16); 0 with echo scores the prompt only")
    logprobs: Int(ge=0, le=20) | None = Field(None, description="also return the top-N log probabilities per token")
    echo: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionDef(_Body):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Body):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON text")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def rendered(self) -> dict[str, Any]:
        """The message as chat templates see it (developer = system; tool calls and ids kept)."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m


# a tool_choice other than "none" needs tools to choose from (that a named one is among them, JSON Schema
# cannot state: a 400 naming tool_choice)
_NEEDS_TOOLS = {"if": {"properties": {"tool_choice": {"anyOf": [{"enum": ["auto", "required"]}, {"type": "object"}]}},
                       "required": ["tool_choice"]},
                "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"]}}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra=_NEEDS_TOOLS)
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=20) | None = None
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int(ge=1) | None = None
    user: str | None = None


class TokenizeText(_Body):
    """POST /tokenize (vLLM's shape) of a text."""

    prompt: str
    add_special_tokens: bool = Field(False, description="let the tokenizer's post-processor add its specials")
    return_token_strs: bool = False


class TokenizeChat(_Body):
    """POST /tokenize (vLLM's shape) of chat messages, rendered through the chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """POST /detokenize: token ids back to text (special tokens kept, so it round-trips /tokenize)."""

    tokens: list[TokenId]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape; the `x-request-id` response header names the request in the log."""

    error: ErrorDetail


_ERRORS = {400: "bad request: invalid JSON, a field out of range, an unsupported field, a too long prompt",
           401: "missing or wrong API key", 404: "unknown model", 413: "request body over --max_body_bytes",
           429: "over --max_concurrent sequences; retry", 500: "server error (logged under the request id)",
           503: "the generation engine is not running"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {"description": "the whole answer (JSON), or with stream: true server-sent events",
          "content": {"application/json": {}, "text/event-stream": {}}}}
