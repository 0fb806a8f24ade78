"""Chat templates: turn a list of {"role", "content"} messages into the prompt text a model was tuned on.

Templates are Jinja2 (the format of Hugging Face's tokenizer_config.json `chat_template`), rendered in a
sandbox set up as transformers sets it up (loop controls, a non-escaping `tojson`, `raise_exception`,
`strftime_now`, `tools` and extra template variables), so Qwen, Gemma, Mistral and Phi-3 templates render
the same text. A tokenizer without one gets ChatML, the format SmolLM2 and many others use.
"""

from __future__ import annotations

import json
import re
import weakref
from datetime import datetime
from functools import lru_cache
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise LlmkitError(f"chat template: {msg}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # Jinja's own escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
    """The prompt text for `messages` under the tokenizer's chat template (ChatML if it has none).

    tools: JSON-schema tool definitions for templates with a tool format; variables: extra template
    variables such as Qwen3's enable_thinking. Assistant turns may carry tool_calls.
    """
    if not messages:
        raise LlmkitError("messages is empty; give at least one {'role': 'user', 'content': '...'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise LlmkitError(f"message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LlmkitError(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
    template = tokenizer.chat_template or CHATML_TEMPLATE
    special = {f"{r}_token": t for r, t in tokenizer.specials.items()}
    try:
        return _compile(template).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **{**special, **variables})
    except LlmkitError:
        raise
    except Exception as e:  # a template bug or a message shape it does not expect
        raise LlmkitError(f"chat template failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from e


def template_supports_tools(tokenizer: Tokenizer) -> bool:
    """Whether the chat template renders `tools` itself (else tools.py describes them in a system message)."""
    return "tools" in (tokenizer.chat_template or "")


_AS_TEXT: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_MARK = re.compile("\x00(\\d+)\x00")


def _text_encoder(tokenizer: Tokenizer) -> Any:
    """A copy of the tokenizer that reads special-token strings as plain text (made once per tokenizer)."""
    if tokenizer not in _AS_TEXT:
        from tokenizers import Tokenizer as HFTokenizer

        copy = HFTokenizer.from_str(tokenizer.tok.to_str())
        copy.encode_special_tokens = True
        _AS_TEXT[tokenizer] = copy
    return _AS_TEXT[tokenizer]


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt token ids for `messages`. Message contents are text: a special-token string typed inside one
    (e.g. `<|im_start|>system`) stays text and never becomes a control token; only the template's own
    markup does. Contents without such strings are tokenized exactly as `render_chat` + encode."""
    text = render_chat(tokenizer, messages, add_generation_prompt, tools)
    specials = [t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special]
    contents = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
    if not any(s and s in c for c in contents for s in specials):
        return tokenizer.encode(text)
    marked = [{**m, "content": f"\x00{i}\x00"} if contents[i] else m for i, m in enumerate(messages)]
    pieces = _MARK.split(render_chat(tokenizer, marked, add_generation_prompt, tools))
    as_text = _text_encoder(tokenizer)
    ids: list[int] = []
    for j, piece in enumerate(pieces):  # even: template markup, odd: a message index
        if j % 2:
            ids += as_text.encode(contents[int(piece)], add_special_tokens=False).ids
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def chat_stop_strings(tokenizer: Tokenizer) -> list[str]:
    """Strings that end an assistant turn under the tokenizer's template (used as stop strings)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    stops = [s for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>") if s in template]
    if tokenizer.specials.get("eos"):
        stops.append(tokenizer.specials["eos"])
    return list(dict.fromkeys(stops))
