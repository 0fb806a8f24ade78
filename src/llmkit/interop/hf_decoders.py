"""The Llama-like decoder families of transformers: Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2, Gemma 3.

They share one layout (RoPE, RMSNorm, gated MLP, `model.layers.{i}.self_attn.*`) and differ by a few
switches, which become `ModelConfig` fields: q/k/v biases (Qwen2), qk-norm (Qwen3, Gemma3), fused qkv and
gate/up tensors (Phi-3), Gemma's (1 + w) RMSNorm, sandwich norms, sqrt(d) embedding scale, query scaling,
soft-capping (Gemma2), sliding-window layers (Mistral, Gemma, Qwen2 optionally) and per-kind RoPE bases.
Config dicts of transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters, layer_types) both read.
"""

from __future__ import annotations

from typing import Any, Literal

from llmkit.errors import LlmkitError
from llmkit.interop.hf_rules import ACT_HF, Rule, act, linear, need, norm
from llmkit.models.config import ModelConfig

Decoder = Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
# family -> (HF architecture, model_type, tie_word_embeddings default)
DECODERS: dict[Decoder, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", False),
    "mistral": ("MistralForCausalLM", "mistral", False),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "phi3": ("Phi3ForCausalLM", "phi3", False),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", True),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", True),
}
GEMMA = ("gemma2", "gemma3")
# what each family can express (see `features`); gemma families also require "gemma"
ALLOWED: dict[Decoder, set[str]] = {
    "llama": {"bias"},
    "mistral": {"sliding"},
    "phi3": {"sliding"},
    "qwen2": {"qkv_bias", "sliding", "mixed_layers"},
    "qwen3": {"qk_norm", "sliding", "mixed_layers"},
    "gemma2": {"gemma", "sliding", "mixed_layers", "softcap"},
    "gemma3": {"gemma", "sliding", "mixed_layers", "softcap", "qk_norm", "local_theta"},
}
_KIND = {"sliding_attention": "local", "full_attention": "global"}
_SCALING_KEYS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                          "mscale", "mscale_all_dim", "truncate")}


# ----------------------------------------------------------------------------------------------- HF -> llmkit


