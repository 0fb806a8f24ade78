"""Read JSON Lines files with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError


def iter_jsonl(path: str | Path, what: str = "records") -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; one clear error per kind of problem."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no such file {path}; give a .jsonl file of {what}, one JSON object per line")
    if path.is_dir():
        raise LlmkitError(f"{path} is a folder; give a .jsonl file of {what}, one JSON object per line")
    with path.open(encoding="utf-8") as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LlmkitError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                                          "fix or remove that line") from e
        except UnicodeDecodeError as e:
            raise LlmkitError(f"{path}:{n + 1}: not UTF-8 text; convert the file, e.g. `iconv -t UTF-8`") from e
