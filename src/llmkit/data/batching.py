"""Padding token lists into batches: the one place that does it (left padding for generation, right padding
for training and encoders)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad(seqs: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "right"
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) long tensor of `seqs` padded with `value` to the longest, and its mask (1 = real token)."""
    T = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        out[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one (B, T) tensor and its attention mask: every row ends at the last column."""
    return pad(prompts, pad_id, "left")


def shifted_pair(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: x = inputs[:-1] padded with pad_id, y = targets[1:] padded with -100 (no loss)."""
    x, _ = pad([s[:-1] for s in inputs], pad_id)
    y, _ = pad([s[1:] for s in targets], -100)
    return x, y


def pad_batch(seqs: Sequence[list[int]], pad_id: int, labels: Sequence[list[int]] | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask (and labels, padded with -100)."""
    ids, mask = pad(seqs, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab, _ = pad(labels, -100)
        out["labels"] = torch.nn.functional.pad(lab, (0, ids.size(1) - lab.size(1)), value=-100)
    return out
