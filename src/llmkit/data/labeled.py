"""Labelled data for fine-tuning: CSV/JSONL (text, label) and CoNLL/BIO files, splits, label vocabularies,
and encoding into padded tensors with sub-word label alignment (first sub-token carries the word's tag).

Every reader fails with one line naming the file (and line) and the fix.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

TextExample = tuple[str, str]  # (text, label)
TagExample = tuple[list[str], list[str]]  # (words, BIO tags)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise LlmkitError(f"data file {path} does not exist; give a CSV/JSONL file or a named dataset")
    if path.is_dir():
        raise LlmkitError(f"{path} is a folder; give a CSV, JSONL or CoNLL file")


def read_text_labels(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[TextExample]:
    """Read (text, label) pairs from a .csv/.tsv (header row) or .jsonl/.json (one object per line) file."""
    path = Path(path)
    _check_file(path)
    out: list[TextExample] = []
    try:
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LlmkitError(f"{path}:{n}: malformed JSON ({e.msg}); each line must be one "
                                          f'object like {{"{text_field}": "...", "{label_field}": "..."}}') from e
                    if not isinstance(row, dict) or text_field not in row or label_field not in row:
                        have = sorted(row) if isinstance(row, dict) else type(row).__name__
                        raise LlmkitError(f"{path}:{n}: needs fields {text_field!r} and {label_field!r}, got {have}; "
                                          "rename them or pass --text_field/--label_field")
                    out.append((str(row[text_field]), str(row[label_field])))
        else:
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
                cols = reader.fieldnames or []
                if text_field not in cols or label_field not in cols:
                    raise LlmkitError(f"{path}: needs columns {text_field!r} and {label_field!r} in its header row, "
                                      f"found {cols}; rename them or pass --text_field/--label_field")
                for n, row in enumerate(reader, 2):
                    text, label = row.get(text_field), row.get(label_field)
                    if text is None or label is None:
                        raise LlmkitError(f"{path}:{n}: row has fewer columns than the header")
                    out.append((text, label.strip()))
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e
    if not out:
        raise LlmkitError(f"{path} holds no examples; it needs rows with {text_field!r} and {label_field!r}")
    return out


def tagged_sentences(lines: Iterable[str], parse: Callable[[int, str], tuple[str, str] | None]
                     ) -> list[TagExample]:
    """Group `token ... tag` lines into (words, tags) sentences at lines that strip to "" (CoNLL layout);
    `parse(line_no, line)` gives (token, tag), or None to skip the line."""
    out: list[TagExample] = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            if words:
                out.append((words, tags))
                words, tags = [], []
            continue
        pair = parse(n, line)
        if pair is not None:
            words.append(pair[0])
            tags.append(pair[1])
    if words:
        out.append((words, tags))
    return out


def read_conll(path: str | Path) -> list[TagExample]:
    """Read a CoNLL/BIO file: `token<whitespace>...tag` per line (tag = last column), blank line between
    sentences (a line that strips to "" counts as blank), `-DOCSTART-` lines skipped."""
    path = Path(path)
    _check_file(path)

    def parse(n: int, line: str) -> tuple[str, str] | None:
        parts = line.split()
        if parts[0] == "-DOCSTART-":
            return None
        if len(parts) < 2:
            raise LlmkitError(f"{path}:{n}: expected `token<TAB>tag`, got {line.strip()!r}")
        tag = parts[-1]
        if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
            raise LlmkitError(f"{path}:{n}: tag {tag!r} is not BIO (O, B-TYPE, I-TYPE)")
        return parts[0], tag

    try:
        with path.open(encoding="utf-8") as f:
            out = tagged_sentences(f, parse)
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t UTF-8`") from e
    if not out:
        raise LlmkitError(f"{path} holds no sentences; it needs `token<TAB>tag` lines")
    return out


def split(examples: Sequence, val_frac: float, test_frac: float, seed: int) -> tuple[list, list, list]:
    """Shuffle once with `seed`, then cut into train/val/test (deterministic)."""
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise LlmkitError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val, n_test = round(len(idx) * val_frac), round(len(idx) * test_frac)
    pick = [examples[i] for i in idx]
    return pick[n_val + n_test:], pick[:n_val], pick[n_val:n_val + n_test]


def label_vocab(labels: Sequence[str]) -> list[str]:
    """Sorted label set (for BIO tags: "O" first, then by entity type, B before I)."""
    uniq = set(labels)
    if uniq and all(t == "O" or t[:2] in ("B-", "I-") for t in uniq):
        return sorted(uniq, key=lambda t: (t != "O", t[2:], t[:1]))
    return sorted(uniq)


def check_labels(labels: Sequence[str], known: Sequence[str], where: str) -> None:
    """Raise if `labels` holds a label the model was not trained on."""
    unknown = sorted(set(labels) - set(known))
    if unknown:
        raise LlmkitError(f"{where} has label(s) {unknown[:5]} not among the training labels {list(known)[:10]}; "
                          "fix the data or add examples of them to the training set")


# ----------------------------------------------------------------------------------------------- encoding


def prepare_tokenizer(tok: Tokenizer) -> Tokenizer:
    """Turn off any padding/truncation baked into tokenizer.json (MiniLM pads to 128): we pad per batch."""
    tok.tok.no_padding()
    tok.tok.no_truncation()
    return tok


def wrap_ids(tok: Tokenizer, arch: str) -> tuple[list[int], list[int]]:
    """Special ids placed around a text: encoder [CLS] ... [SEP]; decoder ... <eos> (the pooled last token)."""
    if arch == "encoder":
        cls_id, sep_id = tok.special_id("cls"), tok.special_id("sep")
        return ([cls_id] if cls_id is not None else []), ([sep_id] if sep_id is not None else [])
    eos = tok.eos_id
    return [], ([eos] if eos is not None else [])


def encode_texts(tok: Tokenizer, texts: Sequence[str], arch: str, max_len: int) -> list[list[int]]:
    """Token ids per text with specials added, truncated to max_len (the closing special is kept)."""
    head, tail = wrap_ids(tok, arch)
    room = max_len - len(head) - len(tail)
    return [head + ids[:room] + tail for ids in tok.encode_batch(list(texts))]


def encode_tagged(tok: Tokenizer, words: list[str], tags: list[int] | None, arch: str, max_len: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """Encode pre-split words -> (ids, labels, word_index). Labels: the word's tag on its first sub-token,
    -100 on later sub-tokens and specials. word_index: position of each word's first sub-token (-1 if cut)."""
    enc = tok.tok.encode(words, is_pretokenized=True, add_special_tokens=False)
    head, tail = wrap_ids(tok, arch)
    room = max_len - len(head) - len(tail)
    ids = list(head)
    labels = [-100] * len(head)
    first = [-1] * len(words)
    prev = None
    for tid, w in zip(enc.ids[:room], enc.word_ids[:room]):
        is_first = w is not None and w != prev
        if is_first:
            first[w] = len(ids)
        labels.append(tags[w] if is_first and tags is not None else -100)
        ids.append(tid)
        prev = w
    return ids + tail, labels + [-100] * len(tail), first


