"""lm-evaluation-harness tasks that work offline: task YAMLs shipped here, their JSONL data made from the
PyPI data packages llmkit already uses (nothing is downloaded, no data is committed).

`materialize(folder)` writes `<task>.yaml` + `<task>.jsonl` files into `folder`, with the YAML's
`{DATA}` placeholder set to the folder, ready to pass to lm-eval as `include_path`. Each data set is a
fixed, seeded sample, so scores are comparable between runs and machines.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from llmkit.data.chat_data import chatterbot_conversations
from llmkit.data.corpus import bible_verses
from llmkit.data.datasets import chinese_sentiment, rotten_tomatoes
from llmkit.io import atomic_write_text

N_DOCS = 500  # documents per task (use --limit to score fewer)


def _sample(rows: list[dict[str, Any]], n: int = N_DOCS) -> list[dict[str, Any]]:
    rng = random.Random(0)
    return rng.sample(rows, min(n, len(rows)))


def _rt() -> list[dict[str, Any]]:
    return _sample([{"text": t, "label": int(c == "fresh")} for t, c in rotten_tomatoes(full=False)])


def _zh() -> list[dict[str, Any]]:
    return _sample([{"text": t[:200], "label": int(c == "pos")} for t, c in chinese_sentiment()])


def _bible() -> list[dict[str, Any]]:
    rows = []
    for verse in bible_verses():
        m = re.fullmatch(r"(.{40,300}\S)\s+([A-Za-z]+)[.!?]", verse)
        if m:
            rows.append({"context": m.group(1), "word": m.group(2)})
    return _sample(rows)


def _qa() -> list[dict[str, Any]]:
    rows = [{"question": c["turns"][0], "answer": c["turns"][1]} for c in chatterbot_conversations("english")
            if len(c["turns"][1]) <= 80]
    return _sample(rows)


DATA: dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]] = {
    "llmkit_rt_sentiment": ("rt_sentiment.jsonl", _rt),
    "llmkit_bible_lastword": ("bible_lastword.jsonl", _bible),
    "llmkit_chatterbot_qa": ("chatterbot_qa.jsonl", _qa),
    "llmkit_zh_sentiment": ("zh_sentiment.jsonl", _zh),
}
TASKS = tuple(DATA)
GENERATION_TASKS = ("llmkit_chatterbot_qa",)


def materialize(folder: str | Path, tasks: list[str] | None = None) -> Path:
    """Write the shipped tasks (all, or `tasks`) and their data into `folder`; return it."""
    folder = Path(folder).resolve()
    for name in tasks or TASKS:
        file, make = DATA[name]
        yaml = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        if not (folder / file).exists():
            atomic_write_text(folder / file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make()))
        atomic_write_text(folder / f"{name}.yaml", yaml.replace("{DATA}", str(folder)))
    return folder
