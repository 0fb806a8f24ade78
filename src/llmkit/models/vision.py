"""Images into the Transformer: ViT patch embeddings (Dosovitskiy et al. 2021) feeding the same `Block`s as text.

Two image-text models are built from them:
- `CLIP` (Radford et al. 2021): an image encoder and llmkit's text encoder projected into one space, trained
  with the symmetric InfoNCE loss `clip_loss` and a learnable temperature;
- `ImageCaptioner`: fusion by cross-attention; the encoder blocks of a seq2seq `Transformer` run over the
  patches and its decoder attends to them while it writes the caption (so greedy/beam decoding of
  `inference.beam` works unchanged, with pixels where the source ids would be).
Checkpoints are ordinary folders: config.json keeps the text config under "model" and the rest under
"multimodal"; `load_multimodal` (behind `llmkit.load`) rebuilds them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.checkpoint import WEIGHTS, load_tensors, load_weights, read_meta
from llmkit.models.config import ModelConfig
from llmkit.models.heads import pool
from llmkit.models.kv_cache import KVCache
from llmkit.models.transformer import Block, Transformer, make_norm


@dataclass
class VisionConfig:
    """Image geometry: square images of `image_size` pixels cut into `patch_size` squares."""

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise LlmkitError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    """(B, C, H, W) pixels -> (B, 1 + N, d) tokens: a linear map of each flattened patch, a learned [CLS]
    token in front, learned positions added."""

    def __init__(self, vis: VisionConfig, d_model: int):
        super().__init__()
        self.vis = vis
        self.proj = nn.Linear(vis.channels * vis.patch_size**2, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.randn(1, vis.n_patches + 1, d_model) * 0.02)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        B, C, H, W = px.shape
        v, p = self.vis, self.vis.patch_size
        if (C, H, W) != (v.channels, v.image_size, v.image_size):
            raise LlmkitError(f"images are {C}x{H}x{W} but the model takes {v.channels}x{v.image_size}x{v.image_size}")
        x = px.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)  # (B, N, C p p), row-major patches
        x = self.proj(x)
        return torch.cat([self.cls.expand(B, -1, -1), x], 1) + self.pos  # (B, 1 + N, d)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """Bidirectional pass of Transformer blocks over (B, S, C) tokens that all attend to each other."""
    for i, block in enumerate(blocks):
        x = block(x, None, False, None, None, i)
    return norm(x) if norm is not None else x


class ImageEncoder(nn.Module):
    """A small ViT: patch embeddings -> encoder blocks -> (B, 1 + N, C) hidden states ([CLS] first)."""

    def __init__(self, cfg: ModelConfig, vis: VisionConfig):
        super().__init__()
        self.cfg, self.vis = cfg, vis
        self.patch = PatchEmbed(vis, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.prenorm else None

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.patch(px), self.norm)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (..., B, E) L2-normalised embeddings; pair i is the positive of row and column i.

    logits = exp(logit_scale) * I T^T; loss = (CE(logits, diag) + CE(logits^T, diag)) / 2, averaged over
    any leading group dimension (groups are separate contrastive batches).
    """
    logits = logit_scale.exp() * image_emb @ text_emb.transpose(-1, -2)  # (..., B, B)
    B = logits.size(-1)
    target = torch.arange(B, device=logits.device).expand(logits.shape[:-1]).reshape(-1)
    i2t = F.cross_entropy(logits.reshape(-1, B), target)
    t2i = F.cross_entropy(logits.transpose(-1, -2).reshape(-1, B), target)
    return (i2t + t2i) / 2


class CLIP(nn.Module):
    """Image encoder + text encoder, each projected to `d_embed` and L2-normalised; learnable temperature."""

    def __init__(self, text_cfg: ModelConfig, vision_cfg: ModelConfig, vis: VisionConfig, d_embed: int = 64):
        super().__init__()
        if text_cfg.arch != "encoder":
            raise LlmkitError(f"the CLIP text tower is an encoder, got arch={text_cfg.arch!r}")
        self.cfg, self.vision_cfg, self.vis, self.d_embed = text_cfg, vision_cfg, vis, d_embed
        self.image = ImageEncoder(vision_cfg, vis)
        self.text = Transformer(text_cfg)
        self.image_proj = nn.Linear(vision_cfg.d_model, d_embed, bias=False)
        self.text_proj = nn.Linear(text_cfg.d_model, d_embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_images(self, px: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, E) unit vectors from the [CLS] token."""
        return F.normalize(self.image_proj(self.image(px)[:, 0]), dim=-1)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids + mask -> (B, E) unit vectors from mean pooling over real tokens."""
        h = self.text.hidden(ids, attention_mask=mask)
        return F.normalize(self.text_proj(pool(h, mask, "mean")), dim=-1)

    def meta(self) -> dict[str, Any]:
        return {"kind": "clip", "vision": asdict(self.vis), "vision_model": self.vision_cfg.to_dict(),
                "d_embed": self.d_embed}


class ImageCaptioner(nn.Module):
    """Cross-attention fusion: a seq2seq Transformer whose encoder blocks read image patches instead of ids.

    `encode(pixels)` -> memory (B, 1 + N, C); `decode(tgt, memory, mask, cache)` -> logits (B, T, V), the
    interface `inference.beam.greedy_decode` / `beam_search` drive.
    """

    def __init__(self, cfg: ModelConfig, vis: VisionConfig):
        super().__init__()
        if cfg.arch != "seq2seq":
            raise LlmkitError(f"the captioner is an encoder-decoder, got arch={cfg.arch!r}")
        self.cfg, self.vis = cfg, vis
        self.patch = PatchEmbed(vis, cfg.d_model)
        self.text = Transformer(cfg)

    def encode(self, px: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return run_blocks(self.text.blocks, self.patch(px), self.text.final_norm)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        return self.text.decode(tgt, memory, mask, cache)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.text.new_cache(batch, max_len)

    def memory_mask(self, px: torch.Tensor) -> torch.Tensor:
        """Every patch is real: an all-ones (B, 1 + N) mask for the decoders' memory."""
        return torch.ones(px.size(0), self.vis.n_patches + 1, dtype=torch.long, device=px.device)

    def loss(self, px: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        logits = self.decode(tgt_in, self.encode(px))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt_out.reshape(-1), ignore_index=-100)

    def meta(self) -> dict[str, Any]:
        return {"kind": "caption", "vision": asdict(self.vis)}


def load_multimodal(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a CLIP or captioner checkpoint: (model in eval mode, config.json meta)."""
    meta = read_meta(folder)
    mm = meta.get("multimodal") or {}
    cfg, vis = ModelConfig.from_dict(meta["model"]), VisionConfig(**mm.get("vision", {}))
    if mm.get("kind") == "clip":
        model: nn.Module = CLIP(cfg, ModelConfig.from_dict(mm["vision_model"]), vis, mm["d_embed"])
    elif mm.get("kind") == "caption":
        model = ImageCaptioner(cfg, vis)
    else:
        raise LlmkitError(f"{folder}: unknown multimodal kind {mm.get('kind')!r}; expected clip or caption")
    path = Path(folder) / WEIGHTS
    load_weights(model, load_tensors(path), str(path))
    return model.to(device).eval(), meta
