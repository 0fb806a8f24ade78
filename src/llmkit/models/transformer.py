"""One config-driven Transformer: GPT-2, Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, BERT and the original
encoder-decoder are `ModelConfig` data.

Notation in shape comments: B batch, T query length, S key length, C d_model, nh query heads,
nkv key/value heads, hd head_dim, V vocab_size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.config import ModelConfig
from llmkit.models.kv_cache import KVCache
from llmkit.models.rope import rope_tables, rotate_half


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None


# ----------------------------------------------------------------------------------------------- building blocks


class OffsetRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), computed in fp32; w starts at 0 (HF stores w, not 1 + w)."""

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (d_model unless given: qk-norm normalises head_dim)."""
    d = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return OffsetRMSNorm(d, eps=cfg.norm_eps) if cfg.norm_unit_offset else nn.RMSNorm(d, eps=cfg.norm_eps)
    return nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias or cfg.arch != "decoder")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":  # GPT-2's "gelu_new"
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    return F.relu(x)


class MLP(nn.Module):
    """Position-wise feed-forward: act(x W1) W2, or the gated form act(x Wg) * (x W1) W2 (SwiGLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.activation
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "gated" else None
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.proj(activation(self.act, self.gate(x)) * self.fc(x))
        return self.proj(activation(self.act, self.fc(x)))


def sinusoidal_table(n_pos: int, d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...) (Vaswani et al. 2017)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n_pos, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         is_causal: bool, scale: float, cap: float, dropout: float) -> torch.Tensor:
    """Gemma2: softmax(c * tanh(Q K^T * scale / c) + mask) V; SDPA cannot cap, so the scores are explicit."""
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, S)
    scores = torch.tanh(scores / cap) * cap
    if mask is None and is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout)
    return p @ v


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; self-attention (fused qkv) or cross-attention."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.causal, self.cross, self.rope = causal, cross, cfg.pos == "rope" and not cross
        self.dropout = cfg.dropout
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        if cross:
            self.q = nn.Linear(cfg.d_model, self.nh * self.hd, bias=cfg.bias)
            self.kv = nn.Linear(cfg.d_model, 2 * self.nkv * self.hd, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, (self.nh + 2 * self.nkv) * self.hd, bias=qkv_bias)
        self.proj = nn.Linear(self.nh * self.hd, cfg.d_model, bias=cfg.bias)
        # Qwen3/Gemma3: RMSNorm over each head's q and k (before RoPE)
        self.q_norm = make_norm(cfg, self.hd) if cfg.qk_norm and not cross else None
        self.k_norm = make_norm(cfg, self.hd) if cfg.qk_norm and not cross else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self.q(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
            if cache is not None and layer in cache.cross_kv:
                k, v = cache.cross_kv[layer]
            else:
                S = memory.size(1)
                k, v = self.kv(memory).view(B, S, 2, self.nkv, self.hd).permute(2, 0, 3, 1, 4)  # 2 x (B, nkv, S, hd)
                if cache is not None:
                    cache.cross_kv[layer] = (k, v)
        else:
            qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hd)
            q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
            q = q.view(B, T, self.nh, self.hd)
            k = k.view(B, T, self.nkv, self.hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.transpose(1, 2)  # (B, nh, T, hd)
            k = k.transpose(1, 2)  # (B, nkv, T, hd)
            v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
            if rope is not None:
                cos, sin = rope  # (B, 1, T, hd)
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nkv, S, hd): cached keys + this step's
        g = self.nh // self.nkv  # grouped-query attention: each KV head serves g query heads, never copied
        dropout = self.dropout if self.training else 0.0
        if g > 1 and (self.softcap is not None or torch.onnx.is_in_onnx_export()):  # these need equal heads
            k, v, g = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), 1
        if self.softcap is not None:
            scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.hd)
            y = softcapped_attention(q, k, v, mask, is_causal, scale, self.softcap, dropout)
        elif g > 1 and T == 1:  # decode: a group's g query heads become g query rows of its KV head (a view)
            y = F.scaled_dot_product_attention(q.reshape(B, self.nkv, g, self.hd), k, v, attn_mask=mask,
                                               dropout_p=dropout, scale=self.scale).view(B, self.nh, 1, self.hd)
        else:  # softmax(Q K^T * scale + mask) V, scale = 1/sqrt(hd) unless configured
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               scale=self.scale, enable_gqa=g > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # (B, T, C)


