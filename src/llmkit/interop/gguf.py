"""GGUF files (llama.cpp's format) in: metadata -> an HF config dict, tensors -> HF names, dequantised to fp32.

The mapping is ours (read with the `gguf` package), so every key llama.cpp writes for a family reaches
`ModelConfig` (sliding window and its pattern, the local RoPE base, soft-capping, RoPE scaling), and the
file is checked first (architecture, quantisation types) so an unsupported one fails in a second with one
clear line. llama.cpp's own storage conventions are undone here: the `llama` arch stores q/k rows
interleaved for its RoPE kernel, Gemma stores norm weights as 1 + w, Phi-3 keeps gate and up fused.
The tokenizer comes from transformers' GGUF tokenizer converter when the file has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.models.rope import llama3_inv_freq

# GGUF general.architecture -> HF model_type (its architecture name follows from the model_type)
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
         "gemma3": "gemma3_text", "gpt2": "gpt2"}
SUPPORTED_ARCHS = tuple(ARCHS)
_ACT = {"gemma2": "gelu_pytorch_tanh", "gemma3": "gelu_pytorch_tanh", "gpt2": "gelu_new"}
# per-layer GGUF tensor -> HF module (under model.layers.{i}.); Gemma's ffn_norm is the pre-MLP norm
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
          "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GPT2_LAYER = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_ROPE_SCALING = {"linear": "linear", "yarn": "yarn"}


def _reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file
        raise LlmkitError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:100]})") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value; float32 ones as the shortest decimal that round-trips (1e-06, not 9.99999997e-07)."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
        v = float(str(np.float32(v)))
    return v


def check_gguf(path: Path) -> str:
    """Validate a GGUF file without dequantising it; returns its architecture."""
    import gguf

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise LlmkitError(f"GGUF architecture {arch!r} is not supported; llmkit imports {', '.join(ARCHS)}")
    first_of_type: dict[Any, Any] = {}
    for t in sorted(reader.tensors, key=lambda t: int(t.n_elements)):  # the smallest tensor of each type
        first_of_type.setdefault(t.tensor_type, t)
    for qtype, t in first_of_type.items():
        try:  # one tensor per type is enough to know whether gguf can dequantise it
            gguf.dequantize(np.asarray(t.data), qtype)
        except NotImplementedError as e:
            raise LlmkitError(f"GGUF tensor {t.name} uses quantisation {qtype.name}, which cannot be dequantised "
                              "here; re-quantise the model to Q8_0, Q4_K or F16 with llama.cpp") from e
    return str(arch)


def gguf_config(reader: Any, arch: str, names: set[str]) -> dict[str, Any]:
    """The HF config.json dict llama.cpp's metadata describes (keys as transformers 5 writes them)."""
    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    def need(key: str) -> Any:
        v = get(key)
        if v is None:
            raise LlmkitError(f"the GGUF file lacks {arch}.{key}; it is incomplete or from an unknown converter")
        return v

    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", [])) or None
    if vocab is None:
        vocab = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    model_type = ARCHS[arch]
    hf: dict[str, Any] = {"model_type": model_type, "vocab_size": int(vocab),
                          "tie_word_embeddings": "output.weight" not in names}
    for role in ("bos", "eos", "padding"):
        tid = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if tid is not None:
            hf[f"{'pad' if role == 'padding' else role}_token_id"] = int(tid)
    if arch == "gpt2":
        d = int(need("embedding_length"))
        hf.update(n_positions=int(need("context_length")), n_embd=d, n_layer=int(need("block_count")),
                  n_head=int(need("attention.head_count")), n_inner=int(get("feed_forward_length", 4 * d)),
                  layer_norm_epsilon=float(get("attention.layer_norm_epsilon", 1e-5)), activation_function="gelu_new")
        return hf
    n_head = int(need("attention.head_count"))
    d = int(need("embedding_length"))
    n_layer = int(need("block_count"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or d // n_head)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    kind = get("rope.scaling.type")
    if "rope_freqs.weight" in names:  # Llama 3.1/3.2: llama3 scaling stored as per-frequency divisors
        rope.update(_llama3_from_factors(reader, rope["rope_theta"], head_dim,
                                         int(get("rope.scaling.original_context_length", 8192))))
    elif kind not in (None, "none"):
        if kind not in _ROPE_SCALING:
            raise LlmkitError(f"GGUF RoPE scaling {kind!r} is not supported; llmkit maps linear and yarn")
        rope.update(rope_type=_ROPE_SCALING[kind], factor=float(need("rope.scaling.factor")))
        if kind == "yarn":
            rope["original_max_position_embeddings"] = int(need("rope.scaling.original_context_length"))
            for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                if get(f"rope.scaling.{key}") is not None:
                    rope[ours] = float(get(f"rope.scaling.{key}"))
    hf.update(max_position_embeddings=int(need("context_length")), hidden_size=d, num_hidden_layers=n_layer,
              intermediate_size=int(need("feed_forward_length")), num_attention_heads=n_head,
              num_key_value_heads=int(get("attention.head_count_kv", n_head)), head_dim=head_dim,
              rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
              hidden_act=_ACT.get(arch, "silu"), rope_parameters=rope, attention_bias=False)
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern")
    if window is not None:
        hf["sliding_window"] = int(window)
        if arch == "llama":  # llama.cpp files a sliding-window Llama (Mistral 7B v0.1) as arch llama
            hf["model_type"] = "mistral"
        if arch in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=True, max_window_layers=0)
    if isinstance(pattern, list):  # per layer: True = sliding
        hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern is not None:
        hf["sliding_window_pattern"] = int(pattern)
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(head_dim) for Gemma (query_pre_attn_scalar = head_dim)
        hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=head_dim,
                  attn_logit_softcapping=get("attn_logit_softcapping"),
                  final_logit_softcapping=get("final_logit_softcapping"))
        if arch == "gemma3":
            hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))}}
    return hf


