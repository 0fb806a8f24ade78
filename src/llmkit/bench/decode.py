"""Decode-speed suite: llmkit's KV-cache decoding vs transformers generate, and the bandwidth bound."""

from __future__ import annotations

from typing import Any

import torch

from llmkit.bench.timer import mean_seconds
from llmkit.inference.generate import generate_ids
from llmkit.inference.sampling import SamplingParams
from llmkit.models.build import build_model
from llmkit.models.config import preset


def copy_bandwidth(n_bytes: int = 256 * 2**20) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy reads and writes n_bytes each."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s = min(mean_seconds(lambda: dst.copy_(src), 1, 3) for _ in range(3))
    return 2 * n_bytes / s


def bench(quick: bool = False) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s, gpt2-small shape, our KV cache vs transformers generate."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = preset("gpt2-small")
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    ref = GPT2LMHeadModel(GPT2Config(activation_function="gelu_new")).eval()
    new = 16 if quick else 64
    prompt = list(range(100, 132))
    params = SamplingParams(max_new_tokens=new, temperature=0)

    def run_ours() -> None:
        for _ in generate_ids(ours, [prompt], params):
            pass

    ids = torch.tensor([prompt])
    with torch.no_grad():
        def run_ref() -> None:
            ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        ours_s = mean_seconds(run_ours, 1, 2 if quick else 3)
        ref_s = mean_seconds(run_ref, 1, 2 if quick else 3)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bw = copy_bandwidth()
    bound = bw / weight_bytes
    ours_tps, ref_tps = new / ours_s, new / ref_s
    return {"name": "decode gpt2-small batch 1", "new_tokens": new, "prompt_tokens": len(prompt),
            "llmkit_tokens_per_s": ours_tps, "reference": "transformers GPT2LMHeadModel.generate (KV cache)",
            "reference_tokens_per_s": ref_tps, "ratio": ours_tps / ref_tps,
            "weight_bytes": weight_bytes, "copy_bandwidth_GBps": bw / 1e9,
            "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": ours_tps / bound, "target_fraction": 0.8}

