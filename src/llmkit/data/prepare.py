"""Tokenize a corpus once into flat token files (train.bin / val.bin) that pretraining samples from.

Like nanoGPT's prepare.py: the text is split by characters (first 90 % train, last 10 % validation) and ids
are stored as uint16 when the vocabulary fits, else uint32. Unlike it, an end-of-text token is written
between documents (a file, a blank-line-separated paragraph, or a Bible book: `--document`), so the model
sees where one text ends and the next begins, and the corpus is streamed: two passes over it (count the
characters, then tokenize), a bounded batch of lines in memory, ids appended to the files as they come.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from tqdm.auto import tqdm

from llmkit.data.corpus import NAMED_CORPORA, bible_book_verses, corpus_files, iter_documents
from llmkit.errors import LlmkitError
from llmkit.io import atomic_folder
from llmkit.tokenizer import Kind, Tokenizer, train_from_iterator

META = "meta.json"
Document = Literal["auto", "file", "paragraph", "book", "none"]
MAX_PIECE = 1 << 18  # characters: a longer line is cut into pieces of this size (bounded memory)
BATCH_CHARS = 1 << 18  # characters tokenized per encode_batch call


def _file_lines(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as fh:
            while line := fh.readline(MAX_PIECE):
                yield line
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e


def stream(data: str, document: Document = "auto") -> Iterator[str | None]:
    """The corpus as pieces of text (lines) with None between documents (where end-of-text goes).

    document: file (each file is one document), paragraph (text between blank lines; the blank lines become
    the boundary), book (Bible books), none (no boundaries: files joined by a newline), auto (book for
    `bible`, file otherwise).
    """
    if document == "auto":
        document = "book" if data in NAMED_CORPORA else "file"
    if data in NAMED_CORPORA:
        book = None
        for b, verse in bible_book_verses():
            if document == "book" and book is not None and b != book:
                yield None
            book = b
            yield verse + "\n"
        return
    if document == "book":
        raise LlmkitError("--document book applies to the bible corpus; use file or paragraph for text files")
    emitted, pending = False, False  # pending: a boundary is due before the next text
    for i, path in enumerate(corpus_files(data)):
        if i and document == "none":
            yield "\n"
        pending = pending or (emitted and document in ("file", "paragraph"))
        for line in _file_lines(path):
            if document == "paragraph" and not line.strip():
                pending = pending or emitted
                continue
            if pending:
                yield None
                pending = False
            emitted = True
            yield line


class _Writer:
    """Tokenize pieces in batches and append the ids to one split's file."""

    def __init__(self, f: BinaryIO, tok: Tokenizer, dtype: np.dtype, eot: int | None):
        self.f, self.tok, self.dtype, self.eot = f, tok, dtype, eot
        self.items: list[str | None] = []
        self.chars, self.n = 0, 0

    def add(self, item: str | None) -> None:
        self.items.append(item)
        self.chars += len(item) if item else 0
        if self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        texts = [t for t in self.items if t]
        encoded = iter(self.tok.encode_batch(texts)) if texts else iter(())
        ids: list[int] = []
        for item in self.items:
            if item is None:
                ids.append(self.eot)  # type: ignore[arg-type]
            elif item:
                ids += next(encoded)
        if ids:
            self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.n += len(ids)
        self.items, self.chars = [], 0


