"""Training-speed suite: llmkit vs transformers GPT-2 on the same shape and batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit.bench.timer import mean_seconds
from llmkit.data.corpus import bible_text
from llmkit.models.build import build_model
from llmkit.models.config import preset

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"


def _train_step_fn(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor],
                   batches: list[torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    it = iter(range(10**9))

    def step() -> None:
        x = batches[next(it) % len(batches)]
        loss = loss_of(x)
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
    ours_s = mean_seconds(_train_step_fn(ours, lambda b: ours(b[:, :-1], b[:, 1:]).loss, batches), 5, steps)
    ref_s = mean_seconds(_train_step_fn(ref, lambda b: ref(input_ids=b[:, :-1], labels=b[:, :-1]).loss, batches), 5, steps)
    tokens = B * T
    return {"name": "train char-shakespeare", "corpus": corpus, "batch": B, "block": T,
            "params_llmkit": ours.num_params(), "params_reference": sum(p.numel() for p in ref.parameters()),
            "llmkit_tokens_per_s": tokens / ours_s, "reference": "transformers GPT2LMHeadModel",
            "reference_tokens_per_s": tokens / ref_s, "ratio": ref_s / ours_s, "target_ratio": 1.15}