class Block(nn.Module):
    """Attention + MLP with residuals; pre-norm (GPT/Llama), sandwich (Gemma: pre + post norms) or post-norm
    (BERT/original); optional cross-attention."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.attn_post_norm = make_norm(cfg) if cfg.post_norms else None
        self.mlp_post_norm = make_norm(cfg) if cfg.post_norms else None
        if cross:
            self.norm_cross = make_norm(cfg)
            self.cross_attn = Attention(cfg, causal=False, cross=True)
        else:
            self.cross_attn = None
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        def attn(h: torch.Tensor) -> torch.Tensor:
            h = self.attn(h, mask, is_causal, rope, cache, layer)
            return self.drop(h if self.attn_post_norm is None else self.attn_post_norm(h))

        def cross(h: torch.Tensor) -> torch.Tensor:
            return self.drop(self.cross_attn(h, memory_mask, False, cache=cache, layer=layer, memory=memory))

        def mlp(h: torch.Tensor) -> torch.Tensor:
            h = self.mlp(h)
            return self.drop(h if self.mlp_post_norm is None else self.mlp_post_norm(h))

        if self.prenorm:
            x = x + attn(self.norm1(x))
            if self.cross_attn is not None:
                x = x + cross(self.norm_cross(x))
            return x + mlp(self.norm2(x))
        x = self.norm1(x + attn(x))
        if self.cross_attn is not None:
            x = self.norm_cross(x + cross(x))
        return self.norm2(x + mlp(x))


# ----------------------------------------------------------------------------------------------- masks


def attention_mask_for(causal: bool, T: int, attention_mask: torch.Tensor | None,
                       cache: KVCache | None, device: torch.device, window: int | None = None,
                       ring: bool = False) -> tuple[torch.Tensor | None, bool]:
    """Return (bool mask (B,1,T,S) or None, is_causal) for SDPA. True = may attend.

    `window`: a local layer's sliding window (query q sees keys k with q - k < window); `ring`: its keys
    come from the cache's bounded ring buffer (see `KVCache.update`). Fast paths: no padding + no cache ->
    `is_causal`; single-token decode without padding, all keys in the window -> no mask. Every query may
    attend to itself, so rows of padding never become all -inf (NaN).
    """
    start = cache.pos if cache is not None else 0
    end = start + T
    if cache is not None:
        cache.valid[:, start:end] = True if attention_mask is None else attention_mask.bool()
        k_pos, key_valid = cache.key_positions(T, ring)  # (S,), (B, S)
        padded = not bool(key_valid.all())
    else:
        k_pos = torch.arange(end, device=device)
        key_valid = attention_mask.bool() if attention_mask is not None else None
        padded = key_valid is not None and not bool(key_valid.all())
    windowed = False
    if window is not None:  # does some key lie outside a query's window?
        oldest = int(k_pos[key_valid.any(0)].min()) if padded else int(k_pos.min())
        windowed = end - 1 - oldest >= window
    if not padded and not windowed:
        if not causal or (cache is not None and T == 1):
            return None, False
        if start == 0:
            return None, True
    q_pos = torch.arange(start, end, device=device)[:, None]  # (T, 1)
    k_pos = k_pos[None, :]  # (1, S)
    m = (k_pos <= q_pos) if causal else torch.ones(T, k_pos.size(1), dtype=torch.bool, device=device)
    if windowed:
        m = m & (q_pos - k_pos < window)
    m = m[None, None]  # (1, 1, T, S)
    if padded:
        m = m & key_valid[:, None, None, :]
    return m | (k_pos == q_pos)[None, None], False


# ----------------------------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """Decoder (GPT-2/Llama), encoder (BERT) or encoder-decoder (original Transformer), chosen by `cfg.arch`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":
            self.register_buffer("sin_pe", sinusoidal_table(cfg.block_size, d), persistent=False)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            if cfg.rope_local_theta is not None:  # Gemma3: local layers rotate with their own base
                cos, sin = rope_tables(cfg, cfg.block_size, local=True)
                self.register_buffer("rope_local_cos", cos, persistent=False)
                self.register_buffer("rope_local_sin", sin, persistent=False)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=cfg.causal) for _ in range(cfg.n_layer))
        if cfg.arch == "seq2seq":
            n_dec = cfg.n_decoder_layer or cfg.n_layer
            self.dec_blocks = nn.ModuleList(Block(cfg, causal=True, cross=True) for _ in range(n_dec))
            self.dec_norm = make_norm(cfg) if cfg.prenorm else None
        self.final_norm = make_norm(cfg) if cfg.prenorm else None
        if cfg.arch == "encoder":  # BERT MLM head: dense -> act -> norm -> tied decoder + bias
            self.mlm_dense = nn.Linear(d, d)
            self.mlm_norm = make_norm(cfg)
            self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    # -- embeddings ---------------------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, start: int = 0
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (+position, +segment) embeddings (B, T, C), and RoPE tables for these positions."""
        B, T = idx.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)[None].expand(B, T)
        x = self.tok_emb(idx)
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.sin_pe[position_ids]
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(idx)
            x = x + self.type_emb(token_type_ids)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        rope = None
        if self.cfg.pos == "rope":
            rope = (self.rope_cos[position_ids][:, None].to(x.dtype), self.rope_sin[position_ids][:, None].to(x.dtype))
        return self.drop(x), rope

    def _local_rope(self, position_ids: torch.Tensor | None, T: int, start: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (B, 1, T, hd) of the local layers' own base (Gemma3)."""
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=self.rope_local_cos.device)[None]
        return (self.rope_local_cos[position_ids][:, None].to(dtype),
                self.rope_local_sin[position_ids][:, None].to(dtype))

    # -- trunk -------------------------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of the encoder or decoder stack (the trunk every head sits on)."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        # with explicit position_ids (left padding, the server's slot cache) the cache write position may
        # run ahead of the logical positions; the context limit applies to the positions themselves
        n_ctx = start + T if position_ids is None or cache is None else int(position_ids.max()) + 1
        if n_ctx > self.cfg.block_size:
            raise LlmkitError(f"sequence of {n_ctx} tokens exceeds the model's context (block_size="
                              f"{self.cfg.block_size}); shorten the input")
        if cache is not None and start + T > cache.max_len:
            raise LlmkitError(f"the KV cache holds {cache.max_len} positions but {start + T} are needed; "
                              "allocate a larger cache")
        x, rope = self.embed(idx, position_ids, token_type_ids, start)
        kinds = self.cfg.layer_kinds
        mask, is_causal = attention_mask_for(self.cfg.causal, T, attention_mask, cache, idx.device)
        per_kind = {"global": (mask, is_causal, rope)}
        if "local" in kinds:  # sliding-window layers: their own mask (and RoPE base, Gemma3)
            ring = cache is not None and cache.bounded
            local_mask = attention_mask_for(self.cfg.causal, T, attention_mask, cache, idx.device,
                                            self.cfg.sliding_window, ring)
            local_rope = rope
            if self.cfg.rope_local_theta is not None:
                local_rope = self._local_rope(position_ids, T, start, x.dtype)
            per_kind["local"] = (*local_mask, local_rope)
        for i, block in enumerate(self.blocks):
            m, c, r = per_kind[kinds[i]]
            x = block(x, m, c, r, cache, i)
        if cache is not None:
            cache.pos += T
        return self.final_norm(x) if self.final_norm is not None else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (B, T, V) from hidden states (MLM transform first for encoders; Gemma2 soft-caps)."""
        if self.cfg.arch == "encoder":
            h = self.mlm_norm(activation(self.cfg.activation, self.mlm_dense(h)))
            return self.lm_head(h) + self.lm_bias
        logits = self.lm_head(h)
        if self.cfg.logit_softcap is not None:  # c * tanh(logits / c)
            logits = torch.tanh(logits / self.cfg.logit_softcap) * self.cfg.logit_softcap
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> LMOutput:
        """Logits for every position (or only the last, for decoding) and the loss if `targets` is given.

        targets use -100 for positions that carry no loss (padding, prompt tokens, unmasked MLM tokens).
        """
        h = self.hidden(idx, attention_mask, position_ids, token_type_ids, cache)
        if last_only:
            h = h[:, -1:]
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits, loss)

    # -- encoder-decoder ------------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """seq2seq: bidirectional encoder over the source (B, S) -> memory (B, S, C)."""
        x, _ = self.embed(src)
        mask, _ = attention_mask_for(False, src.size(1), src_mask, None, src.device)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, False, None, None, i)
        return self.final_norm(x) if self.final_norm is not None else x

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """seq2seq: causal decoder over target prefix (B, T) attending to memory -> logits (B, T, V)."""
        start = cache.pos if cache is not None else 0
        x, _ = self.embed(tgt, start=start)
        mask, is_causal = attention_mask_for(True, tgt.size(1), None, cache, tgt.device)
        mem_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for i, block in enumerate(self.dec_blocks):
            x = block(x, mask, is_causal, None, cache, i, memory, mem_mask)
        if cache is not None:
            cache.pos += tgt.size(1)
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        return self.lm_head(x)

    def seq2seq_loss(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
                     src_mask: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LMOutput:
        """Teacher forcing: predict tgt_out from the source and the shifted target tgt_in."""
        logits = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), tgt_out.reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)
        return LMOutput(logits, loss)

    def new_cache(self, batch: int, max_len: int, bounded: bool = True) -> KVCache:
        """A KV cache sized for `batch` sequences of up to `max_len` tokens, on the model's device/dtype.

        bounded: local (sliding-window) layers keep only their window in a ring buffer, so long generations
        use bounded memory; False gives every layer a full-length buffer (the server shifts rows in place).
        """
        p = self.tok_emb.weight
        n_layer = len(self.dec_blocks) if self.cfg.arch == "seq2seq" else self.cfg.n_layer
        return KVCache(self.cfg, batch, max_len, p.device, p.dtype, n_layer=n_layer, bounded=bounded)


