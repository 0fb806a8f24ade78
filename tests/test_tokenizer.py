"""Tokenizers: lossless byte-level BPE (Chinese included), WordPiece, char-level, errors, save/load."""

import pytest

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer, train_from_iterator

MIXED = ["In the beginning God created the heavens and the earth.", "起初，神创造天地。地是空虚混沌，渊面黑暗。",
         "emoji 🙂 and tabs\tand  double  spaces\n", "Ünïcödé ﬁ ligatures ＦＵＬＬ"]


@pytest.fixture(scope="module")
def bpe(bible_sample):
    return train_from_iterator(bible_sample[:1000] + MIXED, "bpe", vocab_size=600, show_progress=False)


@pytest.mark.parametrize("text", MIXED + ["never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ 한국어"])
def test_byte_level_bpe_round_trips_any_utf8(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_specials(bpe):
    assert bpe.vocab_size == 600
    assert len(bpe.encode("the heavens and the earth")) < len("the heavens and the earth") / 2
    assert bpe.eos_id is not None and bpe.decode([bpe.eos_id], skip_special_tokens=False) == "<|endoftext|>"


def test_wordpiece_handles_chinese_and_adds_cls_sep(bible_sample):
    tok = train_from_iterator(bible_sample[:500] + MIXED * 20, "wordpiece", vocab_size=800, show_progress=False)
    ids = tok.encode("起初 God", add_special_tokens=True)
    pieces = [tok.tok.id_to_token(i) for i in ids]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert "起" in pieces and "初" in pieces  # CJK characters are split one per token
    assert tok.special_id("mask") is not None


def test_char_tokenizer_is_one_token_per_character():
    tok = train_from_iterator(["hello\nworld"], "char", vocab_size=1000, show_progress=False)
    assert len(tok.encode("hello\nworld")) == 11
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"


def test_too_small_vocab_and_empty_corpus_are_errors():
    with pytest.raises(LlmkitError, match="too small"):
        train_from_iterator(["abc"], "bpe", vocab_size=100)
    with pytest.raises(LlmkitError, match="empty"):
        train_from_iterator([], "bpe", vocab_size=400)


def test_save_and_load_keeps_roles(bpe, tmp_path):
    bpe.chat_template = "{{ messages[0]['content'] }}"
    bpe.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.specials == bpe.specials and back.chat_template == bpe.chat_template
    assert back.encode("起初") == bpe.encode("起初")
    with pytest.raises(LlmkitError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "nope")
