"""bf16 vs fp32 training tokens/s, and peak memory with / without gradient checkpointing, through `fit`.

Each configuration runs in its own subprocess (peak RSS = VmHWM after resetting it, Linux), alternating
fp32 / bf16 so that a busy machine slows both alike; report ratios, not absolute numbers.

    python benchmarks/precision_memory.py [--steps 40] [--repeats 2] [--data ../shared/data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

CHILD = r"""
import json, re, sys, tempfile, time
import numpy as np, torch
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.train.loop import TrainConfig, fit
from llmkit.train.pretrain import LMTask

def kb(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

args = json.loads(sys.argv[1])
text = open(args["data"], encoding="utf-8").read()
chars = sorted(set(text))
ids = np.array([chars.index(c) for c in text[:300_000]], dtype=np.uint16)
torch.manual_seed(0)
cfg = preset(args["preset"], vocab_size=len(chars), **args.get("model", {}))
model = build_model(cfg)
task = LMTask(ids[:270_000], ids[270_000:], cfg.block_size, args["batch"], 0, eval_batches=1)
tcfg = TrainConfig(max_steps=args["steps"], batch_size=args["batch"], warmup_steps=2, eval_every=0,
                   log_every=args["steps"], precision=args["precision"], grad_checkpointing=args["ckpt"])
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS")
t = time.perf_counter()
fit(model, task, tcfg, tempfile.mkdtemp(), save=lambda k, s: None, progress=False)
dt = time.perf_counter() - t
print(json.dumps({"tok_s": args["steps"] * args["batch"] * cfg.block_size / dt,
                  "peak_rss_growth_mib": (kb("VmHWM") - before) / 1024}))
"""


def run(data: str, **args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"data": data, **args})],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=str(SHAKESPEARE), help="Tiny Shakespeare text file")
    a = ap.parse_args()
    speed: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(a.repeats):  # char-shakespeare shape, batch 12 x 64
        for prec in ("fp32", "bf16"):
            speed[prec].append(run(a.data, preset="char-shakespeare", batch=12, steps=a.steps, precision=prec,
                                   ckpt=False)["tok_s"])
    mem = {}
    big = {"n_layer": 4, "d_model": 256, "n_head": 4, "block_size": 256}  # activations dominate
    for ckpt in (False, True):
        mem[f"grad_checkpointing={ckpt}"] = run(a.data, preset="char-shakespeare", batch=16, steps=4, precision="fp32",
                                                ckpt=ckpt, model=big)
    res = {"tok_s": {k: round(max(v), 1) for k, v in speed.items()},
           "bf16_over_fp32": round(max(speed["bf16"]) / max(speed["fp32"]), 3), "memory": mem,
           "memory_model": big | {"batch": 16}}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
