"""GGUF files (llama.cpp's format) in, through transformers' GGUF loader, dequantised to fp32.

We check the file ourselves first (architecture, quantisation types) so an unsupported file fails in a
second with one clear line instead of a transformers traceback after a long load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError

SUPPORTED_ARCHS = ("llama", "gpt2")  # GGUF general.architecture values whose transformers class we map


def check_gguf(path: Path) -> str:
    """Validate a GGUF file without dequantising it; returns its architecture."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file
        raise LlmkitError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:100]})") from e
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in SUPPORTED_ARCHS:
        raise LlmkitError(f"GGUF architecture {arch!r} is not supported; llmkit imports {', '.join(SUPPORTED_ARCHS)}")
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


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(transformers model in fp32, transformers tokenizer) of a GGUF file (~16 s for a 135M model)."""
    check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as e:
        raise LlmkitError(f"transformers could not load {path} ({str(e).splitlines()[0][:160]})") from e
    return model.eval(), hf_tok


def hf_config_dict(model: Any) -> dict[str, Any]:
    """The config.json dict of a loaded transformers model, without GGUF loading details."""
    hf = model.config.to_dict()
    hf.pop("quantization_config", None)
    return hf
