"""Task heads on the Transformer trunk: sequence classification, token classification (NER) and BERT's
next-sentence prediction (pooler + 2-way linear, pretrained beside the MLM head).

A fine-tuned model is one `TaskModel` (backbone + named heads), saved as one model.safetensors with the
head specs in config.json, so `load_task_model(folder)` rebuilds it in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import WEIGHTS, load_tensors, load_weights, read_meta, save_checkpoint
from llmkit.models.config import ModelConfig
from llmkit.tokenizer import Tokenizer

Pooling = Literal["cls", "mean", "last"]
HeadKind = Literal["classify", "ner", "nsp"]


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sequence vector (B, C) from hidden states h (B, T, C) and a right-padded mask (B, T).

    cls: the first token ([CLS]); mean: average over real tokens (sentence-transformers' pooling);
    last: the last real token (decoders: the only position that has seen the whole text).
    """
    if pooling == "cls":
        return h[:, 0]
    m = mask.to(h.dtype)
    if pooling == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last real token
    return h[torch.arange(h.size(0), device=h.device), last]


class ClassificationHead(nn.Module):
    """Pool the sequence, then dropout + linear -> (B, n_labels) logits."""

    def __init__(self, d_model: int, n_labels: int, pooling: Pooling = "cls", dropout: float = 0.1):
        super().__init__()
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_labels)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(pool(h, mask, self.pooling)))  # (B, n_labels)


class TokenClassificationHead(nn.Module):
    """Dropout + linear on every position -> (B, T, n_labels) logits."""

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_labels)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(h))


class NSPHead(nn.Module):
    """BERT's pooler, tanh(W h_[CLS] + b), then a linear to (B, 2) logits: 0 = B follows A, 1 = B is random.

    Same layout as transformers' `bert.pooler.dense` + `cls.seq_relationship` (no dropout in between).
    """

    def __init__(self, d_model: int, n_labels: int = 2):
        super().__init__()
        self.pooler = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_labels)
        for lin in (self.pooler, self.out):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.pooler(h[:, 0])))  # (B, 2)


NSP_LABELS = ["is_next", "random"]  # transformers' next_sentence_label: 0 = continuation, 1 = random


def make_head(spec: dict[str, Any], d_model: int) -> nn.Module:
    """Build a head from its spec {"kind", "labels", "pooling"?, "dropout"?} (as stored in config.json)."""
    n = len(spec["labels"])
    if spec["kind"] == "classify":
        return ClassificationHead(d_model, n, spec.get("pooling", "cls"), spec.get("dropout", 0.1))
    if spec["kind"] == "ner":
        return TokenClassificationHead(d_model, n, spec.get("dropout", 0.1))
    if spec["kind"] == "nsp":
        return NSPHead(d_model, n)
    raise LlmkitError(f"unknown head kind {spec['kind']!r}; expected classify, ner or nsp")


def default_pooling(arch: str) -> Pooling:
    """[CLS] for encoders (BERT's choice), last real token for decoders."""
    if arch == "encoder":
        return "cls"
    if arch == "decoder":
        return "last"
    raise LlmkitError(f"a {arch} model cannot take a classification head; use an encoder or decoder checkpoint")


class TaskModel(nn.Module):
    """One backbone, several named heads. `forward(task, ...)` -> logits of that head."""

    def __init__(self, backbone: nn.Module, heads: dict[str, dict[str, Any]]):
        super().__init__()
        cfg = backbone.cfg
        if cfg.arch not in ("encoder", "decoder"):
            raise LlmkitError(f"fine-tuning heads need an encoder or decoder checkpoint, not arch={cfg.arch!r}")
        self.backbone = backbone
        self.cfg = cfg
        self.specs = {name: dict(spec) for name, spec in heads.items()}
        self.heads = nn.ModuleDict({name: make_head(spec, cfg.d_model) for name, spec in heads.items()})

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden(input_ids, attention_mask=attention_mask)  # (B, T, C)
        return self.heads[task](h, attention_mask)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pretraining_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT pretraining: (MLM logits (B, T, V) from the backbone's head, NSP logits (B, 2) from "nsp")."""
        h = self.backbone.hidden(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.backbone.logits(h), self.heads["nsp"](h, attention_mask)

    def loss(self, task: str, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Cross-entropy of one head on its batch (labels -100 are ignored: padding, non-first sub-tokens)."""
        logits = self(task, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch["labels"].reshape(-1),
                               weight=class_weights, ignore_index=-100)


def nsp_model(backbone: nn.Module) -> TaskModel:
    """An encoder with BERT's pooler + NSP head beside its MLM head (transformers' BertForPreTraining)."""
    return TaskModel(backbone, {"nsp": {"kind": "nsp", "labels": list(NSP_LABELS)}})


def save_task_model(folder: str | Path, model: TaskModel, tokenizer: Any, task: str,
                    extra_meta: dict[str, Any] | None = None, training_state: dict[str, Any] | None = None) -> Path:
    """Write backbone + heads as one checkpoint; config.json records {"task", "heads", "labels"}."""
    meta: dict[str, Any] = {"task": task, "heads": model.specs}
    if len(model.specs) == 1:
        meta["labels"] = next(iter(model.specs.values()))["labels"]
    meta.update(extra_meta or {})
    return save_checkpoint(folder, model, model.cfg, tokenizer, meta=meta, training_state=training_state)


def load_task_model(folder: str | Path, device: str = "cpu") -> tuple[TaskModel, Any, dict[str, Any]]:
    """Rebuild a fine-tuned checkpoint: (TaskModel in eval mode, Tokenizer, config.json meta)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if "heads" not in meta:
        raise LlmkitError(f"{folder} is not a fine-tuned checkpoint (no task heads in config.json); "
                          "fine-tune it with `llmkit finetune classify|ner|multitask` first")
    model = TaskModel(build_model(ModelConfig.from_dict(meta["model"])), meta["heads"])
    load_weights(model, load_tensors(folder / WEIGHTS), str(folder / WEIGHTS))
    return model.to(device).eval(), Tokenizer.load(folder), meta


def load_classifier(folder: str | Path, device: str = "cpu") -> tuple[TaskModel, Any, list[str]]:
    """A fine-tuned classifier: (model, tokenizer, labels). `model("main", ids, mask)` -> (B, n_labels)."""
    model, tok, meta = load_task_model(folder, device)
    if meta.get("task") != "classify":
        raise LlmkitError(f"{folder} holds a {meta.get('task')!r} model, not a classifier")
    return model, tok, meta["labels"]
