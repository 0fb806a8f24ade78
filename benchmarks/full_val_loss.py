"""Validation loss of a char-level model over the *whole* validation split (not 20 random batches).

nanoGPT and `llmkit pretrain` both report the mean of 20 random 12 x 64 windows (15,360 scored characters),
an estimate whose standard error is about 0.01-0.02 nats. This script scores every non-overlapping
64-character window of the split (each position with its in-window context, as training sees it), so two
runs can be compared without that noise. It reads an llmkit checkpoint folder or a nanoGPT `ckpt.pt`.

    python benchmarks/full_val_loss.py runs/shakespeare runs/shakespeare_data
    python benchmarks/full_val_loss.py --nanogpt nanoGPT/out/ckpt.pt nanoGPT/data/shakespeare_char
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def window_losses(logits_fn, val: np.ndarray, block: int, batch: int = 64) -> np.ndarray:
    """Mean loss of each non-overlapping window of `block` targets."""
    n = (len(val) - 1) // block
    x = torch.from_numpy(val[: n * block].astype(np.int64)).view(n, block)
    y = torch.from_numpy(val[1 : n * block + 1].astype(np.int64)).view(n, block)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = logits_fn(x[i : i + batch])
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y[i : i + batch].reshape(-1),
                                 reduction="none").view(-1, block)
            out.append(ce.mean(1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="llmkit checkpoint folder, or nanoGPT ckpt.pt with --nanogpt")
    ap.add_argument("data", help="llmkit prepared folder (val.bin + meta.json) or nanoGPT data folder (val.bin)")
    ap.add_argument("--nanogpt", action="store_true")
    ap.add_argument("--nanogpt_src", default=None, help="folder holding nanoGPT's model.py")
    ap.add_argument("--noise_draws", type=int, default=0,
                    help="also draw this many 20 x 12 random-window estimates (what both trainers report)")
    args = ap.parse_args()
    if args.nanogpt:
        sys.path.insert(0, args.nanogpt_src or str(Path(args.model).resolve().parents[1]))
        from model import GPT, GPTConfig  # nanoGPT's model.py

        ck = torch.load(args.model, map_location="cpu", weights_only=False)
        model = GPT(GPTConfig(**ck["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
        val = np.memmap(Path(args.data) / "val.bin", dtype=np.uint16, mode="r")
        block = ck["model_args"]["block_size"]

        def logits_fn(x):
            return model(x, x)[0]  # with targets nanoGPT returns logits for every position
    else:
        from llmkit.data.prepare import load_shards
        from llmkit.models.load import load_model

        model, _ = load_model(args.model)
        _, val, _ = load_shards(args.data)
        block = model.cfg.block_size

        def logits_fn(x):
            return model(x).logits
    model.eval()
    per_window = window_losses(logits_fn, np.asarray(val), block)
    mean, se = float(per_window.mean()), float(per_window.std(ddof=1) / math.sqrt(len(per_window)))
    res = {"model": args.model, "windows": len(per_window), "block": block,
           "val_loss_full": round(mean, 4), "standard_error": round(se, 4)}
    if args.noise_draws:  # the spread of a 20-batch estimate: random starts, as in training-time validation
        g = np.random.default_rng(0)
        arr = np.asarray(val)
        est = []
        for _ in range(args.noise_draws):
            ix = g.integers(0, len(arr) - block - 1, 240)
            x = torch.from_numpy(np.stack([arr[i : i + block] for i in ix]).astype(np.int64))
            y = torch.from_numpy(np.stack([arr[i + 1 : i + 1 + block] for i in ix]).astype(np.int64))
            with torch.no_grad():
                logits = torch.cat([logits_fn(x[j : j + 60]) for j in range(0, 240, 60)])
            est.append(float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))))
        res["estimate_20x12"] = {"mean": round(float(np.mean(est)), 4), "std": round(float(np.std(est, ddof=1)), 4),
                                 "min": round(min(est), 4), "max": round(max(est), 4), "draws": len(est)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