def _rope_dicts(hf: dict[str, Any], family: Decoder) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global rope dict, local rope dict or None) in the 5.x `rope_parameters` shape, from 4.x or 5.x configs."""
    rp = hf.get("rope_parameters") or {}
    if family == "gemma3":
        if "full_attention" in rp or "sliding_attention" in rp:
            return dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
        return ({**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)},
                {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)})
    if "full_attention" in rp:
        raise LlmkitError(f"{family} config with per-layer-type rope_parameters is not supported")
    glob = {**(hf.get("rope_scaling") or {}), **rp}
    glob.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    return glob, None


def _rope_type(d: dict[str, Any]) -> str:
    return str(d.get("rope_type") or d.get("type") or "default")


def rope_from_hf(hf: dict[str, Any], family: Decoder) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta) of a config; refuses RoPE variants llmkit lacks."""
    glob, local = _rope_dicts(hf, family)
    factor = glob.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1.0):
        raise LlmkitError(f"partial rotary embeddings (partial_rotary_factor={factor}) are not supported")
    kind = _rope_type(glob)
    scaling = None
    if kind != "default":
        if kind not in _SCALING_KEYS:
            raise LlmkitError(f"RoPE scaling {kind!r} is not supported; llmkit converts default, "
                              f"{', '.join(_SCALING_KEYS)}")
        if kind in ("llama3", "yarn") and glob.get("original_max_position_embeddings") is None:
            glob["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or \
                need(hf, "max_position_embeddings")
        scaling = {"type": kind, **{k: glob[k] for k in _SCALING_KEYS[kind] if glob.get(k) is not None}}
    local_theta = None
    if local is not None:
        if _rope_type(local) != "default":
            raise LlmkitError(f"RoPE scaling {_rope_type(local)!r} on local (sliding) layers is not supported")
        local_theta = float(local.get("rope_theta", 10_000.0))
    return float(glob["rope_theta"]), scaling, local_theta


def layer_types_from_hf(hf: dict[str, Any], family: Decoder, n_layer: int) -> tuple[list[str] | None, int | None]:
    """(layer_types or None, sliding_window) following each family's own rule for which layers are local."""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None  # Qwen2.5 configs carry a sliding_window that is switched off
    if hf.get("layer_types"):
        unknown = sorted(set(hf["layer_types"]) - set(_KIND))
        if unknown:
            raise LlmkitError(f"attention variant {unknown[0]!r} in layer_types is not supported; "
                              "llmkit has full_attention and sliding_attention")
        types = [_KIND[t] for t in hf["layer_types"]]
    elif family == "gemma2":
        types = ["local" if i % 2 == 0 else "global" for i in range(n_layer)]
    elif family == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        types = ["local" if (i + 1) % pattern else "global" for i in range(n_layer)]
    elif family in ("qwen2", "qwen3"):
        types = ["local" if i >= hf.get("max_window_layers", 28) else "global" for i in range(n_layer)]
    else:  # Llama, Mistral, Phi-3: one window for every layer, or none
        types = ["local" if window is not None else "global"] * n_layer
    if family == "llama" or window is None or "local" not in types:
        return None, None
    return types, int(window)


def decoder_config_from_hf(hf: dict[str, Any], family: Decoder) -> dict[str, Any]:
    """`ModelConfig` fields of a Llama-like HF config."""
    n_head, d = need(hf, "num_attention_heads"), need(hf, "hidden_size")
    n_layer = need(hf, "num_hidden_layers")
    theta, scaling, local_theta = rope_from_hf(hf, family)
    types, window = layer_types_from_hf(hf, family, n_layer)
    bias = bool(hf.get("attention_bias", False))
    if family == "llama" and bias != bool(hf.get("mlp_bias", False)):
        raise LlmkitError("Llama configs with attention_bias != mlp_bias are not supported")
    if family != "llama" and bias:
        raise LlmkitError(f"{family} with attention_bias=true is not supported")
    if hf.get("use_bidirectional_attention"):
        raise LlmkitError("bidirectional attention (use_bidirectional_attention=true, EmbeddingGemma) is not supported")
    cfg: dict[str, Any] = dict(
        arch="decoder", norm="rmsnorm", mlp="gated", pos="rope", prenorm=True, bias=bias,
        vocab_size=need(hf, "vocab_size"), block_size=need(hf, "max_position_embeddings"), n_layer=n_layer,
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d,
        head_dim=hf.get("head_dim") or d // n_head, d_ff=need(hf, "intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=act(hf.get("hidden_activation") or hf.get("hidden_act") or "silu"), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", DECODERS[family][2])),
        sliding_window=window, layer_types=types)
    if family == "qwen2":
        cfg["qkv_bias"] = True
    if family in ("qwen3", "gemma3"):
        cfg["qk_norm"] = True
    if family in GEMMA:
        cfg.update(norm_unit_offset=True, post_norms=True, embed_scale=True, rope_local_theta=local_theta,
                   attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                   attn_softcap=hf.get("attn_logit_softcapping"), logit_softcap=hf.get("final_logit_softcapping"))
    return cfg


# ----------------------------------------------------------------------------------------------- llmkit -> HF


def features(cfg: ModelConfig) -> set[str]:
    """The switches of `cfg` that not every family has (checked against ALLOWED on export)."""
    f: set[str] = set()
    if cfg.bias:
        f.add("bias")
    if cfg.qkv_bias and not cfg.bias:
        f.add("qkv_bias")
    if cfg.qk_norm:
        f.add("qk_norm")
    gemma = (cfg.norm_unit_offset, cfg.post_norms, cfg.embed_scale)
    if all(gemma):
        f.add("gemma")
    elif any(gemma):
        f.add("partial Gemma switches (norm_unit_offset, post_norms, embed_scale must go together)")
    if cfg.attn_scale is not None and not all(gemma):
        f.add("attn_scale")
    if cfg.attn_softcap is not None or cfg.logit_softcap is not None:
        f.add("softcap")
    if cfg.rope_local_theta is not None:
        f.add("local_theta")
    if "local" in cfg.layer_kinds:
        f.add("sliding")
        if "global" in cfg.layer_kinds:
            f.add("mixed_layers")
    return f


def fits(cfg: ModelConfig, family: Decoder) -> set[str]:
    """The features of `cfg` that `family` cannot express (empty: it exports exactly)."""
    f = features(cfg)
    missing = f - ALLOWED[family]
    if family in GEMMA and "gemma" not in f:
        missing.add("Gemma norms/embedding scale")
    return missing


def decoder_config_to_hf(cfg: ModelConfig, family: Decoder, common: dict[str, Any]) -> dict[str, Any]:
    """The HF config.json of a Llama-like family (5.x keys, plus the 4.x ones older readers need)."""
    arch, model_type, _ = DECODERS[family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = dict(cfg.rope_scaling)
        rope.update(rope_type=s.pop("type"), **s)
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, **common,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else ACT_HF[cfg.activation],  # F.gelu(tanh)
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "attention_bias": cfg.bias, "attention_dropout": 0.0}
    if family == "llama":
        hf["mlp_bias"] = cfg.bias
    kinds = cfg.layer_kinds
    if "local" in kinds:
        hf["sliding_window"] = cfg.sliding_window
        if family in ("qwen2", "qwen3", "gemma2", "gemma3"):
            hf["layer_types"] = [{"local": "sliding_attention", "global": "full_attention"}[k] for k in kinds]
        if family in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = True
            hf["max_window_layers"] = kinds.index("local")
    elif family != "llama":
        hf["sliding_window"] = None
        if family in ("qwen2", "qwen3", "gemma2", "gemma3"):
            hf["layer_types"] = ["full_attention"] * cfg.n_layer
    if family in GEMMA:
        scalar = 1.0 / cfg.attn_scale ** 2 if cfg.attn_scale is not None else float(cfg.head_dim)
        hf.update(hidden_activation=hf.pop("hidden_act"), attn_logit_softcapping=cfg.attn_softcap,
                  final_logit_softcapping=cfg.logit_softcap,
                  query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar)
    if family == "gemma3":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        hf["rope_parameters"] = {"sliding_attention": local, "full_attention": rope}
        hf["rope_local_base_freq"] = local["rope_theta"]
    if family == "phi3":
        old = (cfg.rope_scaling or {}).get("original_max_position_embeddings", cfg.block_size)
        hf.update(resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=old)
    return hf


# ----------------------------------------------------------------------------------------------- name map


def decoder_rules(cfg: ModelConfig, family: Decoder) -> list[Rule]:
    """HF names (base prefix `model.` stripped) of every llmkit tensor of a Llama-like decoder."""
    b = cfg.bias
    qkv_bias = b if cfg.qkv_bias is None else cfg.qkv_bias
    r = [Rule("tok_emb.weight", ("embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}", f"layers.{i}"
        a = f"{h}.self_attn"
        r += norm(f"{o}.norm1", f"{h}.input_layernorm", False)
        if family == "phi3":  # fused in HF too, same q, k, v row order
            r += linear(f"{o}.attn.qkv", f"{a}.qkv_proj", qkv_bias)
        else:
            qkv = tuple(f"{a}.{p}_proj" for p in "qkv")
            r.append(Rule(f"{o}.attn.qkv.weight", tuple(f"{n}.weight" for n in qkv), "cat"))
            if qkv_bias:
                r.append(Rule(f"{o}.attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), "cat"))
        if cfg.qk_norm:
            r += norm(f"{o}.attn.q_norm", f"{a}.q_norm", False) + norm(f"{o}.attn.k_norm", f"{a}.k_norm", False)
        r += linear(f"{o}.attn.proj", f"{a}.o_proj", b)
        if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention's post-norm
            r += norm(f"{o}.attn_post_norm", f"{h}.post_attention_layernorm", False)
            r += norm(f"{o}.norm2", f"{h}.pre_feedforward_layernorm", False)
            r += norm(f"{o}.mlp_post_norm", f"{h}.post_feedforward_layernorm", False)
        else:
            r += norm(f"{o}.norm2", f"{h}.post_attention_layernorm", False)
        if family == "phi3":  # gate_up_proj rows: [gate; up]
            r += [Rule(f"{o}.mlp.gate.weight", (f"{h}.mlp.gate_up_proj.weight",), "half", part=0),
                  Rule(f"{o}.mlp.fc.weight", (f"{h}.mlp.gate_up_proj.weight",), "half", part=1)]
        else:
            r += linear(f"{o}.mlp.gate", f"{h}.mlp.gate_proj", b)
            r += linear(f"{o}.mlp.fc", f"{h}.mlp.up_proj", b)
        r += linear(f"{o}.mlp.proj", f"{h}.mlp.down_proj", b)
    r += norm("final_norm", "norm", False)
    return r
