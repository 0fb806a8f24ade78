"""Tokenizers across the HF boundary: read tokenizer.json + special-token roles + chat template from an HF
folder (or a transformers tokenizer built from GGUF metadata), and write files `AutoTokenizer` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")


def _content(v: Any) -> str | None:
    """A special token as str: HF files store either "<s>" or {"content": "<s>", ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _clean(tok: HFTokenizer) -> HFTokenizer:
    """Drop fixed padding/truncation some tokenizer.json files carry (MiniLM pads every text to 128)."""
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenizer_from_folder(folder: Path) -> Tokenizer | None:
    """The tokenizer of an HF model folder, or None if it has no tokenizer.json (caller warns)."""
    file = folder / "tokenizer.json"
    if not file.exists():
        return None
    try:
        tok = _clean(HFTokenizer.from_file(str(file)))
    except Exception as e:  # tokenizers raises bare Exception subclasses
        raise LlmkitError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
    meta: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        p = folder / name
        if p.exists():
            try:
                meta.update(json.loads(p.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{p} is not valid JSON ({e.msg})") from e
    specials = {r: t for r in ROLES if (t := _content(meta.get(f"{r}_token"))) is not None}
    template = meta.get("chat_template")
    jinja = folder / "chat_template.jinja"  # transformers >= 4.47 writes the template to its own file
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Tokenizer(tok, specials or None, template if isinstance(template, str) else None)


def tokenizer_from_transformers(hf_tok: Any) -> Tokenizer:
    """Wrap a transformers fast tokenizer (e.g. the one built from GGUF metadata) as an llmkit Tokenizer."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise LlmkitError("this tokenizer has no fast (tokenizers) backend; llmkit needs a tokenizer.json")
    tok = _clean(HFTokenizer.from_str(backend.to_str()))
    specials = {r: t for r in ROLES if isinstance(t := getattr(hf_tok, f"{r}_token", None), str)}
    template = getattr(hf_tok, "chat_template", None)
    return Tokenizer(tok, specials, template if isinstance(template, str) else None)


def save_for_transformers(tok: Tokenizer, out: Path, decoder: bool, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(out)` reads without llmkit."""
    tok.tok.save(str(out / "tokenizer.json"))
    meta: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                            "clean_up_tokenization_spaces": False}
    meta.update({f"{r}_token": t for r, t in tok.specials.items()})
    if decoder:  # Llama/GPT-2 forward() takes no token_type_ids
        meta["model_input_names"] = ["input_ids", "attention_mask"]
    if tok.chat_template:
        meta["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({f"{r}_token": t for r, t in tok.specials.items()}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
