"""Chat templates: turn a list of {"role", "content"} messages into the prompt text a model was tuned on.

Templates are Jinja2 (the format of Hugging Face's tokenizer_config.json `chat_template`), rendered in a
sandbox. A tokenizer without one gets ChatML, the format SmolLM2 and many others use.
"""

from __future__ import annotations

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` under the tokenizer's chat template (ChatML if it has none)."""
    if not messages:
        raise LlmkitError("messages is empty; give at least one {'role': 'user', 'content': '...'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlmkitError(f"message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LlmkitError(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
    template = tokenizer.chat_template or CHATML_TEMPLATE
    special = {f"{r}_token": t for r, t in tokenizer.specials.items()}
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def chat_stop_strings(tokenizer: Tokenizer) -> list[str]:
    """Strings that end an assistant turn under the tokenizer's template (used as stop strings)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    stops = [s for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>") if s in template]
    if tokenizer.specials.get("eos"):
        stops.append(tokenizer.specials["eos"])
    return list(dict.fromkeys(stops))
