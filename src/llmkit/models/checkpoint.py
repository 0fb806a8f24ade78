"""Checkpoint folders: model.safetensors + config.json + tokenizer.json (+ training_state.pt to resume).

A save goes through `fsutil.atomic_folder`, so a crash mid-save leaves either the old checkpoint or the
new one, never a mix. Files in the folder that are not part of the checkpoint
(metrics.jsonl, loss.png, ...) are carried over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import atomic_folder, read_json, resolve_folder
from llmkit.models.config import ModelConfig
from llmkit.tokenizer import Tokenizer

WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "training_state.pt"
FORMAT_VERSION = 1


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied (shared-storage) tensors stored once: safetensors refuses aliases."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(folder: str | Path, model: nn.Module, cfg: ModelConfig, tokenizer: Tokenizer | None = None,
                    meta: dict[str, Any] | None = None, training_state: dict[str, Any] | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Atomically write a checkpoint folder. `meta` goes into config.json beside the model config.

    extra_tensors: more safetensors files to write, e.g. {"adapter.safetensors": {...}}.
    """
    folder = Path(folder)
    with atomic_folder(folder, carry_over=True, skip=(STATE,)) as tmp:
        tensors = _unique_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "llmkit": str(FORMAT_VERSION)})
        for name, tensors_ in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors_.items()}, str(tmp / name))
        body = {"llmkit_format": FORMAT_VERSION, "model": cfg.to_dict(), **(meta or {})}
        (tmp / CONFIG).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
    return folder


def resolve_checkpoint(folder: str | Path) -> Path:
    folder = resolve_folder(folder)  # a save interrupted between its two renames: the previous one survives
    if not folder.exists():
        raise LlmkitError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise LlmkitError(f"{folder} is a file, not a checkpoint folder (expected config.json + model.safetensors)")
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise LlmkitError(f"{folder} is not an llmkit checkpoint: it needs {CONFIG} and {WEIGHTS}")
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The whole config.json of a checkpoint (model config under "model", plus task metadata)."""
    return read_json(resolve_checkpoint(folder) / CONFIG, "the checkpoint")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a truncated/corrupt file into one clear error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); "
                          "re-save or re-download the checkpoint") from e


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy tensors into `model`, naming any missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    ptr_names: dict[int, list[str]] = {}
    for name, t in own.items():
        ptr_names.setdefault(t.data_ptr(), []).append(name)
    tied = {n for names in ptr_names.values() if len(names) > 1 for n in names}
    missing = [n for n in own if n not in tensors and not (n in tied and any(a in tensors for a in ptr_names[own[n].data_ptr()]))]
    unexpected = [n for n in tensors if n not in own]
    if missing or unexpected:
        raise LlmkitError(f"{source} does not match the model config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}; was it saved from a different architecture?")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise LlmkitError(f"{source}: tensor {name} has shape {tuple(t.shape)} but the config implies "
                              f"{tuple(own[name].shape)}; config.json and the weights disagree")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG/data state saved beside the weights, for `--resume`."""
    path = resolve_checkpoint(folder) / STATE
    if not path.exists():
        raise LlmkitError(f"{path.parent} has no {STATE}: it cannot be resumed (it was saved without "
                          "training state, e.g. by convert or a final export); start a new run instead")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LlmkitError(f"{path} is corrupt or truncated ({type(e).__name__}); resume from an earlier checkpoint") from e
