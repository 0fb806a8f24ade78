"""Padding token lists into batches: left padding for generation, right padding for training and encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one (B, T) tensor and its attention mask (1 = real token)."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            idx[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
    return idx, mask


def pad_batch(seqs: Sequence[list[int]], pad_id: int, labels: Sequence[list[int]] | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask (and labels, padded with -100)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, row in enumerate(labels):
            lab[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        out["labels"] = lab
    return out