def prepare(*, data: str, tokenizer: str, out: str, val_fraction: float = 0.1,
            document: Document = "auto") -> dict[str, Any]:
    """Tokenize a corpus into OUT/train.bin and OUT/val.bin (+ meta.json and the tokenizer), streaming it.

    Args:
        data: a named corpus (`bible`), a UTF-8 text file, or a folder of .txt files.
        tokenizer: folder holding tokenizer.json (from `llmkit tokenizer train`).
        out: output folder for the token shards.
        val_fraction: share of the text (by characters, taken from the end) kept for validation.
        document: what one document is, with the tokenizer's end-of-text token written between documents:
            file, paragraph (blank-line separated), book (Bible books), none (no end-of-text tokens), or
            auto (book for `bible`, file otherwise).

    Examples:
        llmkit prepare --data bible --tokenizer runs/tok --out runs/bible-data
        llmkit prepare --data shakespeare.txt --tokenizer runs/char-tok --out runs/shakespeare --val_fraction 0.1
        llmkit prepare --data corpus/ --tokenizer runs/tok --out runs/web-data --document paragraph
    """
    if not 0 < val_fraction < 1:
        raise LlmkitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if document not in ("auto", "file", "paragraph", "book", "none"):
        raise LlmkitError(f"--document must be auto, file, paragraph, book or none, got {document!r}")
    tok = Tokenizer.load(tokenizer)
    eot = tok.eos_id if tok.eos_id is not None else tok.special_id("sep")  # BERT vocabularies: [SEP]
    n_chars, n_docs, blank = 0, 1, True
    for item in stream(data, document):  # pass 1: count characters for the 90/10 cut
        if item is None:
            n_docs += 1
        else:
            n_chars += len(item)
            blank = blank and not item.strip()
    if blank:
        raise LlmkitError(f"corpus {data!r} is empty; give it some text")
    if eot is None and n_docs > 1:
        raise LlmkitError("the tokenizer has no end-of-text (or [SEP]) token to put between documents; retrain "
                          "it with `llmkit tokenizer train`, or pass --document none")
    cut = int(n_chars * (1 - val_fraction))
    dtype = np.dtype(np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    out_dir = Path(out)
    with atomic_folder(out_dir) as tmp, open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        train, val = _Writer(ftrain, tok, dtype, eot), _Writer(fval, tok, dtype, eot)
        pos = 0
        with tqdm(total=n_chars, desc="tokenize", unit="char", unit_scale=True, leave=False,
                  disable=n_chars < 1 << 23) as bar:
            for item in stream(data, document):  # pass 2: tokenize, cutting the piece that spans the cut
                if item is None:
                    (train if pos < cut else val).add(None)
                    continue
                if pos < cut < pos + len(item):
                    train.add(item[: cut - pos])
                    val.add(item[cut - pos :])
                else:
                    (train if pos < cut else val).add(item)
                pos += len(item)
                bar.update(len(item))
        counts = {}
        for split, w in (("train", train), ("val", val)):
            w.flush()
            if w.n < 2:
                raise LlmkitError(f"the {split} split of {data!r} has {w.n} tokens; give more text "
                                  "or change --val_fraction")
            counts[split] = w.n
        meta = {"vocab_size": tok.vocab_size, "dtype": dtype.name, "n_train": counts["train"],
                "n_val": counts["val"], "source": data, "val_fraction": val_fraction, "n_chars": n_chars,
                "document": document, "n_documents": n_docs, "eot_id": eot if document != "none" else None}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tok.save(tmp)
    print(f"prepared {data}: {counts['train']:,} train + {counts['val']:,} val tokens ({dtype.name}), "
          f"{n_docs:,} documents -> {out_dir}")
    return meta


def load_shards(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Memory-map train.bin and val.bin of a prepared folder."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.exists():
        raise LlmkitError(f"{folder} is not a prepared data folder (no {META}); run `llmkit prepare` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")[: meta["n_train"]]
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")[: meta["n_val"]]
    return train, val, meta


def train_tokenizer(*, data: str, out: str, kind: Kind = "bpe", vocab_size: int = 4096, min_frequency: int = 2,
                    lowercase: bool = False, special_tokens: list[str] | None = None) -> Tokenizer:
    """Train a tokenizer on a corpus and save tokenizer.json into OUT.

    Args:
        data: a named corpus (`bible`), a UTF-8 text file, or a folder of .txt files.
        out: folder to write tokenizer.json (and tokenizer_config.json with special-token roles) into.
        kind: bpe (GPT-2 byte-level, lossless for any UTF-8 incl. Chinese), wordpiece (BERT) or char.
        vocab_size: target vocabulary size including special tokens.
        min_frequency: pairs seen fewer times are not merged (bpe/wordpiece).
        lowercase: lowercase the text before tokenizing.
        special_tokens: extra special tokens to reserve, e.g. ["<|user|>", "<|assistant|>"].

    Examples:
        llmkit tokenizer train --data bible --out runs/tok --kind bpe --vocab_size 4096
        llmkit tokenizer train --data corpus_zh.txt --out runs/tok-zh --kind wordpiece --vocab_size 8000
    """
    tok = train_from_iterator(iter_documents(data), kind, vocab_size, min_frequency, lowercase, special_tokens)
    tok.save(out)
    print(f"trained {kind} tokenizer with {tok.vocab_size} tokens -> {Path(out) / 'tokenizer.json'}")
    return tok
