"""Classic word vectors (the seeds' embeddings chapter): Word2Vec CBOW / skip-gram and FastText via gensim.

`llmkit wordvec train` learns vectors from a corpus (the named `bible` corpus, a text file or a folder) and
checks them on the word-similarity (WordSim-353) and analogy (Mikolov's questions-words) sets that ship
inside gensim; `llmkit wordvec similar` queries neighbours and analogies. Files are standard formats:
word2vec C binary (`vectors.bin`) or Facebook's FastText binary (`fasttext.bin`), plus `wordvec.json`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from llmkit.data.corpus import iter_documents
from llmkit.errors import LlmkitError
from llmkit.io import atomic_folder

META = "wordvec.json"
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W\d_]+(?:['’][^\W\d_]+)*")


def words(text: str, lowercase: bool = True) -> list[str]:
    """Split text into words: letter runs (keeping inner apostrophes), each CJK character on its own."""
    return _WORD.findall(text.lower() if lowercase else text)


class _Sentences:
    """A re-iterable corpus of tokenised documents (gensim walks it once per epoch plus once for the vocab)."""

    def __init__(self, data: str, lowercase: bool, max_docs: int | None):
        self.data, self.lowercase, self.max_docs = data, lowercase, max_docs

    def __iter__(self) -> Iterator[list[str]]:
        for i, doc in enumerate(iter_documents(self.data)):
            if self.max_docs is not None and i >= self.max_docs:
                return
            w = words(doc, self.lowercase)
            if w:
                yield w


def train_vectors(sentences: Iterable[list[str]], model: Literal["word2vec", "fasttext"] = "word2vec",
                  algorithm: Literal["cbow", "skipgram"] = "skipgram", vector_size: int = 100, window: int = 5,
                  min_count: int = 5, epochs: int = 5, workers: int = 2, seed: int = 0, buckets: int = 200_000) -> Any:
    """Train a gensim Word2Vec or FastText model on tokenised sentences and return it.

    buckets: FastText's hashed n-gram table size (gensim's default 2M x 100 dims is an 800 MB file).
    """
    from gensim.models import FastText, Word2Vec

    for name, v in (("vector_size", vector_size), ("window", window), ("min_count", min_count),
                    ("epochs", epochs), ("workers", workers), ("buckets", buckets)):
        if v <= 0:
            raise LlmkitError(f"{name} must be a positive integer, got {v}")
    cls = FastText if model == "fasttext" else Word2Vec
    kw: dict[str, Any] = {"bucket": buckets} if model == "fasttext" else {}
    m = cls(vector_size=vector_size, window=window, min_count=min_count, workers=workers, seed=seed,
            sg=1 if algorithm == "skipgram" else 0, **kw)
    m.build_vocab(sentences)
    if len(m.wv) == 0:
        raise LlmkitError(f"no word occurs at least min_count={min_count} times; lower --min_count or add text")
    m.train(sentences, total_examples=m.corpus_count, epochs=epochs)
    return m


def quality_checks(kv: Any) -> dict[str, float]:
    """WordSim-353 Spearman correlation and questions-words analogy accuracy, with coverage (gensim's sets)."""
    import warnings

    from gensim.test.utils import datapath

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson, spearman, oov = kv.evaluate_word_pairs(datapath("wordsim353.tsv"))
        acc, sections = kv.evaluate_word_analogies(datapath("questions-words.txt"))
    total = next((s for s in sections if s["section"] == "Total accuracy"), {"correct": [], "incorrect": []})
    n_analogies = len(total["correct"]) + len(total["incorrect"])
    return {"wordsim353_spearman": round(float(spearman[0]), 4), "wordsim353_pairs_covered_pct": round(100 - oov, 1),
            "analogy_accuracy": round(float(acc), 4), "analogy_questions_covered": n_analogies}


def wordvec_train(*, data: str, out: str, model: Literal["word2vec", "fasttext"] = "word2vec",
                  algorithm: Literal["cbow", "skipgram"] = "skipgram", vector_size: int = 100, window: int = 5,
                  min_count: int = 5, epochs: int = 5, workers: int = 2, seed: int = 0, lowercase: bool = True,
                  max_docs: int | None = None, buckets: int = 200_000) -> dict[str, Any]:
    """Train word vectors on a corpus, save them to OUT and report similarity/analogy scores.

    Args:
        data: a named corpus (`bible`), a UTF-8 text file (one document per line) or a folder of .txt files.
        out: output folder: vectors.bin (word2vec) or fasttext.bin (FastText), and wordvec.json.
        model: word2vec, or fasttext (subword n-grams: vectors even for words never seen).
        algorithm: cbow (predict a word from its context) or skipgram (predict the context from a word).
        vector_size: dimensions per word.
        window: context words on each side.
        min_count: ignore words seen fewer times.
        epochs: passes over the corpus.
        workers: training threads (1 makes runs reproducible).
        seed: random seed.
        lowercase: lowercase the text first.
        max_docs: use only the first N documents (quick runs).
        buckets: FastText only: size of the hashed character n-gram table.

    Examples:
        llmkit wordvec train --data bible --out runs/wv --algorithm skipgram
        llmkit wordvec train --data bible --out runs/wv-cbow --algorithm cbow --epochs 10
        llmkit wordvec train --data corpus.txt --out runs/ft --model fasttext
    """
    t0 = time.perf_counter()
    m = train_vectors(_Sentences(data, lowercase, max_docs), model, algorithm, vector_size, window, min_count,
                      epochs, workers, seed, buckets)
    seconds = time.perf_counter() - t0
    kv = m.wv
    checks = quality_checks(kv)
    meta = {"model": model, "algorithm": algorithm, "data": data, "vocab_size": len(kv),
            "vector_size": vector_size, "window": window, "min_count": min_count, "epochs": epochs,
            "lowercase": lowercase, "corpus_words": int(m.corpus_total_words), "train_seconds": round(seconds, 1),
            **checks}
    folder = Path(out)
    with atomic_folder(folder) as tmp:
        if model == "fasttext":
            from gensim.models.fasttext import save_facebook_model

            save_facebook_model(m, str(tmp / "fasttext.bin"))
        else:
            kv.save_word2vec_format(str(tmp / "vectors.bin"), binary=True)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{model} {algorithm}: {len(kv):,} words x {vector_size} dims from {meta['corpus_words']:,} words "
          f"in {seconds:.1f}s -> {folder}")
    print(f"WordSim-353 Spearman {checks['wordsim353_spearman']:.3f} on {checks['wordsim353_pairs_covered_pct']}% "
          f"of pairs; analogy accuracy {checks['analogy_accuracy']:.3f} on {checks['analogy_questions_covered']} "
          "questions (the rest have out-of-vocabulary words)")
    return meta


