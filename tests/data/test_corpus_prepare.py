"""Corpus reading, cleaning and token shards."""

import numpy as np
import pytest

from llmkit.data.clean import Cleaner, clean, strip_html
from llmkit.data.corpus import bible_verses, iter_documents, read_corpus
from llmkit.data.prepare import load_shards, prepare
from llmkit.errors import LlmkitError


def test_bible_corpus_is_complete_and_notes_are_stripped():
    verses = list(bible_verses())
    assert len(verses) == 31095  # 31,102 rows; 7 verses are empty in the WEB (merged into neighbours)
    assert verses[0] == "In the beginning God created the heavens and the earth."
    assert not any("{" in v for v in verses[:2000])


def test_strip_html_drops_tags_scripts_and_entities():
    assert strip_html("<p>Tom &amp; Jerry</p><script>alert(1)</script><style>p{}</style>") == " Tom & Jerry"
    assert strip_html("a < b and c > d") == "a < b and c > d"  # plain text with angle brackets is kept


def test_cleaner_steps_and_counts():
    c = Cleaner(lowercase=True, stopwords="english", stem="english")
    assert c.clean("<b>The</b> runners   were RUNNING!") == "runner run!"
    assert c.clean("ＦＵＬＬ-width　ｃｌｅａｎｉｎｇ") == "full-width clean"  # NFKC folds full-width forms
    assert c.clean("the runners were running!") is None  # same text after cleaning: a duplicate
    assert c.clean("   ") is None
    assert c.counts["kept"] == 2 and c.counts["dropped_duplicate"] == 1 and c.counts["dropped_empty"] == 1


def test_clean_command_streams_documents(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("Para one\nline two\n\nPara one\nline two\n\n<i>Other</i> para\n", encoding="utf-8")
    counts = clean(data=str(src), out=str(tmp_path / "out.txt"), unit="document")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "Para one line two\n\nOther para\n\n"
    assert counts["input"] == 3 and counts["dropped_duplicate"] == 1


def test_clean_chinese_keeps_text_and_dedups(tmp_path):
    src = tmp_path / "zh.txt"
    src.write_text("起初，神创造天地。\n起初，神创造天地。\n<p>地是空虚混沌</p>\n", encoding="utf-8")
    clean(data=str(src), out=str(tmp_path / "o.txt"))
    assert (tmp_path / "o.txt").read_text(encoding="utf-8") == "起初,神创造天地。\n地是空虚混沌\n"


def test_bad_corpora_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LlmkitError, match="no such corpus"):
        read_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(LlmkitError, match="empty"):
        read_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(LlmkitError, match="not UTF-8"):
        list(iter_documents(str(tmp_path / "latin1.txt")))
    with pytest.raises(LlmkitError, match="unknown|no stop-word"):
        Cleaner(stopwords="klingon")
    with pytest.raises(LlmkitError, match="empty"):
        clean(data=str(tmp_path / "empty.txt"), out=str(tmp_path / "o.txt"))
    assert not (tmp_path / "o.txt").exists()  # nothing half-written


def test_prepare_splits_90_10_by_characters(tmp_path, bpe_tokenizer, shakespeare_path):
    from llmkit.tokenizer import train_from_iterator

    text = shakespeare_path.read_text(encoding="utf-8")
    tok = train_from_iterator([text], "char", vocab_size=1000, show_progress=False)
    tok.save(tmp_path / "tok")
    meta = prepare(data=str(shakespeare_path), tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "sh"))
    assert (meta["n_train"], meta["n_val"]) == (1003854, 111540)  # nanoGPT's standard split
    train, val, _ = load_shards(tmp_path / "sh")
    assert train.dtype == np.uint16
    assert tok.decode(val[:14].tolist()) == text[1003854 : 1003854 + 14]


