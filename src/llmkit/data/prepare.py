"""Tokenize a corpus once into flat token files (train.bin / val.bin memmaps) that pretraining samples from.

Like nanoGPT's prepare.py: the text is split by characters (first 90 % train, last 10 % validation),
each part is tokenized, and ids are stored as uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmkit.data.corpus import iter_documents, read_corpus
from llmkit.errors import LlmkitError
from llmkit.io import atomic_folder
from llmkit.tokenizer import Kind, Tokenizer, train_from_iterator

META = "meta.json"


def _encode(tok: Tokenizer, text: str, desc: str, chunk_lines: int = 2000) -> np.ndarray:
    """Encode text in batches of lines (keeping the newlines), with a progress bar."""
    lines = text.splitlines(keepends=True)
    parts: list[np.ndarray] = []
    for i in tqdm(range(0, len(lines), chunk_lines), desc=desc, unit="chunk", leave=False,
                  disable=len(lines) <= chunk_lines):
        for ids in tok.encode_batch(lines[i : i + chunk_lines]):
            parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _write(path: Path, ids: np.ndarray, dtype: np.dtype) -> None:
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=(max(len(ids), 1),))
    arr[: len(ids)] = ids
    arr.flush()
    del arr


def prepare(*, data: str, tokenizer: str, out: str, val_fraction: float = 0.1) -> dict[str, Any]:
    """Tokenize a corpus into OUT/train.bin and OUT/val.bin (+ meta.json and the tokenizer).

    Args:
        data: a named corpus (`bible`), a UTF-8 text file, or a folder of .txt files.
        tokenizer: folder holding tokenizer.json (from `llmkit tokenizer train`).
        out: output folder for the token shards.
        val_fraction: share of the text (by characters, taken from the end) kept for validation.

    Examples:
        llmkit prepare --data bible --tokenizer runs/tok --out runs/bible-data
        llmkit prepare --data shakespeare.txt --tokenizer runs/char-tok --out runs/shakespeare --val_fraction 0.1
    """
    if not 0 < val_fraction < 1:
        raise LlmkitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    tok = Tokenizer.load(tokenizer)
    text = read_corpus(data)
    n = len(text)
    cut = int(n * (1 - val_fraction))
    dtype = np.dtype(np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    out_dir = Path(out)
    counts = {}
    with atomic_folder(out_dir) as tmp:
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            ids = _encode(tok, part, f"tokenize {split}")
            if len(ids) < 2:
                raise LlmkitError(f"the {split} split of {data!r} has {len(ids)} tokens; give more text "
                                  "or change --val_fraction")
            _write(tmp / f"{split}.bin", ids, dtype)
            counts[split] = int(len(ids))
        meta = {"vocab_size": tok.vocab_size, "dtype": dtype.name, "n_train": counts["train"],
                "n_val": counts["val"], "source": data, "val_fraction": val_fraction, "n_chars": n}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tok.save(tmp)
    print(f"prepared {data}: {counts['train']:,} train + {counts['val']:,} val tokens ({dtype.name}) -> {out_dir}")
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