def load_vectors(folder: str | Path) -> Any:
    """The KeyedVectors saved by `wordvec_train` (FastTextKeyedVectors for a FastText folder)."""
    folder = Path(folder)
    if (folder / "fasttext.bin").exists():
        from gensim.models.fasttext import load_facebook_vectors

        return load_facebook_vectors(str(folder / "fasttext.bin"))
    if (folder / "vectors.bin").exists():
        from gensim.models import KeyedVectors

        return KeyedVectors.load_word2vec_format(str(folder / "vectors.bin"), binary=True)
    raise LlmkitError(f"{folder} holds no word vectors (vectors.bin or fasttext.bin); "
                      "train some with `llmkit wordvec train --data bible --out " + str(folder) + "`")


def _check_known(kv: Any, word: str) -> None:
    if word in kv.key_to_index:
        return
    if getattr(kv, "bucket", 0):  # FastText: an unseen word is composed from its character n-grams
        return
    raise LlmkitError(f"word {word!r} is not in the vocabulary ({len(kv):,} words); check the spelling and "
                      "case (training lowercases by default), lower --min_count, or train --model fasttext")


def most_similar(kv: Any, word: str, topn: int = 10, plus: list[str] | None = None,
                 minus: list[str] | None = None) -> list[tuple[str, float]]:
    """Nearest words by cosine similarity to word (+ plus - minus): the analogy king - man + woman."""
    if topn <= 0:
        raise LlmkitError(f"topn must be positive, got {topn}")
    for w in [word, *(plus or []), *(minus or [])]:
        _check_known(kv, w)
    res = kv.most_similar(positive=[word, *(plus or [])], negative=list(minus or []), topn=topn)
    return [(w, float(s)) for w, s in res]


def wordvec_similar(word: str, *, vectors: str = "runs/wv", topn: int = 10, plus: str | None = None,
                    minus: str | None = None, lowercase: bool = True) -> list[tuple[str, float]]:
    """Print the words nearest to WORD, or solve an analogy WORD - minus + plus.

    Args:
        word: the query word.
        vectors: folder written by `llmkit wordvec train`.
        topn: how many neighbours to print.
        plus: word(s) to add for an analogy, comma-separated, e.g. woman in king - man + woman.
        minus: word(s) to subtract for an analogy, comma-separated, e.g. man.
        lowercase: lowercase the query words (as training does by default).

    Examples:
        llmkit wordvec similar moses --vectors runs/wv
        llmkit wordvec similar king --minus man --plus woman --vectors runs/wv --topn 5
    """
    kv = load_vectors(vectors)
    norm = (lambda s: s.lower()) if lowercase else (lambda s: s)
    word = norm(word)
    plus_w = [norm(w.strip()) for w in (plus or "").split(",") if w.strip()]
    minus_w = [norm(w.strip()) for w in (minus or "").split(",") if w.strip()]
    res = most_similar(kv, word, topn, plus_w, minus_w)
    query = word + "".join(f" - {w}" for w in minus_w) + "".join(f" + {w}" for w in plus_w)
    print(f"nearest to {query}:")
    for w, s in res:
        print(f"  {w:<20} {s:.3f}")
    return res
