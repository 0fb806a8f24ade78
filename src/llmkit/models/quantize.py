"""`llmkit quantize CKPT OUT --bits 8|4`: write a weight-only quantized copy of a checkpoint folder."""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path
from typing import Any

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models import smooth
from llmkit.models.checkpoint import CONFIG, STATE, WEIGHTS, read_meta, resolve_checkpoint, save_checkpoint
from llmkit.models.load import load_model
from llmkit.models.quant import HEAD, check_format, quantize_model
from llmkit.tokenizer import Tokenizer

CALIBRATION_TOKENS = 4096  # 8 windows of 512 tokens: what the measurements in docs/inference.md used


def default_calibration_text() -> str:
    """The embedded World English Bible's first 600 verses (Genesis): the calibration text when none is
    given; the benchmarks' held-out text is the Bible's last verses."""
    from llmkit.data.corpus import bible_verses

    return " ".join(islice(bible_verses(), 600))


def quantize_in_place(model: nn.Module, bits: int, group_size: int | None = None, head_bits: int | None = 8,
                      act_bits: int = 8, calibration: list[int] | None = None) -> dict[str, Any]:
    """What `llmkit quantize` does to a loaded model: int8 with act_bits 8 first smooths the inputs of every
    block's layers over the `calibration` token ids (models/smooth.py) and gives those layers int8
    activations, and an int8 head too (unsmoothed: its input is the final norm's, tied to the embeddings;
    SmolLM2-135M decode-path perplexity +0.71 % against +0.52 % with int16, and smoothing it gave +1.09 %);
    then every Linear is quantized. Returns the config.json "quantization" record."""
    act8: list[str] = []
    if bits == 8 and act_bits == 8:
        why = smooth.why_not(model)
        if why:
            print(f"note: int16 activations kept ({why}); int8 activations need a smoothable pre-norm decoder")
        else:
            if not calibration:
                raise LlmkitError("int8 activations need calibration text; give --calibration FILE or --act_bits 16")
            act8 = smooth.smooth(model, smooth.calibrate(model, calibration[:CALIBRATION_TOKENS])) + [HEAD]
    record = quantize_model(model, bits, group_size, head_bits, act8=act8)
    if act8:
        record["smoothing"] = {"alpha": smooth.ALPHA, "calibration_tokens": min(len(calibration or []),
                                                                                 CALIBRATION_TOKENS)}
    return record


def quantize(checkpoint: str, out: str, *, bits: int = 8, group_size: int | None = None,
             head_bits: int = 8, act_bits: int = 8, calibration: str | None = None) -> Path:
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
        act_bits: int8 weights: 8 (default) smooths each block's layer inputs over the calibration text and
            rounds them to int8 when decoding (twice the int16 products' speed for batches, docs/inference.md);
            16 keeps int16 activations everywhere. An int8 head takes int8 activations too (unsmoothed).
        calibration: a UTF-8 text file for act_bits 8 (its first 4,096 tokens); default the embedded Bible's
            first 600 verses.

    Examples:
        llmkit quantize runs/smollm2 runs/smollm2-int8 --bits 8
        llmkit quantize runs/smollm2 runs/smollm2-int4 --bits 4 --group_size 64
        llmkit quantize runs/smollm2 runs/smollm2-int4-all --bits 4 --head_bits 4
        llmkit quantize runs/smollm2 runs/smollm2-int8 --bits 8 --calibration my_domain.txt
    """
    if bits == 4 and group_size is None:
        group_size = 32
    check_format(bits, group_size)
    if head_bits not in (4, 8):
        raise LlmkitError(f"--head_bits {head_bits} is not supported; use 8 (the default) or 4")
    if act_bits not in (8, 16):
        raise LlmkitError(f"--act_bits {act_bits} is not supported; use 8 (the default) or 16")
    if bits == 4:
        act_bits = 16  # int4 layers round x to int8 per 32-column block on their own (qmm.cpp)
    if calibration is not None and not Path(calibration).is_file():
        raise LlmkitError(f"--calibration {calibration}: no such file; give a UTF-8 text file")
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
    tok = Tokenizer.load(folder) if (folder / "tokenizer.json").exists() else None
    ids = None
    if bits == 8 and act_bits == 8:
        if tok is None:
            raise LlmkitError(f"{folder} has no tokenizer.json to read calibration text with; add one or quantize "
                              "with --act_bits 16")
        text = (Path(calibration).read_text(encoding="utf-8", errors="replace") if calibration
                else default_calibration_text())
        ids = tok.encode(text)
    record = quantize_in_place(model, bits, group_size, head_bits, act_bits, ids)
    keep = {k: v for k, v in meta.items() if k not in ("llmkit_format", "model")}
    extras = [p for p in folder.iterdir() if p.is_file() and p.name not in (WEIGHTS, CONFIG, STATE, "tokenizer.json")]
    dest = save_checkpoint(out, model, model.cfg, tok, meta={**keep, "quantization": record})
    for p in extras:  # files beside the weights (hf_extra.safetensors, chat templates, metrics) come along
        if not (dest / p.name).exists():
            shutil.copy2(p, dest / p.name)
    n = len(record["modules"])
    head = f", lm_head int{head_bits}" if "lm_head" in record["modules"] and head_bits != bits else ""
    n8 = sum(1 for spec in record["modules"].values() if spec.get("act_bits") == 8)
    acts = f", {n8} with int8 activations (smoothed)" if n8 else ""
    print(f"quantized {n} Linear layers to int{bits}" + (f" (group {group_size})" if bits == 4 else "") + head
          + acts + f" -> {dest}")
    return dest
