"""Evaluation metrics as thin wrappers: classification (scikit-learn), NER entities (seqeval), and plots.

Reports are plain dicts of floats so they go straight into results JSON and metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.io import atomic_file


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted precision/recall/F1 and per-label P/R/F1/support (sklearn)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = list(labels)
    out: dict[str, Any] = {"n": len(y_true), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_label"] = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, lab in enumerate(labels)}
    return out


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Confusion matrix: rows = true label, columns = predicted label, in `labels` order."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()


def ner_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level P/R/F1 (an entity counts only if its type and exact span match), micro and per type."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.metrics import classification_report as seqeval_report

    y_true, y_pred = [list(s) for s in y_true], [list(s) for s in y_pred]
    per = seqeval_report(y_true, y_pred, output_dict=True, zero_division=0)
    out: dict[str, Any] = {
        "n_sentences": len(y_true),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "token_accuracy": float(accuracy_score(y_true, y_pred)),
        "per_type": {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                         "support": int(v["support"])} for k, v in per.items() if " avg" not in k},
    }
    return out


def plot_confusion(matrix: list[list[int]], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save a confusion-matrix heat map with counts in each cell (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((max(r) for r in matrix), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
