"""`llmkit finetune ner`: token classification with BIO tags, the word's tag on its first sub-token
(-100 on the rest), scored per entity with seqeval."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from llmkit.train.finetune.run import HeadSource, finetune


def ner(init: str, *, data: str, out: str, val: str | None = None, test: str | None = None, max_len: int = 128,
        epochs: float = 5.0, max_steps: int = 0, batch_size: int = 16, grad_accum: int = 1, lr: float = 1e-4,
        weight_decay: float = 0.01, warmup_frac: float = 0.06, eval_every: int = 0, patience: int = 3,
        metric: str = "f1", val_frac: float = 0.1, test_frac: float = 0.1, limit: int = 0, seed: int = 0,
        lora_r: int = 0, lora_alpha: float = 16.0, lora_targets: list[str] | None = None,
        precision: Literal["fp32", "bf16"] = "fp32", grad_checkpointing: bool = False,
        device: str = "cpu") -> dict[str, Any]:
    """Fine-tune a checkpoint for named-entity recognition; the best checkpoint (by entity F1) goes to OUT.

    Args:
        init: checkpoint folder to start from (an encoder such as MiniLM, or a decoder).
        data: CoNLL/BIO file (`token<TAB>tag` lines, blank line between sentences) or a named dataset:
            wnut16 (English tweets, 10 types), peoples_daily (Chinese PER/LOC/ORG, per character).
        out: folder for the fine-tuned checkpoint, metrics.jsonl and eval_results.json.
        val: validation file; default: cut val_frac of `data`.
        test: test file; default: cut test_frac of `data`.
        max_len: longest sentence in sub-word tokens (words past it are predicted "O").
        epochs: passes over the training data (ignored when max_steps > 0).
        max_steps: optimizer steps; 0 = derive from epochs.
        batch_size: sentences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on weight matrices.
        warmup_frac: fraction of the steps spent warming up.
        eval_every: steps between validations; 0 = once per epoch (at least 4 times per run).
        patience: stop after this many validations without improvement (0 = off).
        metric: validation metric that picks the best checkpoint: f1 (entity micro-F1), macro_f1 or val_loss.
        val_frac: fraction held out for validation when `val` is not given.
        test_frac: fraction held out for testing when `test` is not given.
        limit: train on only the first N (shuffled) sentences; 0 = all.
        seed: seeds the split, head initialisation and batch order.
        lora_r: LoRA rank; 0 = full fine-tuning.
        lora_alpha: LoRA scaling numerator.
        lora_targets: Linear modules to adapt (default attn.qkv attn.proj).
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        device: cpu or cuda.

    Examples:
        llmkit finetune ner runs/minilm --data wnut16 --out runs/wnut-ner --epochs 5
        llmkit finetune ner runs/minilm --data train.conll --val dev.conll --test test.conll --out runs/ner
        llmkit evaluate runs/wnut-ner
    """
    src = HeadSource("main", "ner", data, val, test, limit=limit)
    res = finetune([src], init, out, task="ner", max_len=max_len, epochs=epochs, max_steps=max_steps,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                   warmup_frac=warmup_frac, eval_every=eval_every, patience=patience, metric=metric,
                   val_frac=val_frac, test_frac=test_frac, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_targets=lora_targets or ("attn.qkv", "attn.proj"), device=device, precision=precision,
                   grad_checkpointing=grad_checkpointing)
    r = res["main"]
    print(f"{r['split']}: entity P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f} "
          f"(n={r['n_sentences']} sentences) -> {out}")
    return res


def most_frequent_tag_baseline(train: Sequence[tuple[list[str], list[str]]],
                               test_words: Sequence[list[str]]) -> list[list[str]]:
    """Tag each word with the tag it carried most often in training ("O" if never seen)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for words, tags in train:
        for w, t in zip(words, tags):
            counts[w][t] += 1
    return [[counts[w].most_common(1)[0][0] if w in counts else "O" for w in words] for words in test_words]
