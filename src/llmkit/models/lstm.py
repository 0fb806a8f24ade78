"""The LSTM language model baseline: embedding -> stacked LSTM -> (tied) vocabulary projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.models.config import ModelConfig
from llmkit.models.transformer import LMOutput


class LSTMState:
    """Recurrent state standing in for a KV cache: (h, c) per layer, carried across decode steps."""

    def __init__(self) -> None:
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pos = 0


class LSTMLM(nn.Module):
    """A causal LM with the same call signature as `Transformer`, so training and generation share code."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
               cache: LSTMState | None = None) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        h, state = self.lstm(x, cache.state if cache is not None else None)
        if cache is not None:
            cache.state, cache.pos = state, cache.pos + idx.size(1)
        return self.drop(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, cache: LSTMState | None = None,
                last_only: bool = False) -> LMOutput:
        h = self.hidden(idx, cache=cache)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits, loss)

    def new_cache(self, batch: int, max_len: int) -> LSTMState:
        return LSTMState()
