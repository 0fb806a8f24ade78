"""What classify, ner and multitask share: load a backbone, encode each head's data, train with the one
training loop (early stopping, best checkpoint kept), then score the best checkpoint on the test split.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmkit.data.datasets import TAG_DATASETS, TEXT_DATASETS
from llmkit.data.labeled import prepare_tokenizer, read_conll, read_text_labels, split
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_json
from llmkit.metrics.classification import confusion, plot_confusion
from llmkit.models.checkpoint import read_meta
from llmkit.models.heads import TaskModel, default_pooling, load_task_model, save_task_model
from llmkit.models.load import load_model
from llmkit.models.lora import apply_lora, count_trainable, lora_modules, merge_lora, save_adapter
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import barrier, init_distributed
from llmkit.train.finetune.task import (
    FinetuneTask,
    HeadData,
    balanced_weights,
    encode_classify,
    encode_ner,
    labels_from,
    steps_for,
)
from llmkit.train.loop import TrainConfig, fit

RESULTS = "eval_results.json"


@dataclass
class HeadSource:
    """Where one head's data comes from: a named dataset or files, and how to split it."""

    name: str
    kind: Literal["classify", "ner"]
    data: str
    val: str | None = None
    test: str | None = None
    weight: float = 1.0
    text_field: str = "text"
    label_field: str = "label"
    class_weights: bool = False
    pooling: str = "auto"
    limit: int = 0  # use only the first N training examples (after shuffling); 0 = all
    extra: dict[str, Any] = field(default_factory=dict)


def read_examples(kind: str, source: str, text_field: str = "text", label_field: str = "label") -> list:
    """Examples of a named dataset (`rotten_tomatoes`, `wnut16`, ...) or a file (CSV/JSONL or CoNLL)."""
    named = TEXT_DATASETS if kind == "classify" else TAG_DATASETS
    if source in named:
        return named[source]()
    other = TAG_DATASETS if kind == "classify" else TEXT_DATASETS
    if source in other:
        raise LlmkitError(f"{source!r} is a {'NER' if kind == 'classify' else 'classification'} dataset; "
                          f"use `llmkit finetune {'ner' if kind == 'classify' else 'classify'}`")
    if not Path(source).exists() and "/" not in source and "." not in source:
        raise LlmkitError(f"unknown dataset {source!r}: give a file or one of {', '.join(named)}")
    return read_text_labels(source, text_field, label_field) if kind == "classify" else read_conll(source)


def split_examples(src: HeadSource, val_frac: float, test_frac: float, seed: int) -> tuple[list, list, list]:
    """train/val/test: files given for val/test are used as they are; missing splits are cut from `data`."""
    data = read_examples(src.kind, src.data, src.text_field, src.label_field)
    v = val_frac if src.val is None else 0.0
    t = test_frac if src.test is None else 0.0
    train, val, test = split(data, v, t, seed)
    if src.val is not None:
        val = read_examples(src.kind, src.val, src.text_field, src.label_field)
    if src.test is not None:
        test = read_examples(src.kind, src.test, src.text_field, src.label_field)
    if src.limit:
        train = train[: src.limit]
    if not train:
        raise LlmkitError(f"{src.data}: no training examples left after the split; give more data")
    return train, val, test