def test_prepare_uses_uint32_for_big_vocabularies(tmp_path, monkeypatch, bpe_tokenizer):
    (tmp_path / "c.txt").write_text("hello world\n" * 50)
    bpe_tokenizer.save(tmp_path / "tok")
    from llmkit.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70000))
    prepare(data=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d"))
    assert load_shards(tmp_path / "d")[0].dtype == np.uint32
    with pytest.raises(LlmkitError, match="not a prepared data folder"):
        load_shards(tmp_path)


def _word_tokenizer(folder, words):
    """A word-level tokenizer (whitespace split) with an end-of-text token: fast for big synthetic corpora."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from llmkit.tokenizer import Tokenizer

    vocab = {w: i for i, w in enumerate([*words, "<unk>", "<|endoftext|>"])}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    Tokenizer(hf).save(folder)
    return Tokenizer.load(folder)


def test_end_of_text_between_documents(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok", ["a", "b", "c", "d"])
    eot = tok.eos_id
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("a a\n\nb b\n", encoding="utf-8")
    (tmp_path / "docs" / "2.txt").write_text("c c\nd d\n", encoding="utf-8")

    def ids(document):
        prepare(data=str(tmp_path / "docs"), tokenizer=str(tmp_path / "tok"), out=str(tmp_path / document),
                val_fraction=0.3, document=document)
        train, val, _ = load_shards(tmp_path / document)
        return train.tolist() + val.tolist()

    a, b, c, d = (tok.encode(w)[0] for w in "abcd")
    assert ids("file") == [a, a, b, b, eot, c, c, d, d]  # one document per file
    assert ids("paragraph") == [a, a, eot, b, b, eot, c, c, d, d]  # blank lines and files end documents
    assert ids("none") == [a, a, b, b, c, c, d, d]  # the old behaviour: no boundaries
    with pytest.raises(LlmkitError, match="applies to the bible"):
        ids("book")


def test_bible_documents_are_books():
    from llmkit.data.prepare import stream

    items = list(stream("bible"))
    assert items.count(None) == 65  # 66 books
    first = items.index(None)
    assert items[first - 1].startswith("Abraham breathed his last") or "Genesis" not in items[first - 1]
    assert items[first + 1].startswith("Now these are the names of the sons of Israel")  # Exodus 1:1


def test_prepare_streams_in_bounded_memory(tmp_path):
    """Peak RSS growth while preparing a 32 MB corpus stays under an 8 MB cap (the old code held the text,
    its lines and int64 ids: several times the corpus)."""
    import subprocess
    import sys

    word = "x" * 1000  # long words keep the tokenizer's share of the run short; the bytes are what matter
    _word_tokenizer(tmp_path / "tok", [word])
    line = " ".join([word] * 10) + "\n"
    with (tmp_path / "big.txt").open("w", encoding="utf-8") as f:
        for _ in range(32 * 2**20 // len(line) + 1):
            f.write(line)
    size = (tmp_path / "big.txt").stat().st_size
    cap = 8 * 2**20
    assert size >= 4 * cap
    code = (  # VmHWM is the peak RSS; writing 5 to clear_refs resets it to the current RSS (Linux)
        "import re, sys\n"
        "from llmkit.data.prepare import prepare\n"
        "from llmkit.tokenizer import Tokenizer\n"
        "def kb(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "Tokenizer.load(sys.argv[2]).encode_batch(['x'])\n"  # warm the tokenizer's own buffers first
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "prepare(data=sys.argv[1], tokenizer=sys.argv[2], out=sys.argv[3])\n"
        "print((kb('VmHWM') - before) * 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.txt"), str(tmp_path / "tok"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    growth = int(r.stdout.strip().splitlines()[-1])
    print(f"corpus {size / 2**20:.1f} MiB, peak RSS growth {growth / 2**20:.2f} MiB (cap {cap / 2**20:.0f} MiB)")
    assert growth < cap
    assert load_shards(tmp_path / "out")[0].size + load_shards(tmp_path / "out")[1].size == size // len(line) * 10
