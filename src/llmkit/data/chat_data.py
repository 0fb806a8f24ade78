"""Chat / instruction data: JSONL files and the chatterbot-corpus Q/A conversations, as lists of messages.

A JSONL line is either {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
or {"prompt": ..., "response": ...} (optionally with "system"). Every example becomes a list of
{"role", "content"} dicts ending with an assistant turn, ready for `render_chat`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.data.corpus import package_dir
from llmkit.data.jsonl import iter_jsonl
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_lines

Messages = list[dict[str, str]]
CHATTERBOT_HINT = "run `pip install chatterbot-corpus==1.3.3`"
NAMED_CHAT_DATA = {
    "chatterbot-en": ["english"],
    "chatterbot-zh": ["chinese"],
    "chatterbot": ["english", "chinese"],
}


def chatterbot_conversations(lang: str = "english") -> list[dict[str, Any]]:
    """The conversations of one chatterbot-corpus language: [{"category", "file", "turns": [str, ...]}].

    Each YAML file holds `categories:` and `conversations:` (lists of statements, each replying to the
    one before). Entries that are not lists of at least two non-empty strings are skipped.
    """
    import yaml

    root = package_dir("chatterbot_corpus", CHATTERBOT_HINT) / "data" / lang
    files = sorted(root.glob("*.yml"))
    if not files:
        langs = sorted(p.name for p in root.parent.iterdir() if p.is_dir()) if root.parent.exists() else []
        raise LlmkitError(f"chatterbot-corpus has no language {lang!r}; choose one of {', '.join(langs)}")
    out = []
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        category = (doc.get("categories") or [f.stem])[0]
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):
                continue
            turns = [str(t).strip() for t in conv if t is not None]
            if len(turns) >= 2 and all(turns):
                out.append({"category": str(category), "file": f.name, "turns": turns})
    return out


def turns_to_messages(turns: list[str], system: str | None = None) -> Messages:
    """Alternate user/assistant over the turns, dropping a final unanswered user turn."""
    if len(turns) % 2:
        turns = turns[:-1]
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return msgs


def chatterbot_examples(name: str = "chatterbot-en", system: str | None = None) -> list[Messages]:
    """Chat examples from a named chatterbot-corpus set (chatterbot-en, chatterbot-zh or chatterbot = both)."""
    if name not in NAMED_CHAT_DATA:
        raise LlmkitError(f"unknown chat data set {name!r}; choose one of {', '.join(NAMED_CHAT_DATA)} or a .jsonl file")
    return [turns_to_messages(c["turns"], system) for lang in NAMED_CHAT_DATA[name]
            for c in chatterbot_conversations(lang)]


def _example_from_record(rec: Any, where: str) -> Messages:
    if not isinstance(rec, dict):
        raise LlmkitError(f"{where}: expected a JSON object with 'messages' or 'prompt'/'response', got "
                          f"{type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LlmkitError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LlmkitError(f"{where}: message {i} needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise LlmkitError(f"{where}: no assistant message, so there is nothing to learn; add one")
        while msgs[-1]["role"] != "assistant":  # trailing user turns carry no response
            msgs = msgs[:-1]
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in rec and "response" in rec:
        if not isinstance(rec["prompt"], str) or not isinstance(rec["response"], str):
            raise LlmkitError(f"{where}: 'prompt' and 'response' must be strings")
        msgs = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) else []
        return msgs + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    raise LlmkitError(f"{where}: missing keys; each line needs 'messages' or both 'prompt' and 'response' "
                      f"(found {sorted(rec)[:6]})")


def read_chat_jsonl(path: str | Path) -> list[Messages]:
    """Read a chat JSONL file; a malformed line or record fails naming its line number."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no such chat data file {path}; give a .jsonl file or one of {', '.join(NAMED_CHAT_DATA)}")
    examples = [_example_from_record(rec, f"{path}:{n}") for n, rec in iter_jsonl(path, "chat examples")]
    if not examples:
        raise LlmkitError(f"{path} is empty: it holds no chat examples (one JSON object per line)")
    return examples


def load_chat_data(data: str, system: str | None = None) -> list[Messages]:
    """A named set (chatterbot-en, chatterbot-zh, chatterbot) or a JSONL file, as lists of messages."""
    if data in NAMED_CHAT_DATA or (data.startswith("chatterbot") and not Path(data).exists()):
        return chatterbot_examples(data, system)
    examples = read_chat_jsonl(data)
    if system:
        examples = [m if m[0]["role"] == "system" else [{"role": "system", "content": system}, *m] for m in examples]
    return examples


def write_chat_jsonl(examples: list[Messages], path: str | Path) -> Path:
    """Write examples as {"messages": [...]} lines (UTF-8, Chinese kept readable)."""
    return atomic_write_lines(path, ({"messages": m} for m in examples))
