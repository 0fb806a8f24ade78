"""Training-speed suite: llmkit vs transformers GPT-2 on the same shape and batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit.bench.timer import time_calls
from llmkit.data.corpus import bible_text
from llmkit.models.build import build_model
from llmkit.models.config import preset

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"


def train_step(model: torch.nn.Module, loss_of: Callable[[Any], torch.Tensor], batches: list[Any],
               lr: float = 1e-3, fused: bool = False) -> Callable[[int], None]:
    """One AdamW step (backward, clip at 1.0, step, zero) on batch i % len(batches): the loop every training
    benchmark times, the same for llmkit and the reference."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)

    def step(i: int) -> None:
        loss = loss_of(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(quick: bool = False) -> dict[str, Any]:
    """char-shakespeare training throughput vs transformers.GPT2LMHeadModel of the same shape, same loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if SHAKESPEARE.exists():
        text, corpus = SHAKESPEARE.read_text(encoding="utf-8"), "tinyshakespeare"
    else:
        text, corpus = bible_text()[:1_000_000], "bible (Tiny Shakespeare not found)"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text[:200_000]], dtype=torch.long)
    cfg = preset("char-shakespeare", vocab_size=len(chars))
    B, T = 12, cfg.block_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(16):
        ix = torch.randint(len(data) - T - 1, (B,), generator=g)
        batches.append(torch.stack([data[i : i + T + 1] for i in ix]))
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=T, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu")
    ref = GPT2LMHeadModel(hf_cfg).train()
    steps = 20 if quick else 100
    ours_s = sum(time_calls(train_step(ours, lambda b: ours(b[:, :-1], b[:, 1:]).loss, batches, fused=True),
                            steps, warmup=5)) / steps
    ref_s = sum(time_calls(train_step(ref, lambda b: ref(input_ids=b[:, :-1], labels=b[:, :-1]).loss, batches,
                                      fused=True), steps, warmup=5)) / steps
    tokens = B * T
    return {"name": "train char-shakespeare", "corpus": corpus, "batch": B, "block": T,
            "params_llmkit": ours.num_params(), "params_reference": sum(p.numel() for p in ref.parameters()),
            "llmkit_tokens_per_s": tokens / ours_s, "reference": "transformers GPT2LMHeadModel",
            "reference_tokens_per_s": tokens / ref_s, "ratio": ref_s / ours_s, "target_ratio": 1.15}

