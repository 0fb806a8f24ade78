"""`llmkit chat` / `llmkit app chat`: the one chat command, through the checkpoint's chat template (ChatML if none).

With `--message` it runs a scripted conversation; without, it reads one user message per line from stdin
(so it can be driven by a pipe) and streams each reply. Either way the history is kept, the oldest turns are
dropped when the context fills up, and a LoRA adapter folder works as well as a checkpoint folder.
In the terminal, /reset clears the history and /exit quits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from llmkit.apps.common import as_list, write_jsonl
from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import chat_stop_strings, render_chat
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models.load import load_model
from llmkit.models.lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config
from llmkit.tokenizer import Tokenizer

Messages = list[dict[str, str]]


def load_chat_model(path: str, device: str = "cpu") -> tuple[nn.Module, Tokenizer, dict]:
    """A checkpoint folder, or a LoRA adapter folder (its base is loaded and the adapter merged in).

    Returns (model in eval mode, tokenizer, metadata such as the system prompt used in training).
    """
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
    if model.cfg.arch not in ("decoder", "lstm"):
        raise LlmkitError(f"{path} is a {model.cfg.arch} model; chat needs a decoder (GPT/Llama) checkpoint, "
                          "e.g. one imported with `llmkit convert from-hf`")
    return model, Tokenizer.load(tok_dir), meta


def fit_history(tok: Tokenizer, messages: Messages, budget: int) -> tuple[str, Messages]:
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


def _user_lines(interactive: bool):
    """User messages typed (or piped) one per line; blank lines skipped, /exit ends, /reset passes through."""
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text:
            yield text


def _emit(_row: int, delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def chat(checkpoint: str, *, message: str | list[str] | None = None, system: str | None = None,
         max_new_tokens: int = 200, temperature: float = 0.7, top_k: int | None = 50, top_p: float | None = 0.9,
         repetition_penalty: float = 1.1, seed: int | None = None, out: str | None = None,
         device: str = "cpu") -> Messages:
    """Chat with a checkpoint (or a LoRA adapter folder): scripted with --message, else one message per stdin line.

    Args:
        checkpoint: checkpoint folder, or an adapter folder from `llmkit finetune sft --lora_r ...`.
        message: user message(s) in order (repeat `--message+` for a multi-turn script); none = read stdin.
        system: system prompt (default: the one the model was fine-tuned with, if any).
        max_new_tokens: longest reply in tokens.
        temperature: 0 = greedy (deterministic); higher = more varied.
        top_k: sample among the k most likely tokens.
        top_p: sample within the nucleus of probability p.
        repetition_penalty: > 1 discourages repeating tokens.
        seed: random seed for reproducible replies (turn i uses seed + i).
        out: write the whole conversation as JSONL ({"role", "content"} per line).
        device: cpu or cuda.

    Examples:
        llmkit chat runs/sft-merged
        llmkit chat runs/sft-lora --temperature 0
        printf 'What is AI?\\n/reset\\n你好\\n' | llmkit chat runs/sft-lora --seed 0
        llmkit chat runs/smollm2 --message+ "Hi" --message+ "Name a prime number." --temperature 0
    """
    scripted = as_list(message)
    if message is not None and not any(m.strip() for m in scripted):
        raise LlmkitError("give at least one non-empty --message")
    model, tok, meta = load_chat_model(checkpoint, device)
    system = system if system is not None else meta.get("system")
    start: Messages = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = not scripted and sys.stdin.isatty()
    stops = chat_stop_strings(tok)
    block = model.cfg.block_size
    budget = block - max(1, min(max_new_tokens, block // 2))
    if interactive:
        print(f"chatting with {checkpoint} ({block} tokens of context). "
              "/reset clears the history, /exit or Ctrl-D quits.")
    for turn, text in enumerate(scripted or _user_lines(interactive)):
        if text == "/reset" and not scripted:
            messages = list(start)
            print("(history cleared)")
            continue
        prompt, messages = fit_history(tok, messages + [{"role": "user", "content": text}], budget)
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops,
                                None if seed is None else seed + turn)
        if scripted:
            reply = generate_text(model, tok, [prompt], params)[0].text.strip()
            print(f"user: {text}\nassistant: {reply}")
        else:
            if interactive:
                sys.stdout.write("bot> ")
            reply = generate_text(model, tok, [prompt], params, on_text=_emit)[0].text.strip()
            sys.stdout.write("\n")
            sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    if out:
        write_jsonl(out, messages)
    return messages


def app_chat(checkpoint: str, *, message: str | list[str] | None = None, system: str | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
             out: str | None = None) -> Messages:
    """Send user messages one after another; each reply joins the history the next turn sees (greedy by default).

    Args:
        checkpoint: decoder checkpoint folder (an instruction-tuned one answers best), or a LoRA adapter folder.
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
    if not any(m.strip() for m in as_list(message)):
        raise LlmkitError("give at least one non-empty --message")
    return chat(checkpoint, message=message, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=None, top_p=None, repetition_penalty=1.0, seed=seed, out=out)
