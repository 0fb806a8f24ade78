"""`llmkit app chat`: a scripted conversation with a decoder through its chat template (ChatML if none)."""

from __future__ import annotations

from llmkit.apps.common import complete, load_checkpoint, write_jsonl
from llmkit.chat import render_chat
from llmkit.errors import LlmkitError


def chat(checkpoint: str, *, message: str | list[str] | None = None, system: str | None = None, max_new_tokens: int = 128,
         temperature: float = 0.0, seed: int = 0, out: str | None = None) -> list[dict[str, str]]:
    """Send user messages one after another; each reply joins the history the next turn sees.

    Args:
        checkpoint: decoder checkpoint folder (an instruction-tuned one answers best).
        message: user message(s), in order (repeat --message for a multi-turn conversation).
        system: optional system prompt.
        max_new_tokens: longest reply in tokens.
        temperature: 0 = greedy; higher = more varied replies.
        seed: sampling seed.
        out: write the whole conversation as JSONL ({"role", "content"} per line).

    Examples:
        llmkit app chat runs/smollm2 --message "What is the capital of France?"
        llmkit app chat runs/smollm2 --system "Answer briefly." --message+ "Hi" --message+ "Name a prime number."
    """
    message = [message] if isinstance(message, str) else list(message or [])
    if not message or not any(m.strip() for m in message):
        raise LlmkitError("give at least one non-empty --message")
    model, tok = load_checkpoint(checkpoint)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for m in message:
        history.append({"role": "user", "content": m})
        prompt = render_chat(tok, history)
        reply = complete(model, tok, [prompt], max_new_tokens, temperature=temperature, seed=seed)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"user: {m}\nassistant: {reply}")
    if out:
        write_jsonl(out, history)
    return history
