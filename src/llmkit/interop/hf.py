"""Hugging Face <-> llmkit: config translation and one name map per family, both ways.

Families: GPT-2 and BERT here, the Llama-like decoders (Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 2,
Gemma 3) in `hf_decoders`. The map is data (`hf_rules.Rule`): for every llmkit tensor, the HF tensor(s)
it comes from and how. Import and export walk the same table, so a round trip is exact by construction
and the parity tests check the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from llmkit.errors import LlmkitError
from llmkit.interop.hf_decoders import (
    DECODERS,
    Decoder,
    decoder_config_from_hf,
    decoder_config_to_hf,
    decoder_rules,
    fits,
)
from llmkit.interop.hf_rules import ACT_HF, Rule, act, linear, need, norm
from llmkit.models.checkpoint import load_tensors
from llmkit.models.config import ModelConfig

Family = Literal["gpt2", "bert", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]

# HF `architectures[0]` -> (family, has LM/MLM head)
ARCHITECTURES: dict[str, tuple[Family, bool]] = {
    "GPT2LMHeadModel": ("gpt2", True),
    "BertForMaskedLM": ("bert", True),
    "BertModel": ("bert", False),
    "BertForPreTraining": ("bert", True),  # MLM head + pooler/NSP head (NSP_TENSORS)
    **{arch: (fam, True) for fam, (arch, _, _) in DECODERS.items()},
}
_MODEL_TYPE_DEFAULT = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel",
                       **{mt: arch for arch, mt, _ in DECODERS.values()}}
BASE_PREFIX: dict[Family, str] = {"gpt2": "transformer.", "bert": "bert.", **{f: "model." for f in DECODERS}}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# the order in which export tries the Llama-like families when the checkpoint's own does not fit
_EXPORT_ORDER: tuple[Decoder, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3")
# tensors HF keeps that carry no weights (causal-mask buffers, cached RoPE frequencies, position ids)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq",
                     "cls.predictions.decoder.bias")  # the last is an alias of cls.predictions.bias

# BertForPreTraining's next-sentence side: llmkit's "nsp" head (models/heads.py NSPHead) <-> HF tensors
NSP_TENSORS = {"heads.nsp.pooler.weight": "bert.pooler.dense.weight", "heads.nsp.pooler.bias": "bert.pooler.dense.bias",
               "heads.nsp.out.weight": "cls.seq_relationship.weight", "heads.nsp.out.bias": "cls.seq_relationship.bias"}


# ----------------------------------------------------------------------------------------------- configs


# vision-language wrappers whose language model llmkit imports on its own: arch -> (text arch, weight prefix)
_MULTIMODAL = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", "language_model.")}


def text_model_of(hf: dict[str, Any], sd: dict[str, torch.Tensor] | None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The language model of a vision-language checkpoint (Gemma 3 4B+): its text_config as the config and
    its weights under the plain text-model names; the vision tower and projector are dropped (with a note)."""
    arch = (hf.get("architectures") or [""])[0]
    if arch not in _MULTIMODAL:
        return hf, sd
    text_arch, prefix = _MULTIMODAL[arch]
    text = {**need(hf, "text_config"), "architectures": [text_arch]}
    for k in ("tie_word_embeddings", *_TOKEN_IDS):
        if k not in text and hf.get(k) is not None:
            text[k] = hf[k]
    if sd is None:
        return text, None
    kept = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    dropped = len(sd) - len(kept)
    print(f"note: {arch}: importing the language model only ({dropped} vision tower/projector tensors dropped)",
          file=sys.stderr)
    return text, kept


