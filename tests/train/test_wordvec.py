"""Word vectors on real text (World English Bible): neighbours and analogies that make sense."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.data.corpus import bible_verses
from llmkit.errors import LlmkitError
from llmkit.train.wordvec import load_vectors, most_similar, train_vectors, words


@pytest.fixture(scope="module")
def bible_cbow():
    """CBOW, 50 dims, 5 epochs on all 31k verses (765k words): ~8 s on 2 cores."""
    sents = [words(v) for v in bible_verses()]
    return train_vectors(sents, "word2vec", "cbow", vector_size=50, window=5, min_count=5, epochs=5,
                         workers=1, seed=0).wv  # one worker: gensim is reproducible only then


def _top(kv, word, n, **kw) -> list[str]:
    return [w for w, _ in most_similar(kv, word, n, **kw)]


def test_neighbours_make_sense(bible_cbow) -> None:
    kv = bible_cbow
    # tolerance: the expected word must be within the first few neighbours, not necessarily first
    assert "silver" in _top(kv, "gold", 3)
    assert "flock" in _top(kv, "sheep", 5)
    assert "judah" in _top(kv, "jerusalem", 10)
    numbers = {"one", "two", "three", "four", "five", "six", "eight", "nine", "ten", "twelve", "twenty", "thirty",
               "forty", "fifty", "seventy", "hundred", "thousand", "sixty", "fourteen", "eleven", "months", "days"}
    assert len(numbers & set(_top(kv, "seven", 8))) >= 4
    # related pairs are closer than unrelated ones
    assert kv.similarity("father", "mother") > kv.similarity("father", "gold") + 0.2
    assert kv.similarity("sheep", "goats") > kv.similarity("sheep", "prophet") + 0.2


def test_analogy_king_man_woman_is_queen(bible_cbow) -> None:
    assert "queen" in _top(bible_cbow, "king", 3, plus=["woman"], minus=["man"])


def test_most_similar_matches_numpy_cosine(bible_cbow) -> None:
    """Our ranking equals a brute-force cosine ranking over the whole vocabulary."""
    kv = bible_cbow
    m = kv.vectors / np.linalg.norm(kv.vectors, axis=1, keepdims=True)
    q = m[kv.key_to_index["gold"]]
    order = [kv.index_to_key[i] for i in np.argsort(-(m @ q)) if kv.index_to_key[i] != "gold"][:10]
    assert _top(kv, "gold", 10) == order


def test_unknown_word_is_a_clear_error(bible_cbow, tmp_path, capsys) -> None:
    with pytest.raises(LlmkitError, match="'qwertyuiop' is not in the vocabulary"):
        most_similar(bible_cbow, "qwertyuiop")
    bible_cbow.save_word2vec_format(str(tmp_path / "vectors.bin"), binary=True)
    assert main(["wordvec", "similar", "Moses", "--vectors", str(tmp_path), "--topn", "3"]) == 0  # lowercased
    capsys.readouterr()
    assert main(["wordvec", "similar", "qwertyuiop", "--vectors", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not in the vocabulary" in err and err.count("\n") == 1


def test_words_splits_letters_and_cjk() -> None:
    assert words("In the beginning, God's 7 days; 起初神创造天地") == \
        ["in", "the", "beginning", "god's", "days", "起", "初", "神", "创", "造", "天", "地"]


def test_cli_fasttext_roundtrip_and_errors(tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    rc = main(["wordvec", "train", "--data", "bible", "--out", str(out), "--model", "fasttext",
               "--vector_size", "32", "--epochs", "2", "--min_count", "3", "--max_docs", "2000", "--buckets", "20000"])
    assert rc == 0
    meta = json.loads((out / "wordvec.json").read_text())
    assert meta["model"] == "fasttext" and meta["vocab_size"] > 500
    assert {"wordsim353_spearman", "analogy_accuracy"} <= set(meta)
    kv = load_vectors(out)
    unseen = "beginningless"
    assert unseen not in kv.key_to_index
    assert main(["wordvec", "similar", unseen, "--vectors", str(out), "--topn", "3"]) == 0
    assert "nearest to beginningless" in capsys.readouterr().out  # FastText: composed from n-grams
    (tmp_path / "empty").mkdir()
    assert main(["wordvec", "similar", "god", "--vectors", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no word vectors" in err and err.count("\n") == 1
