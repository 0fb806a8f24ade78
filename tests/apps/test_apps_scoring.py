"""Recipe metrics: SQuAD EM/F1, ROUGE (rouge-score), BLEU/chrF (sacrebleu), per-field F1, JSON validation."""

from __future__ import annotations

import pytest

from llmkit.apps.common import exact_match, normalize_answer, token_f1
from llmkit.apps.extract import field_scores, parse_json_object
from llmkit.apps.qa import qa_scores
from llmkit.apps.summarize import rouge_scores
from llmkit.errors import LlmkitError
from llmkit.metrics.translation import auto_bleu_tokenize, score_translations


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Andromeda Galaxy.", "Andromeda galaxy") == 1.0
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    s = qa_scores(["Richard Nixon", "1964", "Paris France"], [["Nixon", "Richard Nixon"], ["1963"], ["Paris"]])
    assert s["exact_match"] == pytest.approx(100 / 3)  # only the first is exact
    assert s["f1"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)  # Paris France vs Paris: P 1/2, R 1 -> 2/3
    with pytest.raises(LlmkitError, match="no non-empty reference"):
        qa_scores(["x"], [[" "]])


def test_rouge_known_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 words -> ROUGE-L F = 5/6
    s = rouge_scores(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert s["rougeL"] == pytest.approx(100 * 5 / 6)
    assert s["rouge1"] == pytest.approx(100 * 5 / 6)
    assert s["rouge2"] == pytest.approx(100 * 3 / 5)  # bigrams: the-cat, on-the, the-mat of 5
    assert rouge_scores(["running dogs"], ["dogs run"])["rouge1"] == pytest.approx(100.0)  # Porter stemming
    with pytest.raises(LlmkitError, match="reference summary 2 is empty"):
        rouge_scores(["a", "b"], ["a", ""])


def test_bleu_tokenizer_for_japanese_changes_the_score():
    refs = ["元始に神天地を創造たまへり", "神光あれと言たまひければ光ありき"]
    hyps = ["元始に神天地を創造たまへり", "神光あれと言たまひけり"]
    assert auto_bleu_tokenize(refs) == "ja-mecab"
    assert auto_bleu_tokenize(["In the beginning"]) == "13a"
    ja = score_translations(hyps, refs)
    assert ja["bleu_tokenize"] == "ja-mecab" and 0 < ja["bleu"] < 100
    # 13a splits on spaces only: each Japanese sentence is one "word", so the partial match scores ~0
    assert score_translations(hyps, refs, "13a")["bleu"] < ja["bleu"]
    assert score_translations(refs, refs)["bleu"] == pytest.approx(100.0)
    with pytest.raises(LlmkitError, match="every reference is empty"):
        score_translations(["a"], [""])
    with pytest.raises(LlmkitError, match="one reference per translation"):
        score_translations(["a", "b"], ["a"])


def test_field_f1_counts():
    gold = [{"person": "Ray Rice", "location": None}, {"person": None, "location": "Paris"},
            {"person": "Obama", "location": "Berlin"}]
    pred = [{"person": "ray rice", "location": "Baltimore"}, {"person": None, "location": "paris."},
            {"person": "Biden", "location": None}]
    s = field_scores(pred, gold, ["person", "location"])
    # person: tp 1 (ray rice), fp 1 + fn 1 (Biden vs Obama) -> 2/4; location: tp 1, fp 1 (Baltimore), fn 1 (Berlin)
    assert s["f1_person"] == pytest.approx(100 * 2 / 4)
    assert s["f1_location"] == pytest.approx(100 * 2 / 4)
    assert s["f1_micro"] == pytest.approx(100 * 4 / 8)


def test_parse_json_object():
    fields = ["person", "location"]
    assert parse_json_object('Sure! {"person": "Ann", "location": null} done', fields) == \
        {"person": "Ann", "location": None}
    assert parse_json_object('{"person": "Ann"}', fields) is None  # a field is missing
    assert parse_json_object('{"person": "Ann", "location": ', fields) is None  # truncated
    assert parse_json_object('x {bad} {"person": "", "location": "Rome"}', fields) == {"person": None, "location": "Rome"}
