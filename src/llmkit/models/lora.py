"""LoRA (Hu et al. 2021) as a module swap: y = x W^T + b + (alpha/r) * dropout(x) A^T B^T, with W frozen.

`apply_lora` swaps chosen `nn.Linear` modules for `LoRALinear`, which keeps the very same weight and bias
Parameters (so parameter names and the base checkpoint layout do not change) and adds `lora_A` (r, in) and
`lora_B` (out, r). B starts at zero, so an adapted model starts out identical to its base. An adapter folder
holds only adapter.safetensors + adapter_config.json; `merge_lora` folds W += (alpha/r) B A back in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import atomic_file, atomic_write_json, read_json
from llmkit.models.checkpoint import load_tensors, save_checkpoint
from llmkit.models.config import ModelConfig
from llmkit.models.load import load_model
from llmkit.tokenizer import Tokenizer

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


class LoRALinear(nn.Linear):
    """An `nn.Linear` whose frozen weight gets a trainable low-rank update B A scaled by alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # skip nn.Linear's allocation: reuse base's Parameters as they are
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out): base path + low-rank path through r dimensions
        return super().forward(x) + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha/r) B A, shape (out, in), that merging adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _linear_kinds(model: nn.Module) -> list[str]:
    """Names of the Linear modules, with layer numbers folded ("blocks.{i}.attn.qkv"), for error messages."""
    kinds = [re.sub(r"\.\d+\.", ".{i}.", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(kinds))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted modules of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0, *, train_also: Sequence[str] = ()) -> list[str]:
    """Freeze every base weight and adapt each `nn.Linear` whose name ends with one of `targets`.

    targets: module-name suffixes such as "attn.qkv", "attn.proj", "mlp.fc", "mlp.gate", "mlp.proj".
    train_also: name prefixes of modules that stay fully trainable and are saved with the adapter
        (e.g. a new classification head); their parameters are not adapted, just trained.
    Returns the names of the adapted modules.
    """
    if r <= 0:
        raise LlmkitError(f"LoRA rank must be a positive integer, got lora_r={r}")
    if alpha <= 0:
        raise LlmkitError(f"lora_alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise LlmkitError(f"lora_dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise LlmkitError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    targets = [t.strip().strip(".") for t in targets if t.strip()]
    if not targets:
        raise LlmkitError(f"no LoRA targets given; choose module names among {', '.join(_linear_kinds(model))}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for t in targets:
        hits = [n for n in linears if n == t or n.endswith("." + t)]
        if not hits:
            raise LlmkitError(f"unknown LoRA target {t!r}: no Linear module is named like it; "
                              f"the model has {', '.join(_linear_kinds(model))}")
        chosen += [n for n in hits if n not in chosen]
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for n in chosen:
        names = owners[id(linears[n].weight)]
        if len(names) > 1:
            raise LlmkitError(f"cannot adapt {n}: its weight is tied to {[x for x in names if not x.startswith(n + '.')]}"
                              "; merging would change both, so leave it out of --lora_targets")
    known = {n for n, _ in model.named_modules()}
    for prefix in train_also:
        if prefix not in known:
            raise LlmkitError(f"train_also module {prefix!r} does not exist in the model")
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        _set_module(model, n, LoRALinear(linears[n], r, alpha, dropout))
    for prefix in train_also:
        for p in model.get_submodule(prefix).parameters():
            p.requires_grad_(True)
    model._lora_meta = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                        "modules": chosen, "train_also": list(train_also), "_trainable_before": trainable_before}
    return chosen


def lora_config(model: nn.Module) -> dict[str, Any]:
    """r, alpha, dropout, targets, modules and train_also of an adapted model (what adapter_config.json holds)."""
    meta = getattr(model, "_lora_meta", None)
    if meta is None or not lora_modules(model):
        raise LlmkitError("the model has no LoRA adapters; call apply_lora first")
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (lora_A/lora_B, plus `train_also` modules): what an adapter file holds."""
    cfg = lora_config(model)
    prefixes = tuple(p + "." for p in cfg["train_also"])
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if ".lora_A" in n or ".lora_B" in n or n.startswith(prefixes)}


def save_adapter(folder: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Atomically write adapter.safetensors + adapter_config.json into `folder` (other files there are kept).

    meta: extra keys for adapter_config.json (e.g. {"base": "runs/smollm2"}).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    body = {"llmkit_adapter": 1, **lora_config(model), **(meta or {})}
    # weights first, config last: a folder with a config always has matching weights
    with atomic_file(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, body)
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, with a clear error when it is not one."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise LlmkitError(f"{folder} is not a LoRA adapter folder: it has no {ADAPTER_CONFIG} "
                          "(train one with `llmkit finetune sft --lora_r 8 ...`)")
    cfg = read_json(path, "the adapter")
    for key in ("r", "alpha", "targets"):
        if key not in cfg:
            raise LlmkitError(f"{path} lacks {key!r}; it was not written by llmkit's save_adapter")
    return cfg


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Add the adapters saved in `folder` to `model` (apply_lora with the saved settings + its tensors)."""
    cfg = read_adapter_config(folder)
    tensors = load_tensors(Path(folder) / ADAPTER_WEIGHTS)
    names = apply_lora(model, int(cfg["r"]), float(cfg["alpha"]), cfg["targets"], float(cfg.get("dropout", 0.0)),
                       train_also=cfg.get("train_also", []))
    try:
        _copy_adapter(model, tensors, cfg, names, folder)
    except LlmkitError:
        remove_lora(model)  # leave the model as it was, not half-adapted
        raise
    return names


def _copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], names: list[str],
                  folder: str | Path) -> None:
    if cfg.get("modules") and sorted(cfg["modules"]) != sorted(names):
        raise LlmkitError(f"adapter {folder} was trained on modules {cfg['modules'][:4]}... but this model gives "
                          f"{names[:4]}...; load it onto the base model it was trained from")
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise LlmkitError(f"adapter {folder} does not fit this model: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}; load it onto the base model it was trained from")
    params = dict(model.named_parameters())
    for n, t in tensors.items():  # check every shape before copying anything
        if params[n].shape != t.shape:
            raise LlmkitError(f"adapter tensor {n} has shape {tuple(t.shape)} but the model needs "
                              f"{tuple(params[n].shape)}; this adapter belongs to another base model")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging them: the model is its base again."""
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.zero_()
    return merge_lora(model)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += alpha/r B A), swap plain `nn.Linear`s back, unfreeze.

    The merged model computes the same function as base + adapters, at the base model's cost.
    """
    mods = lora_modules(model)
    if not mods:
        raise LlmkitError("the model has no LoRA adapters to merge")
    for n, m in mods.items():
        m.weight.add_(m.delta_weight().to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same (now merged) Parameters
        _set_module(model, n, plain)
    before = getattr(model, "_lora_meta", {}).get("_trainable_before", {})
    for n, p in model.named_parameters():
        p.requires_grad_(before.get(n, True))
    if hasattr(model, "_lora_meta"):
        del model._lora_meta
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counting tied parameters once."""
    params = list(model.parameters())  # parameters() already yields a tied Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge(base: str, adapter: str, out: str) -> Path:
    """Fold a LoRA adapter into its base checkpoint and save a plain checkpoint that needs no adapter.

    Args:
        base: the base checkpoint folder the adapter was trained on.
        adapter: the adapter folder (adapter.safetensors + adapter_config.json), e.g. from `finetune sft`.
        out: folder for the merged checkpoint (config.json + model.safetensors + tokenizer.json).

    Examples:
        llmkit lora merge runs/smollm2 runs/sft-lora runs/sft-merged
        llmkit chat runs/sft-merged
    """
    model, meta = load_model(base)
    names = load_adapter(model, adapter)
    cfg_lora = lora_config(model)
    merge_lora(model)
    tok_dir = Path(adapter) if (Path(adapter) / "tokenizer.json").exists() else Path(base)
    tok = Tokenizer.load(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
    extra = {k: v for k, v in meta.items() if k not in ("model", "llmkit_format")}
    extra["lora_merged"] = {**cfg_lora, "adapter": str(adapter), "base": str(base)}
    folder = save_checkpoint(out, model, ModelConfig.from_dict(meta["model"]), tok, extra)
    print(f"merged {len(names)} LoRA modules (r={cfg_lora['r']}, alpha={cfg_lora['alpha']}) into {base} -> {folder}")
    return folder
