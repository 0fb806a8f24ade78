"""`llmkit quantize CKPT OUT --bits 8|4`: write a weight-only quantized copy of a checkpoint folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.models.checkpoint import CONFIG, STATE, WEIGHTS, read_meta, resolve_checkpoint, save_checkpoint
from llmkit.models.load import load_model
from llmkit.models.quant import check_format, quantize_model
from llmkit.tokenizer import Tokenizer


def quantize(checkpoint: str, out: str, *, bits: int = 8, group_size: int | None = None,
             head_bits: int = 8) -> Path:
    """Quantize every Linear layer's weight to int8 (per output channel) or int4 (grouped, with zero points).

    Embeddings and norms stay fp32. The result is a normal checkpoint folder (config.json records the
    format under "quantization") that `llmkit.load`, `generate`, `chat`, `serve`, the apps and `evaluate` run.

    Args:
        checkpoint: the fp32 checkpoint folder to quantize.
        out: the folder to write (replaced atomically; nothing is written on an error).
        bits: 8 (int8, one scale per output channel) or 4 (int4, a scale and a minimum per group).
        group_size: int4 only: input columns per scale (32, 64, 128 or 256; default 32, as GGUF Q4).
        head_bits: the vocabulary projection (lm_head); default 8 (with --bits 4 too: an int4 head costs
            SmolLM2-135M 8 % perplexity, an int8 one nothing measurable, as in llama.cpp's Q4 files).

    Examples:
        llmkit quantize runs/smollm2 runs/smollm2-int8 --bits 8
        llmkit quantize runs/smollm2 runs/smollm2-int4 --bits 4 --group_size 64
        llmkit quantize runs/smollm2 runs/smollm2-int4-all --bits 4 --head_bits 4
    """
    if bits == 4 and group_size is None:
        group_size = 32
    check_format(bits, group_size)
    if head_bits not in (4, 8):
        raise LlmkitError(f"--head_bits {head_bits} is not supported; use 8 (the default) or 4")
    folder = resolve_checkpoint(checkpoint)
    meta = read_meta(folder)
    if "quantization" in meta:
        q = meta["quantization"]
        raise LlmkitError(f"{folder} is already quantized (int{q.get('bits')}); quantize the fp32 checkpoint it "
                          "came from instead")
    if "heads" in meta:
        raise LlmkitError(f"{folder} is a fine-tuned task model (heads {sorted(meta['heads'])}); only language "
                          "model checkpoints are quantized")
    if "multimodal" in meta:
        raise LlmkitError(f"{folder} is a multimodal checkpoint; only language model checkpoints are quantized")
    if meta.get("model", {}).get("arch") == "lstm":
        raise LlmkitError("the LSTM baseline has no Linear layers worth quantizing; quantize a Transformer checkpoint")
    if Path(out).resolve() == folder.resolve():
        raise LlmkitError("OUT is the checkpoint itself; write the quantized copy to a new folder")
    model, _ = load_model(folder)
    record = quantize_model(model, bits, group_size, head_bits)
    tok = Tokenizer.load(folder) if (folder / "tokenizer.json").exists() else None
    keep = {k: v for k, v in meta.items() if k not in ("llmkit_format", "model")}
    extras = [p for p in folder.iterdir() if p.is_file() and p.name not in (WEIGHTS, CONFIG, STATE, "tokenizer.json")]
    dest = save_checkpoint(out, model, model.cfg, tok, meta={**keep, "quantization": record})
    for p in extras:  # files beside the weights (hf_extra.safetensors, chat templates, metrics) come along
        if not (dest / p.name).exists():
            shutil.copy2(p, dest / p.name)
    n = len(record["modules"])
    head = f", lm_head int{head_bits}" if "lm_head" in record["modules"] and head_bits != bits else ""
    print(f"quantized {n} Linear layers to int{bits}" + (f" (group {group_size})" if bits == 4 else "") + head
          + f" -> {dest}")
    return dest
