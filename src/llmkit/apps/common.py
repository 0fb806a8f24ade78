"""What every `llmkit app` recipe shares: load a checkpoint, read examples, prompt a decoder, write results.

Instruction-tuned checkpoints (a tokenizer with a chat template, e.g. SmolLM2-135M-Instruct imported with
`llmkit convert from-hf`) are prompted through their template; base models get the plain prompt.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch import nn

from llmkit.apps.examples import NAMED_EXAMPLES, named_examples
from llmkit.data.jsonl import iter_jsonl
from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import chat_stop_strings, render_chat
from llmkit.inference.constrained import json_constraint
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.io import atomic_write_lines
from llmkit.models.load import load
from llmkit.tokenizer import Tokenizer

ChatMode = Literal["auto", "yes", "no"]


def load_checkpoint(checkpoint: str, decoder_only: bool = True) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) of a checkpoint folder, failing clearly when it cannot run a text recipe."""
    model, tok = load(checkpoint)
    if tok is None:
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; a recipe needs one to read and write text")
    if decoder_only and model.cfg.arch not in ("decoder", "lstm"):
        raise LlmkitError(f"{checkpoint} is a {model.cfg.arch} model; this recipe needs a decoder (GPT/Llama) "
                          "checkpoint, e.g. one imported with `llmkit convert from-hf`")
    return model, tok


def read_jsonl(path: str, required: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """Examples from a named set (`trivia`, `wnut-extract`) or a JSONL file with the `required` string fields."""
    if path in NAMED_EXAMPLES:
        return named_examples(path)[:limit] if limit else named_examples(path)
    p = Path(path)
    if not p.is_file():
        raise LlmkitError(f"no such data file {path}; give a .jsonl file with fields {', '.join(required)} "
                          f"or a named set ({', '.join(NAMED_EXAMPLES)})")
    rows = []
    for n, d in iter_jsonl(p, "examples"):
        missing = [f for f in required if not isinstance(d, dict) or not isinstance(d.get(f), str)]
        if missing:
            raise LlmkitError(f"{path}:{n} lacks string field(s) {missing}; each line needs {', '.join(required)}")
        rows.append(d)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise LlmkitError(f"{path} holds no examples")
    return rows


def as_list(value: str | list[str] | None) -> list[str]:
    """A repeatable CLI value: `--text "a"` gives a string, `--text+ a --text+ b` or a JSON list gives a list."""
    return [value] if isinstance(value, str) else list(value or [])


def use_chat(tok: Tokenizer, mode: ChatMode) -> bool:
    return mode == "yes" or (mode == "auto" and tok.chat_template is not None)


def build_prompt(tok: Tokenizer, instruction: str, chat: bool, system: str | None = None,
                 answer_prefix: str = "") -> str:
    """The instruction as a chat turn (template + generation prompt) or as plain text ending in a cue."""
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
        return render_chat(tok, msgs) + answer_prefix
    return instruction.rstrip() + "\n" + answer_prefix


def _keep_end(tok: Tokenizer, prompt: str, room: int) -> str:
    """The prompt, or its end that encodes to at most `room` tokens (decode + encode may re-merge tokens)."""
    ids = tok.encode(prompt)
    keep = room
    while len(ids) > room:
        text = tok.decode(ids[-keep:], skip_special_tokens=False)
        if len(tok.encode(text)) <= room:
            return text
        keep -= 1
    return prompt


def complete(model: nn.Module, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 64,
             stop: list[str] | None = None, batch_size: int = 8, temperature: float = 0.0,
             seed: int | None = 0, json_schema: dict[str, Any] | None = None) -> list[str]:
    """Continue each prompt (greedy by default), batched; prompts that overflow the context keep their end.

    json_schema: constrained decoding (inference/constrained.py): each output is JSON matching the schema,
    provided max_new_tokens covers the longest document; the prompt keeps all of that room and no stop
    string can cut the document short (it ends with the grammar)."""
    stops = list(stop or [])
    if tok.chat_template is not None and json_schema is None:
        stops += chat_stop_strings(tok)
    block = model.cfg.block_size
    if json_schema is not None and max_new_tokens >= block:
        raise LlmkitError(f"the JSON output needs up to {max_new_tokens} tokens but the model's context is {block}; "
                          "ask for shorter values or fewer fields")
    room = block - (max_new_tokens if json_schema is not None else min(max_new_tokens, block // 2))
    outs: list[str] = []
    for j in range(0, len(prompts), batch_size):
        batch = [_keep_end(tok, p, room) for p in prompts[j:j + batch_size]]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                stop=list(dict.fromkeys(stops)), seed=seed)
        cons = None if json_schema is None else [json_constraint(tok, json_schema, model.cfg.vocab_size)
                                                 for _ in batch]
        outs += [c.text.strip() for c in generate_text(model, tok, batch, params, constraints=cons)]
    return outs


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Write rows atomically: a crash never leaves half a results file."""
    atomic_write_lines(path, rows)


def report(name: str, scores: dict[str, Any]) -> None:
    shown = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    print(f"{name}: {shown}")


def finish(name: str, rows: list[dict[str, Any]], preds: list[Any], scores: dict[str, Any], scored: bool,
           out: str | None, show: Callable[[Any], str] = str) -> dict[str, Any]:
    """End of every recipe: print the scores (or, without references, the predictions), write OUT, return both."""
    if scored:
        report(name, scores)
    else:
        for p in preds:
            print(show(p))
    if out:
        write_jsonl(out, rows)
    return {"scores": scores, "predictions": preds}


# ----------------------------------------------------------------------------------------------- SQuAD-style text match


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles (a/an/the), squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised bag of tokens."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)
