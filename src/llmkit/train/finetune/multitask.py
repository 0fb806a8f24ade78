"""`llmkit finetune multitask`: one shared backbone, one head per task, every step a batch of each task and
loss = Σ wᵢ·Lᵢ; per-task validation metrics go to metrics.jsonl ("sentiment/accuracy", "ner/f1", ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import LlmkitError
from llmkit.train.finetune.run import HeadSource, finetune

_FIELDS = {"name", "kind", "data", "val", "test", "weight", "text_field", "label_field", "class_weights",
           "pooling", "limit"}


def read_task_config(path: str | Path) -> list[HeadSource]:
    """Tasks from a YAML/JSON file: {"tasks": [{"name", "kind": classify|ner, "data", "weight", ...}]}."""
    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"task config {path} does not exist; write a YAML/JSON file with a `tasks:` list")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            cfg = json.loads(text)
        else:
            import yaml

            cfg = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise LlmkitError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from e
    tasks = cfg.get("tasks") if isinstance(cfg, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise LlmkitError(f"{path} needs a non-empty `tasks:` list of {{name, kind, data, weight}}")
    out: list[HeadSource] = []
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not {"name", "kind", "data"} <= set(t):
            raise LlmkitError(f"{path}: task #{i + 1} needs name, kind (classify|ner) and data")
        unknown = sorted(set(t) - _FIELDS)
        if unknown:
            raise LlmkitError(f"{path}: task {t['name']!r} has unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
        if t["kind"] not in ("classify", "ner"):
            raise LlmkitError(f"{path}: task {t['name']!r} has kind {t['kind']!r}; use classify or ner")
        w = t.get("weight", 1.0)
        if not isinstance(w, (int, float)) or w < 0:
            raise LlmkitError(f"{path}: task {t['name']!r} weight must be a number >= 0, got {w!r}")
        out.append(HeadSource(**{k: v for k, v in t.items()}))
    names = [s.name for s in out]
    if len(set(names)) != len(names) or any("." in n or "/" in n for n in names):
        raise LlmkitError(f"{path}: task names must be unique and contain no '.' or '/', got {names}")
    return out


def multitask(init: str, *, config: str, out: str, max_len: int = 128, epochs: float = 3.0, max_steps: int = 0,
              batch_size: int = 16, grad_accum: int = 1, lr: float = 5e-5, weight_decay: float = 0.01,
              warmup_frac: float = 0.06, eval_every: int = 0, patience: int = 3, metric: str = "val_loss",
              val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0, lora_r: int = 0,
              lora_alpha: float = 16.0, lora_targets: list[str] | None = None,
              precision: Literal["fp32", "bf16"] = "fp32", grad_checkpointing: bool = False,
              device: str = "cpu") -> dict[str, Any]:
    """Fine-tune one backbone on several tasks at once (shared trunk, one head per task).

    Each optimizer step draws one batch from every task and minimises Σ wᵢ·Lᵢ; `epochs` counts passes over
    the largest task. The best checkpoint (by the weighted validation loss, or `metric`) goes to OUT.

    Args:
        init: checkpoint folder to start from.
        config: YAML/JSON file with `tasks:`, each {name, kind: classify|ner, data, weight, val?, test?,
            text_field?, label_field?, class_weights?, pooling?, limit?}.
        out: folder for the checkpoint (all heads), metrics.jsonl and eval_results.json.
        max_len: longest input in tokens.
        epochs: passes over the largest task's training data (ignored when max_steps > 0).
        max_steps: optimizer steps; 0 = derive from epochs.
        batch_size: examples per task per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on weight matrices.
        warmup_frac: fraction of the steps spent warming up.
        eval_every: steps between validations; 0 = once per epoch (at least 4 times per run).
        patience: stop after this many validations without improvement (0 = off).
        metric: validation metric for the best checkpoint: val_loss (Σ wᵢ·lossᵢ) or a per-task one
            such as sentiment/accuracy.
        val_frac: fraction of each task's data held out for validation when it has no `val` file.
        test_frac: fraction held out for testing when it has no `test` file.
        seed: seeds splits, heads and batch order.
        lora_r: LoRA rank; 0 = full fine-tuning.
        lora_alpha: LoRA scaling numerator.
        lora_targets: Linear modules to adapt (default attn.qkv attn.proj).
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        device: cpu or cuda.

    Examples:
        llmkit finetune multitask runs/minilm --config tasks.yaml --out runs/multi --epochs 2
        llmkit evaluate runs/multi
    """
    sources = read_task_config(config)
    res = finetune(sources, init, out, task="multitask", max_len=max_len, epochs=epochs, max_steps=max_steps,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                   warmup_frac=warmup_frac, eval_every=eval_every, patience=patience, metric=metric,
                   val_frac=val_frac, test_frac=test_frac, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_targets=lora_targets or ("attn.qkv", "attn.proj"), device=device, precision=precision,
                   grad_checkpointing=grad_checkpointing)
    for s in sources:
        r = res.get(s.name)
        if r:
            score = f"accuracy {r['accuracy']:.4f}" if s.kind == "classify" else f"entity F1 {r['f1']:.4f}"
            print(f"{s.name} ({r['split']}): {score}")
    return res