def family_of(hf: dict[str, Any]) -> tuple[Family, str, bool]:
    """(family, HF architecture name, has head) of an HF config.json dict; one clear error otherwise."""
    archs = hf.get("architectures") or []
    name = archs[0] if archs else _MODEL_TYPE_DEFAULT.get(str(hf.get("model_type")), "")
    if name not in ARCHITECTURES:
        raise LlmkitError(f"unsupported architecture {name or hf.get('model_type')!r} (model_type "
                          f"{hf.get('model_type')!r}) in config.json; llmkit converts {', '.join(ARCHITECTURES)}")
    family, head = ARCHITECTURES[name]
    return family, name, head


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, Family, str, bool]:
    """Translate an HF config.json dict to a `ModelConfig` (+ family, architecture, has head)."""
    family, arch, head = family_of(hf)
    src = {"format": "hf", "architecture": arch, "model_type": hf.get("model_type"),
           "token_ids": {k: hf[k] for k in _TOKEN_IDS if hf.get(k) is not None}}  # to-hf falls back to these
    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise LlmkitError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                              "are not supported")
        d = need(hf, "n_embd", "hidden_size")
        cfg = dict(arch="decoder", norm="layernorm", mlp="standard", pos="learned", prenorm=True, bias=True,
                   vocab_size=need(hf, "vocab_size"), block_size=need(hf, "n_positions", "max_position_embeddings"),
                   n_layer=need(hf, "n_layer", "num_hidden_layers"), n_head=need(hf, "n_head", "num_attention_heads"),
                   d_model=d, d_ff=hf.get("n_inner") or 4 * d, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   activation=act(hf.get("activation_function", "gelu_new")),
                   tie_embeddings=hf.get("tie_word_embeddings", True))
    elif family in DECODERS:
        cfg = decoder_config_from_hf(hf, family)
    else:
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise LlmkitError(f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                              "only absolute positions convert")
        cfg = dict(arch="encoder", norm="layernorm", mlp="standard", pos="learned", prenorm=False, bias=True,
                   embed_norm=True, vocab_size=need(hf, "vocab_size"), block_size=need(hf, "max_position_embeddings"),
                   n_layer=need(hf, "num_hidden_layers"), n_head=need(hf, "num_attention_heads"),
                   d_model=need(hf, "hidden_size"), d_ff=need(hf, "intermediate_size"),
                   norm_eps=float(hf.get("layer_norm_eps", 1e-12)), activation=act(hf.get("hidden_act", "gelu")),
                   type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id"),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    return ModelConfig(**cfg, extra={"source": src}), family, arch, head


def config_to_hf(cfg: ModelConfig, family: Family, head: bool, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """The HF config.json for `cfg` in `family` (what `AutoConfig.from_pretrained` reads)."""
    common: dict[str, Any] = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                              "torch_dtype": "float32"}
    source_ids = ((cfg.extra or {}).get("source") or {}).get("token_ids") or {}
    for k, v in zip(_TOKEN_IDS, (bos_id, eos_id, pad_id)):
        if v is not None or source_ids.get(k) is not None:
            common[k] = v if v is not None else source_ids[k]
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.d_ff, "activation_function": ACT_HF[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True}
    if family in DECODERS:
        return decoder_config_to_hf(cfg, family, common)
    return {"architectures": ["BertForMaskedLM" if head else "BertModel"], "model_type": "bert", **common,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": ACT_HF[cfg.activation],
            "max_position_embeddings": cfg.block_size, "type_vocab_size": max(cfg.type_vocab_size, 1),
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def export_family(cfg: ModelConfig) -> Family:
    """Which HF family represents `cfg` exactly; names the first field that has no HF counterpart."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise LlmkitError(f"this checkpoint cannot be exported to Hugging Face: {what}")

    need(cfg.arch in ("decoder", "encoder"), f"arch {cfg.arch!r} has no transformers counterpart (decoder/encoder only)")
    need(cfg.activation in ACT_HF, f"activation {cfg.activation!r}")
    need(not cfg.embed_scale or cfg.pos == "rope", "embed_scale=True (sqrt(d_model) embedding scaling)")
    if cfg.arch == "encoder":
        need(cfg.pos == "learned" and cfg.norm == "layernorm" and not cfg.prenorm and cfg.embed_norm
             and cfg.mlp == "standard" and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model,
             "only BERT-shaped encoders (learned positions, post-norm LayerNorm, embedding norm, MHA) export")
        return "bert"
    need(cfg.prenorm, "post-norm decoders have no transformers counterpart")
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "standard":
        need(cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model and not cfg.type_vocab_size,
             "GPT-2 needs n_kv_head == n_head and head_dim * n_head == d_model")
        return "gpt2"
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "gated":
        # the family it was imported from if that still fits (Phi-3 stays Phi-3), else the first that does
        source = str(((cfg.extra or {}).get("source") or {}).get("model_type"))
        own = [f for f, (_, mt, _) in DECODERS.items() if mt == source]
        for fam in own + list(_EXPORT_ORDER):
            if not fits(cfg, fam):
                return fam
        raise LlmkitError(f"this checkpoint cannot be exported to Hugging Face: no transformers family has all of "
                          f"{', '.join(sorted(fits(cfg, 'gemma3') | fits(cfg, 'llama')))}")
    raise LlmkitError(f"this checkpoint cannot be exported to Hugging Face: pos={cfg.pos}, norm={cfg.norm}, "
                      f"mlp={cfg.mlp} matches neither GPT-2 (learned/layernorm/standard) nor a Llama-like "
                      "decoder (rope/rmsnorm/gated)")


# ----------------------------------------------------------------------------------------------- name maps


def rules_for(cfg: ModelConfig, family: Family, head: bool) -> list[Rule]:
    """The full name map; HF names are given with their base-model prefix stripped (see BASE_PREFIX)."""
    b = cfg.bias
    r: list[Rule] = []
    if family == "gpt2":
        ln_bias = cfg.bias  # llmkit decoders without bias have bias-free LayerNorms: export as zeros
        r += [Rule("tok_emb.weight", ("wte.weight",)), Rule("pos_emb.weight", ("wpe.weight",))]
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}", f"h.{i}"
            r += norm(f"{o}.norm1", f"{h}.ln_1", True, ln_bias)
            r += linear(f"{o}.attn.qkv", f"{h}.attn.c_attn", b, "t", always_bias=True)
            r += linear(f"{o}.attn.proj", f"{h}.attn.c_proj", b, "t", always_bias=True)
            r += norm(f"{o}.norm2", f"{h}.ln_2", True, ln_bias)
            r += linear(f"{o}.mlp.fc", f"{h}.mlp.c_fc", b, "t", always_bias=True)
            r += linear(f"{o}.mlp.proj", f"{h}.mlp.c_proj", b, "t", always_bias=True)
        r += norm("final_norm", "ln_f", True, ln_bias)
    elif family in DECODERS:
        r = decoder_rules(cfg, family)
    else:
        e = "embeddings"
        r += [Rule("tok_emb.weight", (f"{e}.word_embeddings.weight",)),
              Rule("pos_emb.weight", (f"{e}.position_embeddings.weight",))]
        if cfg.type_vocab_size:
            r.append(Rule("type_emb.weight", (f"{e}.token_type_embeddings.weight",)))
        r += norm("emb_norm", f"{e}.LayerNorm", True)
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}", f"encoder.layer.{i}"
            qkv = tuple(f"{h}.attention.self.{p}" for p in ("query", "key", "value"))
            r.append(Rule(f"{o}.attn.qkv.weight", tuple(f"{n}.weight" for n in qkv), "cat"))
            r.append(Rule(f"{o}.attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), "cat", optional=not b))
            r += linear(f"{o}.attn.proj", f"{h}.attention.output.dense", b, always_bias=True)
            r += norm(f"{o}.norm1", f"{h}.attention.output.LayerNorm", True)
            r += linear(f"{o}.mlp.fc", f"{h}.intermediate.dense", b, always_bias=True)
            r += linear(f"{o}.mlp.proj", f"{h}.output.dense", b, always_bias=True)
            r += norm(f"{o}.norm2", f"{h}.output.LayerNorm", True)
        if head:  # BertForMaskedLM's prediction head lives outside the `bert.` base model
            r += linear("mlm_dense", "@cls.predictions.transform.dense", True)
            r += norm("mlm_norm", "@cls.predictions.transform.LayerNorm", True)
            r.append(Rule("lm_bias", ("@cls.predictions.bias",)))
    if not cfg.tie_embeddings:
        r.append(Rule("lm_head.weight", ("@cls.predictions.decoder.weight" if family == "bert" else "@lm_head.weight",)))
    return r


def _hf_key(name: str, family: Family) -> str:
    """Full HF key: '@' marks names outside the base model, the rest get the base prefix."""
    return name[1:] if name.startswith("@") else BASE_PREFIX[family] + name


def _normalise_keys(sd: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Accept both `transformer.h.0...` (head model) and `h.0...` (base model) spellings."""
    prefix = BASE_PREFIX[family]
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix) or k in ("lm_head.weight",) or k.startswith("cls."):
            out[k] = v
        else:
            out[prefix + k] = v
    return out


def state_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, family: Family, head: bool,
                  expected: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF state dict -> (llmkit tensors, leftover HF tensors such as BERT's pooler). Checks names and shapes."""
    sd = _normalise_keys(sd, family)
    rules = rules_for(cfg, family, head)
    missing = [_hf_key(t, family) for r in rules for t in r.theirs if _hf_key(t, family) not in sd]
    if missing:
        raise LlmkitError(f"the weights lack {len(missing)} tensor(s) the config implies, e.g. {missing[:3]}; "
                          "are config.json and the weights from the same model?")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for r in rules:
        keys = [_hf_key(t, family) for t in r.theirs]
        used.update(keys)
        ts = [sd[k].float() for k in keys]
        if r.how == "half":  # one half of a fused HF tensor's rows (Phi-3 gate_up_proj)
            t = ts[0].chunk(2, 0)[r.part]
        else:
            t = ts[0].t() if r.how == "t" else torch.cat(ts, 0) if r.how == "cat" else ts[0]
        want = expected.get(r.ours)
        if want is not None and t.shape != want:
            raise LlmkitError(f"tensor {keys[0]} has shape {tuple(ts[0].shape)}, which does not fit llmkit's "
                              f"{r.ours} {tuple(want)}; config.json and the weights disagree")
        out[r.ours] = t.contiguous()
    tied = ("lm_head.weight", "cls.predictions.decoder.weight") if cfg.tie_embeddings else ()
    leftover = {k: v for k, v in sd.items()
                if k not in used and k not in tied and not k.endswith(_IGNORED_SUFFIXES)}
    return out, leftover


def state_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, family: Family, head: bool) -> dict[str, torch.Tensor]:
    """llmkit state dict -> HF tensors (full HF key names); missing optional biases become zeros."""
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, list[torch.Tensor]] = {}
    sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    for r in rules_for(cfg, family, head):
        keys = [_hf_key(t, family) for t in r.theirs]
        if r.ours not in sd:
            if not r.optional:
                raise LlmkitError(f"the checkpoint lacks {r.ours}; was it saved from a different architecture?")
            width = _bias_width(r.ours, cfg)
            out[keys[0]] = torch.zeros(width)
            continue
        t = sd[r.ours].detach().float()
        if r.how == "t":
            out[keys[0]] = t.t().contiguous()
        elif r.how == "cat":
            for k, part in zip(keys, t.split(sizes, 0)):
                out[k] = part.contiguous()
        elif r.how == "half":  # rules list part 0 before part 1
            halves.setdefault(keys[0], []).append(t)
            if len(halves[keys[0]]) == 2:
                out[keys[0]] = torch.cat(halves.pop(keys[0]), 0).contiguous()
        else:
            out[keys[0]] = t.contiguous()
    if family == "bert" and cfg.type_vocab_size == 0:  # HF BERT always has segment embeddings: one zero row
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.d_model)
    return out


def _bias_width(name: str, cfg: ModelConfig) -> int:
    if ".attn.qkv." in name:
        return (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    if ".mlp.fc." in name:
        return cfg.d_ff
    return cfg.d_model


# ----------------------------------------------------------------------------------------------- HF folders


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise LlmkitError(f"{folder} has no config.json; give a Hugging Face model folder (or a .gguf file)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LlmkitError(f"{path} is not valid JSON ({e.msg})") from e
    if "model" in hf and "llmkit_format" in hf:
        raise LlmkitError(f"{folder} is already an llmkit checkpoint; use it directly (or `convert to-hf`)")
    return hf


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors (maybe sharded) or pytorch_model.bin (weights_only)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(_read_one(folder / f))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return _read_one(folder / name)
    raise LlmkitError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin)")


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LlmkitError(f"weight shard {path} is missing")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code in it, or a truncated file
        raise LlmkitError(f"{path} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "convert it to safetensors first") from e
