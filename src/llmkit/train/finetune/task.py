"""The fine-tuning `Task` for the shared training loop: one or more heads (classification / NER) on one backbone.

Each step draws one batch per head and returns loss = Σ wᵢ·Lᵢ (a single head is the case n = 1). Batches are
a pure function of (step, micro, seed), so resuming needs no data state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from llmkit.data.batching import pad_batch
from llmkit.data.labeled import check_labels, encode_tagged, encode_texts, label_vocab
from llmkit.errors import LlmkitError
from llmkit.metrics.classification import classification_report, ner_report
from llmkit.models.heads import TaskModel
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import dist_info, rank_slice


@dataclass
class Encoded:
    """Token ids of one split, with labels per sequence (classify) or per token (ner)."""

    ids: list[list[int]]
    labels: list[Any]  # classify: int per example; ner: list[int] per example (-100 where no loss)
    words: list[list[str]] = field(default_factory=list)  # ner: the words, to map predictions back
    tags: list[list[str]] = field(default_factory=list)  # ner: gold tags per word
    first: list[list[int]] = field(default_factory=list)  # ner: first sub-token index per word (-1: cut off)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class HeadData:
    """One head's task: its kind, label list, loss weight and encoded splits."""

    name: str
    kind: Literal["classify", "ner"]
    labels: list[str]
    train: Encoded
    val: Encoded | None = None
    test: Encoded | None = None
    weight: float = 1.0
    class_weights: torch.Tensor | None = None
    pooling: str | None = None

    def spec(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": self.kind, "labels": self.labels, "weight": self.weight}
        if self.kind == "classify":
            s["pooling"] = self.pooling
        return s


def encode_classify(tok: Tokenizer, examples: Sequence[tuple[str, str]], labels: list[str], arch: str,
                    max_len: int, where: str) -> Encoded:
    check_labels([lab for _, lab in examples], labels, where)
    index = {lab: i for i, lab in enumerate(labels)}
    return Encoded(encode_texts(tok, [t for t, _ in examples], arch, max_len), [index[lab] for _, lab in examples])


def encode_ner(tok: Tokenizer, examples: Sequence[tuple[list[str], list[str]]], labels: list[str], arch: str,
               max_len: int, where: str) -> Encoded:
    check_labels([t for _, tags in examples for t in tags], labels, where)
    index = {lab: i for i, lab in enumerate(labels)}
    enc = Encoded([], [])
    for words, tags in examples:
        ids, lab, first = encode_tagged(tok, words, [index[t] for t in tags], arch, max_len)
        enc.ids.append(ids)
        enc.labels.append(lab)
        enc.words.append(words)
        enc.tags.append(tags)
        enc.first.append(first)
    return enc


def labels_from(kind: str, examples: Sequence) -> list[str]:
    if kind == "classify":
        labels = label_vocab([lab for _, lab in examples])
        if len(labels) < 2:
            raise LlmkitError(f"classification needs at least 2 labels in the training data, found {labels}")
        return labels
    return label_vocab([t for _, tags in examples for t in tags])


def balanced_weights(enc: Encoded, n_labels: int) -> torch.Tensor:
    """Class weights n / (k · count_c) (sklearn's "balanced"), so rare classes count as much as common ones."""
    counts = torch.bincount(torch.tensor(enc.labels), minlength=n_labels).float()
    return len(enc) / (n_labels * counts.clamp(min=1))


class FinetuneTask:
    """Implements the training loop's Task protocol for a `TaskModel` and its heads' data."""

    def __init__(self, heads: list[HeadData], pad_id: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 eval_batch_size: int = 64, device: str = "cpu"):
        self.heads, self.pad_id, self.batch_size, self.grad_accum = heads, pad_id, batch_size, grad_accum
        self.seed, self.eval_batch_size, self.device = seed, eval_batch_size, device
        self.multi = len(heads) > 1
        self.global_batch = batch_size * dist_info()[1]  # under torchrun each rank keeps its slice
        self._perm: dict[tuple[str, int], list[list[int]]] = {}
        self.steps_run = 0  # optimizer steps drawn so far (early stopping may end before max_steps)
        self.eval_seconds = 0.0  # time spent in evaluate(), to report training throughput without it

    # -- training batches -------------------------------------------------------------------------------
    def _epoch_batches(self, head: HeadData, epoch: int) -> list[list[int]]:
        """One epoch's batches: a seeded shuffle, cut into pools of 50 batches, each pool sorted by length
        (batches of similar length waste little on padding), then the batch order shuffled again."""
        key = (head.name, epoch)
        if key not in self._perm:
            if len(self._perm) > 8:  # keep only recent epochs
                self._perm.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(head.train), generator=g).tolist()
            B, pool = self.global_batch, self.global_batch * 50
            batches: list[list[int]] = []
            for s in range(0, len(order), pool):
                chunk = sorted(order[s:s + pool], key=lambda i: len(head.train.ids[i]))
                batches += [chunk[b:b + B] for b in range(0, len(chunk), B)]
            self._perm[key] = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return self._perm[key]

    def _collate(self, head: HeadData, enc: Encoded, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        if head.kind == "classify":
            b = pad_batch([enc.ids[i] for i in idx], self.pad_id)
            b["labels"] = torch.tensor([enc.labels[i] for i in idx], dtype=torch.long)
            return b
        return pad_batch([enc.ids[i] for i in idx], self.pad_id, [enc.labels[i] for i in idx])

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Batch k = step·accum + micro of an endless run of seeded epochs (per head); keys "{head}.{field}".

        Each head's slice carries its own loss_scale (see distributed.rank_slice): the heads' means differ.
        """
        out: dict[str, torch.Tensor] = {}
        k = step * self.grad_accum + micro
        self.steps_run = max(self.steps_run, step + 1)
        for head in self.heads:
            n_batches = math.ceil(len(head.train) / self.global_batch)
            idx = self._epoch_batches(head, k // n_batches)[k % n_batches]
            full = self._collate(head, head.train, idx)
            for key, t in rank_slice(full, self._row_weights(head, full["labels"])).items():
                out[f"{head.name}.{key}"] = t
        return out

    @staticmethod
    def _row_weights(head: HeadData, labels: torch.Tensor) -> torch.Tensor:
        """What each row adds to the denominator of the head's mean loss (labelled tokens / class weight)."""
        if head.kind == "ner":
            return (labels != -100).sum(1)
        return torch.ones(len(labels)) if head.class_weights is None else head.class_weights[labels]

    @staticmethod
    def _sub(batch: dict[str, torch.Tensor], name: str, device: str) -> dict[str, torch.Tensor]:
        p = f"{name}."
        return {k[len(p):]: v.to(device) for k, v in batch.items() if k.startswith(p)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ wᵢ · cross-entropy of head i on its batch."""
        total = None
        for head in self.heads:
            cw = head.class_weights.to(self.device) if head.class_weights is not None else None
            sub = self._sub(batch, head.name, self.device)
            li = head.weight * model.loss(head.name, sub, cw)
            if "loss_scale" in sub:
                li = li * sub["loss_scale"]
            total = li if total is None else total + li
        return total

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))

    def state_dict(self) -> dict:
        return {"seed": self.seed}  # batches depend only on (step, seed)

    def load_state_dict(self, d: dict) -> None:
        self.seed = d.get("seed", self.seed)

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """Loss and metrics of every head on `split`: {"val_loss", "accuracy"/"f1", ...}; prefixed per head
        ("sentiment/accuracy") when there are several, with val_loss = Σ wᵢ·lossᵢ."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        total, seen = 0.0, False
        for head in self.heads:
            enc = getattr(head, split)
            if enc is None or len(enc) == 0:
                continue
            res = self.predict(model, head, enc)
            seen = True
            total += head.weight * res["loss"]
            m = {k: v for k, v in res["report"].items() if isinstance(v, float)}
            prefix = f"{head.name}/" if self.multi else ""
            out.update({prefix + k: v for k, v in m.items()})
            if self.multi:
                out[f"{head.name}/loss"] = res["loss"]
        if seen:
            out["val_loss"] = total
        self.eval_seconds += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def predict(self, model: TaskModel, head: HeadData, enc: Encoded) -> dict[str, Any]:
        """Run a head over a split (length-sorted batches): mean loss, predictions and the metric report."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
        preds: list[Any] = [None] * len(enc)
        loss_sum, count = 0.0, 0
        for s in range(0, len(order), self.eval_batch_size):
            idx = order[s:s + self.eval_batch_size]
            b = {k: v.to(self.device) for k, v in self._collate(head, enc, idx).items()}
            logits = model(head.name, b["input_ids"], b["attention_mask"]).float()
            labels = b["labels"]
            ce = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
            loss_sum += float(ce)
            count += int((labels != -100).sum())
            arg = logits.argmax(-1).cpu()
            for row, i in enumerate(idx):
                preds[i] = int(arg[row]) if head.kind == "classify" else arg[row].tolist()
        model.train(was_training)
        loss = loss_sum / max(count, 1)
        if head.kind == "classify":
            y_true = [head.labels[i] for i in enc.labels]
            y_pred = [head.labels[i] for i in preds]
            return {"loss": loss, "y_true": y_true, "y_pred": y_pred,
                    "report": classification_report(y_true, y_pred, head.labels)}
        y_pred = [[head.labels[p[f]] if f >= 0 else "O" for f in first] for p, first in zip(preds, enc.first)]
        return {"loss": loss, "y_true": enc.tags, "y_pred": y_pred, "report": ner_report(enc.tags, y_pred)}


def steps_for(epochs: float, n_train: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps for `epochs` passes over n_train examples."""
    return max(1, math.ceil(epochs * n_train / (batch_size * grad_accum)))
