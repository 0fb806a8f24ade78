"""Request bodies of the OpenAI-compatible API (pydantic). Unknown fields are ignored, as OpenAI clients send many."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Stop = str | list[str] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="served model id (GET /v1/models); defaults to it")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="llmkit extension: sample among the k best")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="llmkit extension: CTRL penalty (> 1 discourages repeats)")
    n: int = Field(1, ge=1, le=16, description="choices per prompt")
    stop: Stop = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, a list of texts, or token ids")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(16, description="most tokens to generate (OpenAI default 16)")
    logprobs: int | None = Field(None, ge=0, le=20, description="also return the top-N log probabilities per token")
    echo: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
