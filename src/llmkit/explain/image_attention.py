"""Attention over image patches, drawn on the image: where a CLIP image encoder's [CLS] token looks, and
where an image captioner's decoder looks while it writes each word.

- CLIP (`models/vision.py: CLIP`): the ViT self-attention row of [CLS] over the N patches, one map per layer.
- Captioner (`ImageCaptioner`): the decoder's cross-attention over the patches, one map per generated token
  (the query that produced the token), after greedy decoding.
Probabilities are recomputed from forward hooks on the projections, as `explain.attention` does for text
(the model itself runs fused SDPA); the memory's [CLS] column is dropped and each map renormalised over
the patches, so every map is a (H/p, W/p) grid that sums to 1. `tests/explain/test_image_attention.py` checks
that probs @ V reproduces the modules' outputs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch import nn

from llmkit.data.images import digits_split, load_image
from llmkit.errors import LlmkitError
from llmkit.explain.probs import attention_probs, token_labels
from llmkit.inference.beam import greedy_decode
from llmkit.io import atomic_write_bytes
from llmkit.models.vision import CLIP, ImageCaptioner


@torch.no_grad()
def vit_attention(model: CLIP, px: torch.Tensor, return_values: bool = False
                  ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Self-attention probabilities of the image encoder per layer, each (B, nh, 1 + N, 1 + N)."""
    captured: dict[int, torch.Tensor] = {}
    blocks = model.image.blocks
    handles = [b.attn.qkv.register_forward_hook(lambda _m, _a, out, i=i: captured.__setitem__(i, out))
               for i, b in enumerate(blocks)]
    try:
        model.image(px)
    finally:
        for h in handles:
            h.remove()
    pv = [attention_probs(b.attn, captured[i], None, False, None) for i, b in enumerate(blocks)]  # bidirectional, no RoPE
    probs, values = [p for p, _ in pv], [v for _, v in pv]
    return (probs, values) if return_values else probs