def _llama3_from_factors(reader: Any, theta: float, head_dim: int, old_ctx: int) -> dict[str, Any]:
    """Llama 3 RoPE parameters whose divisors equal the file's rope_freqs tensor (llama.cpp writes only the
    divisors); factor = the largest divisor, low/high_freq_factor 1/4 as every Llama 3.x ships."""
    import gguf

    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    got = torch.from_numpy(np.array(gguf.dequantize(np.asarray(t.data), t.tensor_type))).float().flatten()
    params = {"rope_type": "llama3", "factor": float(str(np.float32(got.max()))), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": old_ctx}
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    want = inv / llama3_inv_freq(inv, params)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=0):
        raise LlmkitError("GGUF rope_freqs does not match Llama 3 RoPE scaling (factor "
                          f"{params['factor']}, low/high 1/4, original context {old_ctx}); import the HF folder instead")
    return params


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleaving for its `llama` arch: (nh, hd/2, 2, ...) -> (nh, 2, hd/2, ...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state(reader: Any, arch: str, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors under their HF names, fp32, with llama.cpp's storage conventions undone."""
    import gguf

    gemma, gpt2 = arch in ("gemma2", "gemma3"), arch == "gpt2"
    base = "transformer." if gpt2 else "model."
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        if stem == "rope_freqs":  # read into the config by gguf_config
            continue
        w = torch.from_numpy(np.array(gguf.dequantize(np.asarray(t.data), t.tensor_type)))  # a writable copy
        w = w.float().reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w.float()
        if stem.startswith("blk."):
            _, i, kind = stem.split(".", 2)
            table = _GPT2_LAYER if gpt2 else _LAYER
            if kind not in table:
                raise LlmkitError(f"GGUF tensor {t.name} has no mapping for {arch}; the file is not a plain {arch}")
            module = table[kind]
            if gemma and kind == "ffn_norm":
                module = "pre_feedforward_layernorm"
            if arch == "phi3" and kind == "ffn_up":
                module = "mlp.gate_up_proj"  # llama.cpp keeps Phi-3's fused [gate; up] rows as ffn_up
            name = f"{base}{'h' if gpt2 else 'layers'}.{i}.{module}.{suffix}"
            if arch == "llama" and kind in ("attn_q", "attn_k") and suffix == "weight":
                w = _unpermute(w, hf["num_attention_heads"] if kind == "attn_q" else hf["num_key_value_heads"])
            if gpt2 and suffix == "weight" and kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
                w = w.t()  # GPT-2's Conv1D keeps (in, out)
        else:
            top = {"token_embd": "embed_tokens" if not gpt2 else "wte", "position_embd": "wpe",
                   "output_norm": "norm" if not gpt2 else "ln_f"}
            if stem == "output":
                name = f"lm_head.{suffix}"
            elif stem in top:
                name = f"{base}{top[stem]}.{suffix}"
            else:
                raise LlmkitError(f"GGUF tensor {t.name} has no mapping for {arch}; the file is not a plain {arch}")
        if gemma and stem.endswith("norm") and suffix == "weight":
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
        out[name] = w.contiguous()
    return out


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(HF config dict, HF state dict in fp32, transformers tokenizer or None) of a GGUF file."""
    arch = check_gguf(path)
    reader = _reader(path)
    names = {t.name for t in reader.tensors}
    hf = gguf_config(reader, arch, names)
    sd = gguf_state(reader, arch, hf)
    tok = None
    if _field(reader, "tokenizer.ggml.model") is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, OSError, KeyError) as e:
            raise LlmkitError(f"transformers could not build the tokenizer of {path} "
                              f"({str(e).splitlines()[0][:160]})") from e
    return hf, sd, tok
