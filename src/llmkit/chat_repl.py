"""`llmkit chat`: an interactive terminal chat that renders the history with the same template SFT trained on.

Reads one user message per line from stdin (so it can be driven by a pipe), streams each reply, keeps the
history (dropping the oldest turns when the context fills up). /reset clears the history, /exit quits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from llmkit.chat import chat_stop_strings, render_chat
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer


def load_chat_model(path: str, device: str = "cpu") -> tuple[nn.Module, Tokenizer, dict]:
    """A checkpoint folder, or a LoRA adapter folder (its base is loaded and the adapter merged in).

    Returns (model in eval mode, tokenizer, metadata such as the system prompt used in training).
    """
    from llmkit.checkpoint import load_model
    from llmkit.lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config

    folder = Path(path)
    if (folder / ADAPTER_CONFIG).exists() and not (folder / "model.safetensors").exists():
        meta = read_adapter_config(folder)
        base = next((b for b in (meta.get("base"), meta.get("base_abs")) if b and Path(b).exists()), None)
        if base is None:
            raise LlmkitError(f"adapter {folder} was trained on base {meta.get('base')!r}, which is not there; "
                              f"merge it with `llmkit lora merge BASE {folder} OUT` and chat with OUT")
        model, _ = load_model(base, device)
        load_adapter(model, folder)
        merge_lora(model)  # same outputs, no adapter overhead per token
        model.eval()
        tok_dir = folder if (folder / "tokenizer.json").exists() else Path(base)
    else:
        model, meta = load_model(folder, device)
        tok_dir = folder
    if not (tok_dir / "tokenizer.json").exists():
        raise LlmkitError(f"{tok_dir} has no tokenizer.json; chat needs the model's tokenizer")
    return model, Tokenizer.load(tok_dir), meta


def fit_history(tok: Tokenizer, messages: list[dict[str, str]], budget: int) -> tuple[str, list[dict[str, str]]]:
    """Render the prompt, dropping the oldest user/assistant turns (never the system prompt or the last
    message) until it has at most `budget` tokens. Returns (prompt text, the messages kept)."""
    msgs = list(messages)
    while True:
        prompt = render_chat(tok, msgs, add_generation_prompt=True)
        n = len(tok.encode(prompt))
        first = 1 if msgs[0]["role"] == "system" else 0
        if n <= budget or len(msgs) - first <= 1:
            if n > budget:
                raise LlmkitError(f"the message is {n} tokens but only {budget} fit in the context with "
                                  "max_new_tokens; write a shorter message or lower --max_new_tokens")
            return prompt, msgs
        del msgs[first : first + 2 if len(msgs) - first > 2 else first + 1]


def chat(checkpoint: str, *, system: str | None = None, max_new_tokens: int = 200, temperature: float = 0.7,
         top_k: int | None = 50, top_p: float | None = 0.9, repetition_penalty: float = 1.1,
         seed: int | None = None, device: str = "cpu") -> list[dict[str, str]]:
    """Chat with a checkpoint (or a LoRA adapter folder) in the terminal, one message per line.

    Args:
        checkpoint: checkpoint folder, or an adapter folder from `llmkit finetune sft --lora_r ...`.
        system: system prompt (default: the one the model was fine-tuned with, if any).
        max_new_tokens: longest reply in tokens.
        temperature: 0 = greedy (deterministic); higher = more varied.
        top_k: sample among the k most likely tokens.
        top_p: sample within the nucleus of probability p.
        repetition_penalty: > 1 discourages repeating tokens.
        seed: random seed for reproducible replies.
        device: cpu or cuda.

    Examples:
        llmkit chat runs/sft-merged
        llmkit chat runs/sft-lora --temperature 0
        printf 'What is AI?\\n/reset\\n你好\\n' | llmkit chat runs/sft-lora --seed 0
    """
    from llmkit.generate import SamplingParams, generate_text

    model, tok, meta = load_chat_model(checkpoint, device)
    system = system if system is not None else meta.get("system")
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    stops = chat_stop_strings(tok)
    if interactive:
        print(f"chatting with {checkpoint} ({model.cfg.block_size} tokens of context). "
              "/reset clears the history, /exit or Ctrl-D quits.")
    turn = 0
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            print("(history cleared)")
            continue
        budget = model.cfg.block_size - max(1, min(max_new_tokens, model.cfg.block_size // 2))
        prompt, messages = fit_history(tok, messages + [{"role": "user", "content": text}], budget)
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops,
                                None if seed is None else seed + turn)
        if interactive:
            sys.stdout.write("bot> ")

        def emit(_row: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        reply = generate_text(model, tok, [prompt], params, on_text=emit)[0].text.strip()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return messages