@torch.no_grad()
def cross_attention(model: ImageCaptioner, px: torch.Tensor, tgt: torch.Tensor, return_values: bool = False
                    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decoder cross-attention probabilities per layer, each (B, nh, T, 1 + N), for the target prefix tgt (B, T)."""
    q_out: dict[int, torch.Tensor] = {}
    kv_out: dict[int, torch.Tensor] = {}
    blocks = model.text.dec_blocks
    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.cross_attn.q.register_forward_hook(lambda _m, _a, out, i=i: q_out.__setitem__(i, out)))
        handles.append(b.cross_attn.kv.register_forward_hook(lambda _m, _a, out, i=i: kv_out.__setitem__(i, out)))
    try:
        model.decode(tgt, model.encode(px))
    finally:
        for h in handles:
            h.remove()
    probs, values = [], []
    for i, b in enumerate(blocks):
        a = b.cross_attn
        (B, T, _), S = q_out[i].shape, kv_out[i].size(1)
        q = q_out[i].view(B, T, a.nh, a.hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v = kv_out[i].view(B, S, 2, a.nkv, a.hd).permute(2, 0, 3, 1, 4)  # 2 x (B, nkv, S, hd)
        if a.nkv != a.nh:
            k, v = k.repeat_interleave(a.nh // a.nkv, 1), v.repeat_interleave(a.nh // a.nkv, 1)
        scale = a.scale if a.scale is not None else 1.0 / math.sqrt(a.hd)
        probs.append(((q @ k.transpose(-2, -1)).float() * scale).softmax(-1))  # (B, nh, T, S)
        values.append(v)
    return (probs, values) if return_values else probs


def patch_grid(rows: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., 1 + N) attention rows over [CLS] + N patches -> (..., grid, grid) maps over the patches, each summing to 1."""
    patches = rows[..., 1:]
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    return patches.reshape(*rows.shape[:-1], grid, grid)


def _pick(probs: torch.Tensor, head: int) -> torch.Tensor:
    """(nh, ...) -> one head's (...), or the mean over heads for head = -1."""
    return probs.mean(0) if head == -1 else probs[head]


def image_attention(model: nn.Module, tok, px: torch.Tensor, layer: int = -1, head: int = -1
                    ) -> tuple[torch.Tensor, list[str], str]:
    """Attention maps (K, g, g) over the patches of one image px (1, C, H, W), a title for each map, and the
    caption (captioner; "" for CLIP).

    CLIP: K = n_layer maps, [CLS] -> patches of every layer (`layer` is ignored: all are shown).
    Captioner: K = caption tokens, the given layer's cross-attention of the query that wrote each token.
    head: a head index, or -1 for the mean over heads.
    """
    grid = model.vis.image_size // model.vis.patch_size
    if isinstance(model, CLIP):
        probs = vit_attention(model, px)
        maps = torch.stack([patch_grid(_pick(p[0], head)[0], grid) for p in probs])
        return maps, [f"layer {i}: [CLS] -> patches" for i in range(len(probs))], ""
    if not isinstance(model, ImageCaptioner):
        raise LlmkitError(f"image attention needs a CLIP or captioner checkpoint, got {type(model).__name__}")
    if tok.bos_id is None or tok.eos_id is None:
        raise LlmkitError("the captioner's tokenizer has no bos/eos tokens; it cannot write a caption")
    ids = greedy_decode(model, px, model.memory_mask(px), tok.bos_id, tok.eos_id, model.cfg.block_size - 1)[0]
    if not ids:
        raise LlmkitError("the captioner wrote an empty caption for this image; there is no token to explain")
    tgt = torch.tensor([[tok.bos_id, *ids]], device=px.device)
    probs = cross_attention(model, px, tgt)[layer][0]  # (nh, T, 1 + N); query t wrote token t + 1
    maps = patch_grid(_pick(probs, head)[: len(ids)], grid)
    return maps, [f"{w!r}" for w in token_labels(tok, ids)], tok.decode(ids).strip()


def _overlay_png(image: torch.Tensor, maps: torch.Tensor, titles: list[str], heading: str) -> bytes:
    """The image, then each map drawn over it (patch grid, colour = share of attention); PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C, H, W = image.shape
    pic = image.permute(1, 2, 0).clamp(0, 1).numpy()
    kw = {"cmap": "gray"} if C == 1 else {}
    pic = pic[..., 0] if C == 1 else pic
    n = len(maps) + 1
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pic, vmin=0, vmax=1, **kw)
    axes.flat[0].set_title("image", fontsize=9)
    vmax = float(maps.max())
    for ax, m, t in zip(list(axes.flat)[1:], maps, titles):
        ax.imshow(pic, vmin=0, vmax=1, **kw)
        im = ax.imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=vmax, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                       interpolation="nearest")
        ax.set_title(t, fontsize=8)
    fig.suptitle(heading, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="share of attention")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def read_image(image: str, model: nn.Module) -> torch.Tensor:
    """An image for the model, (1, C, H, W): a PNG/JPEG file, or `digits:N` (the N-th held-out digit)."""
    vis = model.vis
    if image.startswith("digits:"):
        test = digits_split()["test"][0]
        try:
            px = test[int(image.split(":", 1)[1])]
        except (ValueError, IndexError) as e:
            raise LlmkitError(f"{image!r}: use digits:N with 0 <= N < {len(test)}") from e
    else:
        px = load_image(image, vis.image_size, vis.channels)
    if px.shape != (vis.channels, vis.image_size, vis.image_size):
        raise LlmkitError(f"image is {tuple(px.shape)} but the model takes "
                          f"{(vis.channels, vis.image_size, vis.image_size)}")
    return px[None]


def explain_image_attention(model: nn.Module, tok, image: str, layer: int, head: int, out: str,
                            source: str) -> dict[str, str]:
    """Write attention_image_L{layer}_H{head}.png (CLIP: attention_image_layers_H{head}.png): the image with
    its attention maps drawn over it."""
    n_layer = len(model.image.blocks) if isinstance(model, CLIP) else len(model.text.dec_blocks)
    if not -n_layer <= layer < n_layer:
        raise LlmkitError(f"layer {layer} does not exist: the model has {n_layer} layers (0..{n_layer - 1})")
    if not -1 <= head < model.cfg.n_head:
        raise LlmkitError(f"head {head} does not exist: use 0..{model.cfg.n_head - 1}, or -1 for the mean")
    px = read_image(image, model)
    maps, titles, caption = image_attention(model, tok, px, layer, head)
    who = "mean of heads" if head == -1 else f"head {head}"
    if isinstance(model, CLIP):
        heading = f"{source}: image encoder [CLS] attention per layer ({who})"
    else:
        heading = f"{source}: '{caption}' - cross-attention of layer {layer % n_layer} per token ({who})"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    which = "layers" if isinstance(model, CLIP) else f"L{layer % n_layer}"  # CLIP: one panel per layer
    png = folder / f"attention_image_{which}_H{'mean' if head == -1 else head}.png"
    atomic_write_bytes(png, _overlay_png(px[0].cpu(), maps.cpu(), titles, heading))
    g = maps.size(-1)
    for t, m in zip(titles, maps):
        r, c = divmod(int(m.flatten().argmax()), g)
        print(f"{t}: most attended patch row {r} col {c} ({float(m.max()):.2f} of the attention)")
    print(f"wrote {png}")
    return {"png": str(png)}
