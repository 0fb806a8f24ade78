"""Per-input-channel smoothing folded into a pre-norm decoder before int8 quantization (SmoothQuant's idea),
so that int8 activations rounded per row lose little: a few input channels carry activations ~100x larger
than the rest, and one scale per row would round the others to a handful of levels.

For a Linear y = x W^T, dividing input channel j of x by s_j and multiplying column j of W by s_j changes
nothing in exact arithmetic; s_j = amax(x_j)^a / amax(W[:, j])^(1 - a) evens out both. The division is folded
into what produces x: the RMSNorm/LayerNorm before qkv and before the MLP's gate and up, the value rows of qkv
before the attention's output projection (one s per KV head dimension, shared by the query heads of a group),
and the up rows of a gated MLP before its down projection. The LM head (its input is the final norm's, tied
to the embeddings in most models) is not smoothed: `llmkit quantize` rounds its input to int8 as it is (measured
better than smoothing it). Measured on SmolLM2-135M (docs/inference.md).
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.errors import LlmkitError

ALPHA = 0.5  # measured on SmolLM2-135M held-out perplexity: 0.3, 0.5, 0.7 gave +3.5, +0.8, +1.0 % (int8 x int8)
WINDOW = 512  # calibration tokens per forward
_INPUTS = ("attn.qkv", "mlp.fc", "attn.proj", "mlp.proj")  # the Linears whose input statistics are used


def why_not(model: nn.Module) -> str:
    """'' when `smooth` can fold scales into `model`, else the first reason it cannot."""
    from llmkit.models.transformer import OffsetRMSNorm, Transformer

    if not isinstance(model, Transformer):
        return "not a Transformer"
    c = model.cfg
    if c.arch != "decoder" or not c.prenorm or c.post_norms:
        return "not a pre-norm decoder"
    for b in model.blocks:
        if getattr(b.attn, "qkv", None) is None or b.cross_attn is not None:
            return "attention without a fused qkv projection"
        for norm in (b.norm1, b.norm2):
            if isinstance(norm, OffsetRMSNorm) or not isinstance(norm, nn.RMSNorm | nn.LayerNorm) or norm.weight is None:
                return "a norm that is not an affine RMSNorm or LayerNorm"
        for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj, b.mlp.gate):
            if m is not None and type(m) is not nn.Linear:
                return "a layer that is not a plain nn.Linear"
    return ""


@torch.no_grad()
def calibrate(model: nn.Module, ids: list[int]) -> dict[str, torch.Tensor]:
    """The largest |input| per channel of every block's qkv, up, output and down projections over `ids`
    (fed in windows of WINDOW tokens, or the model's context if shorter), keyed 'blocks.{i}.{attn.qkv|mlp.fc|attn.proj|mlp.proj}'."""
    if len(ids) < 2:
        raise LlmkitError("the calibration text is shorter than 2 tokens; give a longer --calibration file")
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for i, b in enumerate(model.blocks):
        for name in _INPUTS:
            key = f"blocks.{i}.{name}"

            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor, key: str = key) -> None:
                a = args[0].detach().float().abs().reshape(-1, args[0].size(-1)).amax(0)
                stats[key] = a if key not in stats else torch.maximum(stats[key], a)

            hooks.append(b.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        window = min(WINDOW, model.cfg.block_size)
        for a in range(0, len(ids), window):
            model(torch.tensor([ids[a: a + window]], device=device), last_only=True)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def _scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, stats: dict[str, torch.Tensor], alpha: float = ALPHA) -> list[str]:
    """Fold the scales into `model` in place (its outputs unchanged up to fp32 rounding); returns the names of
    the Linears whose inputs were smoothed (those that then take int8 activations)."""
    why = why_not(model)
    if why:
        raise LlmkitError(f"cannot smooth this model for int8 activations ({why}); quantize with --act_bits 16")
    c = model.cfg
    nh, nkv, hd = c.n_head, c.n_kv_head, c.head_dim
    g, nq, nk = nh // nkv, nh * hd, nkv * hd
    done: list[str] = []
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}."
        # the norms' outputs: qkv, and the MLP's gate and up together
        gated = ["mlp.gate"] if b.mlp.gate is not None else []
        for norm, names in ((b.norm1, ["attn.qkv"]), (b.norm2, [*gated, "mlp.fc"])):
            lins = [b.get_submodule(n) for n in names]
            w_amax = torch.stack([m.weight.abs().amax(0) for m in lins]).amax(0)
            s = _scales(stats[p + names[-1]], w_amax, alpha)  # gate and up share their input (mlp.fc's)
            norm.weight.div_(s)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s)
            for m in lins:
                m.weight.mul_(s)
            done += [p + n for n in names]
        # the attention's output: value rows of qkv (per KV head dimension) into the output projection's columns
        x_amax = stats[p + "attn.proj"].view(nkv, g, hd).amax(1)
        w_amax = b.attn.proj.weight.abs().amax(0).view(nkv, g, hd).amax(1)
        s = _scales(x_amax, w_amax, alpha)  # (nkv, hd)
        qkv = b.attn.qkv
        qkv.weight[nq + nk:].div_(s.reshape(-1, 1))
        if qkv.bias is not None:
            qkv.bias[nq + nk:].div_(s.reshape(-1))
        b.attn.proj.weight.mul_(s[:, None, :].expand(nkv, g, hd).reshape(1, -1))
        done.append(p + "attn.proj")
        # a gated MLP's down projection: act(gate) * up is linear in up
        if b.mlp.gate is not None:
            s = _scales(stats[p + "mlp.proj"], b.mlp.proj.weight.abs().amax(0), alpha)
            b.mlp.fc.weight.div_(s[:, None])
            if b.mlp.fc.bias is not None:
                b.mlp.fc.bias.div_(s)
            b.mlp.proj.weight.mul_(s)
            done.append(p + "mlp.proj")
    return done
