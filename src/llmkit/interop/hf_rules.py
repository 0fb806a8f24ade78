"""The vocabulary of the HF <-> llmkit name maps: one `Rule` per llmkit tensor, and config-reading helpers.

A rule says which HF tensor(s) an llmkit tensor comes from and how: a copy, the transpose of GPT-2's
Conv1D (in, out) weights, a row-concatenation (q, k, v -> our fused `attn.qkv`) or one half of a fused HF
tensor (Phi-3's gate_up_proj -> our `mlp.gate` and `mlp.fc`). Import and export walk the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmkit.errors import LlmkitError

HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
          "silu": "silu", "swish": "silu"}
ACT_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


@dataclass(frozen=True)
class Rule:
    """llmkit tensor `ours` <- HF tensors `theirs` by `how`: copy, t (Conv1D), cat (q,k,v rows), half (row half)."""

    ours: str
    theirs: tuple[str, ...]
    how: Literal["copy", "t", "cat", "half"] = "copy"
    optional: bool = False  # zero-filled on export when the llmkit model has no such tensor (bias=False)
    part: int = 0  # how="half": which half of theirs[0]'s rows (0 = first)


def linear(ours: str, theirs: str, bias: bool, how: Literal["copy", "t"] = "copy",
           always_bias: bool = False) -> list[Rule]:
    """Rules of one Linear: the weight, and the bias if the model has one (or HF always wants one)."""
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",), how)]
    if bias or always_bias:
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), optional=not bias))
    return rules


def norm(ours: str, theirs: str, with_bias: bool, have_bias: bool = True) -> list[Rule]:
    """Rules of one norm: the weight, and the bias for LayerNorms (zero-filled if llmkit's has none)."""
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",))]
    if with_bias:
        rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), optional=not have_bias))
    return rules


def need(hf: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` present in an HF config dict; one clear error if none is."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise LlmkitError(f"config.json lacks {keys[0]!r}; is it a complete Hugging Face config?")


def act(hf_act: str) -> str:
    """llmkit's name for an HF activation (`hidden_act`, `activation_function`)."""
    if hf_act not in HF_ACT:
        raise LlmkitError(f"activation {hf_act!r} is not supported; llmkit has {', '.join(HF_ACT)}")
    return HF_ACT[hf_act]
