"""`ModelConfig`: one dataclass describes every architecture llmkit builds; presets are named configs.

Architecture differences are data (norm, mlp, positions, attention groups, biases, qk-norm, sandwich norms,
soft-capping, sliding windows, RoPE variants), not separate classes, so GPT-2, Llama, Qwen2/3, Mistral,
Phi-3, Gemma 2/3, BERT, the original encoder-decoder and the LSTM baseline share one code path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import LlmkitError

Arch = Literal["decoder", "encoder", "seq2seq", "lstm"]
LayerType = Literal["global", "local"]  # full causal attention / sliding-window attention
ROPE_SCALINGS = ("linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Shape and architecture of a model. Derived fields are filled in `__post_init__`."""

    arch: Arch = "decoder"
    vocab_size: int = 50304
    block_size: int = 256  # the longest sequence the model sees (context length)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; between -> GQA
    d_model: int = 128
    d_ff: int | None = None  # None -> 4 * d_model (standard) or Llama's 8/3 rule (gated)
    head_dim: int | None = None  # None -> d_model // n_head
    dropout: float = 0.0
    bias: bool = True  # biases in attention / MLP linears
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True  # GPT/Llama: pre-norm; BERT/original Transformer: post-norm
    mlp: Literal["standard", "gated"] = "standard"  # gated = SwiGLU/GeGLU
    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu"
    pos: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    type_vocab_size: int = 0  # BERT segment embeddings; 0 = none
    embed_norm: bool = False  # BERT: LayerNorm (+dropout) right after the embeddings
    embed_scale: bool = False  # original Transformer: embeddings * sqrt(d_model)
    n_decoder_layer: int | None = None  # seq2seq only: decoder depth (None -> n_layer)
    pad_token_id: int | None = None
    qkv_bias: bool | None = None  # None -> `bias`; Qwen2: biases on q/k/v only
    qk_norm: bool = False  # Qwen3/Gemma3: RMSNorm over each head's q and k before RoPE
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), weights stored as w
    post_norms: bool = False  # Gemma2/3: also norm the attention and MLP outputs before the residual add
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None  # Gemma2: scores -> c * tanh(scores / c) before the mask
    logit_softcap: float | None = None  # Gemma2: logits -> c * tanh(logits / c)
    sliding_window: int | None = None  # local layers see the last `sliding_window` positions (self included)
    layer_types: list[LayerType] | None = None  # None -> all "local" if sliding_window is set, else all "global"
    rope_local_theta: float | None = None  # Gemma3: plain RoPE base of local layers (None -> the global tables)
    rope_scaling: dict[str, Any] | None = None  # {"type": linear|llama3|yarn, "factor": ..., ...}
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (source model, ...)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LlmkitError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "pick n_head that divides d_model or set head_dim"
                )
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise LlmkitError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.d_ff is None:
            if self.mlp == "gated":  # Llama: 2/3 * 4d rounded up to a multiple of 64
                self.d_ff = ((int(8 * self.d_model / 3) + 63) // 64) * 64
            else:
                self.d_ff = 4 * self.d_model
        if self.pos == "rope" and self.head_dim % 2:
            raise LlmkitError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise LlmkitError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= {"global", "local"}:
                raise LlmkitError(f"layer_types must list 'global' or 'local' for each of the {self.n_layer} layers, "
                                  f"got {self.layer_types}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LlmkitError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if "local" in self.layer_kinds and self.sliding_window is None:
            raise LlmkitError("layer_types has 'local' layers but sliding_window is not set")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALINGS:
            raise LlmkitError(f"RoPE scaling {self.rope_scaling.get('type')!r} is not supported; "
                              f"llmkit has {', '.join(ROPE_SCALINGS)}")

    @property
    def layer_kinds(self) -> list[LayerType]:
        """The attention kind of every layer (explicit `layer_types`, or all local/global from `sliding_window`)."""
        if self.layer_types is not None:
            return self.layer_types
        return ["local" if self.sliding_window is not None else "global"] * self.n_layer

    @property
    def causal(self) -> bool:
        """Decoders and LSTMs predict the next token; encoders see both directions."""
        return self.arch in ("decoder", "lstm")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlmkitError(f"unknown ModelConfig field(s) {unknown}; is this config from a newer llmkit?")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise LlmkitError(f"no config.json at {path}; is this an llmkit checkpoint folder?") from e
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
        return cls.from_dict(d.get("model", d))


_GPT2 = dict(arch="decoder", norm="layernorm", mlp="standard", activation="gelu_tanh", pos="learned",
             bias=True, tie_embeddings=True, prenorm=True)
_LLAMA = dict(arch="decoder", norm="rmsnorm", norm_eps=1e-5, mlp="gated", activation="silu", pos="rope",
              bias=False, tie_embeddings=False, prenorm=True)
_BERT = dict(arch="encoder", norm="layernorm", norm_eps=1e-12, mlp="standard", activation="gelu",
             pos="learned", bias=True, tie_embeddings=True, prenorm=False, type_vocab_size=2, embed_norm=True)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(_GPT2, n_layer=4, n_head=4, d_model=128, block_size=128, vocab_size=4096),
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257),
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, d_model=128, block_size=256, vocab_size=4096),
    "bert-tiny": dict(_BERT, n_layer=2, n_head=2, d_model=128, block_size=128, vocab_size=4096),
    "lstm-tiny": dict(arch="lstm", n_layer=2, n_head=1, d_model=256, block_size=128, vocab_size=4096,
                      tie_embeddings=True, pos="none"),
    # nanoGPT's config/train_shakespeare_char.py shape, the CPU-sized variant
    "char-shakespeare": dict(_GPT2, activation="gelu", n_layer=4, n_head=4, d_model=128, block_size=64,
                             vocab_size=65, bias=False, dropout=0.0),
    # Vaswani et al. (2017) base shape scaled down: sinusoidal positions, post-norm, ReLU
    "transformer-tiny": dict(arch="seq2seq", norm="layernorm", mlp="standard", activation="relu",
                             pos="sinusoidal", prenorm=False, bias=True, tie_embeddings=True, embed_scale=True,
                             n_layer=3, n_head=4, d_model=256, d_ff=1024, block_size=128, vocab_size=8000),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a named preset, with any field overridden (`preset("gpt2-tiny", vocab_size=8192)`)."""
    if name not in PRESETS:
        raise LlmkitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
