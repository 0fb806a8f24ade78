"""Metrics: classification report (hand-computed values and scikit-learn), seqeval NER report, confusion
matrix PNG, and perplexity (uniform model = vocab size; windows agree with the model's own loss)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmkit.evaluate.perplexity import perplexity_of_ids
from llmkit.metrics.classification import classification_report, confusion, ner_report, plot_confusion


def test_classification_report_hand_computed():
    # a: tp1 fp1 fn1 -> P=R=F=.5; b: tp2 fp1 fn0 -> P=2/3 R=1 F=.8; c: never predicted -> 0
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["per_label"]["b"]["precision"] == pytest.approx(2 / 3)
    assert r["per_label"]["b"]["f1"] == pytest.approx(0.8)
    assert r["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert r["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert r["micro_f1"] == pytest.approx(0.6)  # single-label: micro P = R = F1 = accuracy
    assert r["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 0) / 5)
    assert confusion(y_true, y_pred, ["a", "b", "c"]) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_classification_report_matches_sklearn_random():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(0)
    labels = ["neg", "neu", "pos", "rare"]
    for _ in range(20):
        n = rng.randint(5, 60)
        y_true = [rng.choice(labels[:3]) for _ in range(n)]  # "rare" never true: zero-support label
        y_pred = [rng.choice(labels) for _ in range(n)]
        r = classification_report(y_true, y_pred, labels)
        assert r["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        for avg in ("macro", "micro", "weighted"):
            kw = dict(labels=labels, average=avg, zero_division=0)
            assert r[f"{avg}_precision"] == pytest.approx(precision_score(y_true, y_pred, **kw), abs=1e-12)
            assert r[f"{avg}_recall"] == pytest.approx(recall_score(y_true, y_pred, **kw), abs=1e-12)
            assert r[f"{avg}_f1"] == pytest.approx(f1_score(y_true, y_pred, **kw), abs=1e-12)
        # per-label F1 from the confusion matrix, computed by hand: 2 tp / (2 tp + fp + fn)
        cm = confusion(y_true, y_pred, labels)
        for i, lab in enumerate(labels):
            tp = cm[i][i]
            fp = sum(cm[j][i] for j in range(4)) - tp
            fn = sum(cm[i]) - tp
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            assert r["per_label"][lab]["f1"] == pytest.approx(f1, abs=1e-12)


def test_ner_report_entity_level():
    from seqeval.metrics import f1_score

    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # PER span cut short (wrong), LOC right, ORG missed, one spurious LOC
    y_pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-LOC"]]
    r = ner_report(y_true, y_pred)
    # 3 gold entities, 3 predicted, 1 exact match -> P = R = F1 = 1/3
    assert r["precision"] == pytest.approx(1 / 3)
    assert r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert r["per_type"]["LOC"]["precision"] == pytest.approx(0.5)
    assert r["per_type"]["LOC"]["recall"] == pytest.approx(1.0)
    assert r["per_type"]["PER"]["f1"] == 0.0 and r["per_type"]["ORG"]["support"] == 1
    assert r["token_accuracy"] == pytest.approx(3 / 6)


def test_confusion_png(tmp_path):
    path = plot_confusion([[5, 1], [2, 7]], ["fresh", "rotten"], tmp_path / "cm.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.fixture(scope="module")
def tiny_lm():
    from llmkit.models.build import build_model
    from llmkit.models.config import preset

    torch.manual_seed(0)
    return build_model(preset("gpt2-tiny", vocab_size=97, block_size=16, n_layer=1)).eval()


def test_perplexity_of_uniform_model_is_vocab_size(tiny_lm):
    import copy

    model = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all 0 -> uniform over 97 tokens
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    for stride in (16, 5):
        r = perplexity_of_ids(model, ids, block_size=16, stride=stride)
        assert r["perplexity"] == pytest.approx(97.0, rel=1e-5)
        assert r["n_tokens"] == 49  # every token after the first scored exactly once


def test_perplexity_matches_direct_loss(tiny_lm):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    # non-overlapping windows [0,16) [16,32) [32,40): the window's first token has no context in it
    # except from the window itself, so the reference is the token-weighted mean of per-window losses
    nll, n = 0.0, 0
    for s in (0, 15, 30):  # windows overlap by one token so every next-token target is predicted once
        x = torch.tensor(ids[s:s + 16])[None]
        with torch.no_grad():
            out = tiny_lm(x[:, :-1], x[:, 1:])
        nll += out.loss.item() * (x.size(1) - 1)
        n += x.size(1) - 1
    r = perplexity_of_ids(tiny_lm, ids, block_size=16, stride=15)
    assert r["n_tokens"] == n == 39
    assert r["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