def load_backbone(init: str, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The pretrained trunk and tokenizer of `init` (a plain checkpoint, or the backbone of a fine-tuned one)."""
    folder = Path(init)
    if "heads" in read_meta(folder):
        model, tok, _ = load_task_model(folder, device)
        return model.backbone, tok
    if not (folder / "tokenizer.json").exists():
        raise LlmkitError(f"{folder} has no tokenizer.json; fine-tuning needs the tokenizer the model was trained with")
    model, _ = load_model(folder, device)
    return model, Tokenizer.load(folder)


def build_heads(sources: Sequence[HeadSource], tok: Tokenizer, arch: str, max_len: int, val_frac: float,
                test_frac: float, seed: int) -> list[HeadData]:
    heads = []
    for src in sources:
        train, val, test = split_examples(src, val_frac, test_frac, seed)
        labels = labels_from(src.kind, train)
        enc = encode_classify if src.kind == "classify" else encode_ner
        hd = HeadData(src.name, src.kind, labels, enc(tok, train, labels, arch, max_len, f"{src.data} (train)"),
                      enc(tok, val, labels, arch, max_len, f"{src.val or src.data} (validation)") if val else None,
                      enc(tok, test, labels, arch, max_len, f"{src.test or src.data} (test)") if test else None,
                      weight=src.weight,
                      pooling=(default_pooling(arch) if src.pooling == "auto" else src.pooling)
                      if src.kind == "classify" else None)
        if src.class_weights:
            if src.kind != "classify":
                raise LlmkitError("class_weights applies to classification heads only")
            hd.class_weights = balanced_weights(hd.train, len(labels))
        heads.append(hd)
    return heads


def _save_task(folder: Path, model: TaskModel, tok: Tokenizer, task: str, meta: dict[str, Any]) -> None:
    """Save a loadable checkpoint; with LoRA, merge a copy (the adapters also go to adapter.safetensors)."""
    if lora_modules(model):
        save_adapter(folder.with_name(folder.name + "-adapter"), model, {"base": meta.get("init"), **meta})
        model = merge_lora(copy.deepcopy(model))
    save_task_model(folder, model, tok, task, meta)


def finetune(sources: Sequence[HeadSource], init: str, out: str, *, task: str, max_len: int = 128,
             epochs: float = 3.0, max_steps: int = 0, batch_size: int = 32, grad_accum: int = 1, lr: float = 5e-5,
             weight_decay: float = 0.01, warmup_frac: float = 0.06, eval_every: int = 0, patience: int = 3,
             metric: str | None = None, val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0,
             lora_r: int = 0, lora_alpha: float = 16.0, lora_targets: Sequence[str] = ("attn.qkv", "attn.proj"),
             dropout: float | None = None, device: str = "cpu", progress: bool = True,
             precision: str = "fp32", grad_checkpointing: bool = False,
             dp: dict[str, Any] | None = None,
             wrap_task: Callable[[FinetuneTask], Any] | None = None) -> dict[str, Any]:
    """Train heads on a backbone; keep the best checkpoint (by the validation metric) in `out`; return the
    best checkpoint's test (or validation) report, which is also written to out/eval_results.json.

    wrap_task: turns the task before training, e.g. `train.distill` adds a teacher's soft targets to the loss.

    Under torchrun batch_size is per process (the global batch is batch_size x world); rank 0 writes.
    dp: {"epsilon", "delta", "max_grad_norm", "reproducible"} to train with DP-SGD (train/privacy.py)."""
    rank, world, device = init_distributed(device)
    backbone, tok = load_backbone(init, device)
    prepare_tokenizer(tok)
    cfg = backbone.cfg
    max_len = min(max_len, cfg.block_size)
    heads = build_heads(sources, tok, cfg.arch, max_len, val_frac, test_frac, seed)
    torch.manual_seed(seed)
    model = TaskModel(backbone, {h.name: h.spec() for h in heads}).to(device)
    if dropout is not None:  # backbone and heads
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
    if lora_r:
        apply_lora(model, lora_r, lora_alpha, lora_targets, train_also=["heads"])
        n_train, n_all = count_trainable(model)
        print(f"LoRA r={lora_r}: training {n_train:,} of {n_all:,} parameters")
    n_train = max(len(h.train) for h in heads)
    steps = max_steps or steps_for(epochs, n_train, batch_size * world, grad_accum)
    per_epoch = steps_for(1.0, n_train, batch_size * world, grad_accum)
    if metric is None:
        metric = "val_loss" if len(heads) > 1 else ("accuracy" if heads[0].kind == "classify" else "f1")
    has_val = all(h.val is not None and len(h.val) for h in heads)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=lr / 10,
                       warmup_steps=int(warmup_frac * steps), weight_decay=weight_decay,
                       eval_every=eval_every or min(per_epoch, max(steps // 4, 1)),
                       log_every=max(1, min(50, steps // 20)), seed=seed, device=device,
                       patience=patience if has_val else 0, metric=metric,
                       metric_mode="min" if metric.endswith("loss") else "max", precision=precision,  # type: ignore[arg-type]
                       grad_checkpointing=grad_checkpointing, grad_clip=0.0 if dp else 1.0)
    ftask = FinetuneTask(heads, tok.pad_id, batch_size, grad_accum, seed, device=device)
    train_task: Any = wrap_task(ftask) if wrap_task else ftask
    if dp:
        train_task = private_task(train_task, model, dp, n_train, batch_size, grad_accum, steps, seed, world)
    out_dir = Path(out)
    for stale in ("metrics.jsonl", "loss.png", RESULTS, "confusion.png"):
        if rank == 0:
            (out_dir / stale).unlink(missing_ok=True)
    meta = {"init": str(init), "max_len": max_len, "train": {k: v for k, v in vars(tcfg).items()},
            "data": [{"name": s.name, "kind": s.kind, "data": s.data, "val": s.val, "test": s.test,
                      "text_field": s.text_field, "label_field": s.label_field} for s in sources],
            "split": {"val_frac": val_frac, "test_frac": test_frac, "seed": seed}}

    def save(kind: str, _state: dict[str, Any]) -> None:
        if kind == "best":  # the final checkpoint is the best one; "last" (for resume) is not kept
            _save_task(out_dir, model, tok, task, meta)

    if rank == 0:
        print(f"fine-tuning {cfg.arch} ({sum(p.numel() for p in backbone.parameters()):,} params) for {steps} steps: "
              + ", ".join(f"{h.name} {h.kind} {len(h.train)} train / {len(h.val or [])} val / "
                          f"{len(h.test or [])} test, {len(h.labels)} labels" for h in heads))
    t_train, cpu_train = time.perf_counter(), time.process_time()
    fit(model, train_task, tcfg, out_dir, save, progress=progress)
    wall_s, cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    train_s = wall_s - ftask.eval_seconds  # optimisation only: validation passes excluded
    if rank != 0:  # rank 0 saves and scores; the others return its report
        barrier()
        return json.loads((out_dir / RESULTS).read_text(encoding="utf-8"))
    if not has_val:  # nothing to pick the best by: keep the final weights
        _save_task(out_dir, model, tok, task, meta)
    results = evaluate_saved(out_dir, heads, tok.pad_id, device,
                          extra={"fit_seconds": round(wall_s, 1), "fit_cpu_seconds": round(cpu_s, 1),
                                 "validation_seconds": round(ftask.eval_seconds, 1),
                                 "steps_planned": steps, "steps_run": ftask.steps_run,
                                 "train_examples_per_s": round(ftask.steps_run * batch_size * grad_accum * len(heads)
                                                               / max(train_s, 1e-9), 1),
                                 **({"dp": {"epsilon_spent": round(train_task.epsilon(), 4), "delta": train_task.delta,
                                            "noise_multiplier": round(train_task.sigma, 4)}} if dp else {})})
    barrier()
    return results


def private_task(ftask: Any, model: nn.Module, dp: dict[str, Any], n_train: int, batch_size: int,
                 grad_accum: int, steps: int, seed: int, world: int) -> Any:
    """Wrap the task in DP-SGD (per-example clipping + secure Gaussian noise) for the requested epsilon."""
    from llmkit.train.privacy import DPTask

    if world > 1:
        raise LlmkitError("--dp_epsilon trains in one process; run it without torchrun")
    if grad_accum != 1:
        raise LlmkitError("--dp_epsilon needs --grad_accum 1 (noise is added once per batch); raise --batch_size")
    delta = dp.get("delta") or 1.0 / (10 * n_train)
    # freeze what the heads' loss never touches (e.g. an encoder's MLM layers): opacus then hooks the layers
    # inside the backbone instead of treating the backbone as one unsupported module
    ftask.loss(model, ftask.train_batch(0, 0)).backward()
    for p in model.parameters():
        if p.grad is None:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    task = DPTask(ftask, model, epsilon=dp["epsilon"], delta=delta, batch_size=batch_size, dataset_size=n_train,
                  steps=steps, max_grad_norm=dp.get("max_grad_norm", 1.0), seed=seed,
                  reproducible=dp.get("reproducible", False))
    print(f"DP-SGD: epsilon {dp['epsilon']} at delta {delta:.2g}, noise multiplier {task.sigma:.3f}, "
          f"clip {task.C}, {'seeded (reproducible, not private against the seed)' if task.gen else 'secure'} noise")
    return task


def evaluate_saved(folder: Path, heads: list[HeadData], pad_id: int, device: str,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reload the saved checkpoint and report each head on its test split (validation if there is none)."""
    model, _, _ = load_task_model(folder, device)
    ftask = FinetuneTask(heads, pad_id, 1, device=device)
    results: dict[str, Any] = {"checkpoint": str(folder), **(extra or {})}
    for h in heads:
        split_name = "test" if h.test is not None and len(h.test) else "val" if h.val is not None and len(h.val) else None
        if split_name is None:
            continue
        res = ftask.predict(model, h, getattr(h, split_name))
        results[h.name] = {"split": split_name, "loss": res["loss"], **res["report"]}
        if h.kind == "classify":
            cm = confusion(res["y_true"], res["y_pred"], h.labels)
            results[h.name]["confusion"] = {"labels": h.labels, "matrix": cm}
            png = folder / ("confusion.png" if len(heads) == 1 else f"confusion_{h.name}.png")
            plot_confusion(cm, h.labels, png, f"{h.name} ({split_name})")
    atomic_write_json(folder / RESULTS, results)
    return results

