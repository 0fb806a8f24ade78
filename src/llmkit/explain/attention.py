"""Attention maps: the softmax(QK^T/sqrt(hd)) probabilities of every layer and head, as heatmaps.

The model computes attention with fused SDPA, which returns no weights. Rather than slow it down, forward
hooks capture each attention module's inputs (mask, RoPE tables) and its fused qkv projection output, and
the probabilities are recomputed here exactly the way `model.Attention` uses them (RoPE, GQA, causal or
padding mask). `tests/test_explain_attention.py` checks that probs @ V reproduces the module's output.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.explain.image_attention import explain_image_attention
from llmkit.explain.probs import attention_probs, token_labels
from llmkit.io import atomic_write_bytes
from llmkit.models.load import load
from llmkit.models.transformer import Transformer
from llmkit.models.vision import CLIP, ImageCaptioner


@torch.no_grad()
def attention_maps(model: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None, return_values: bool = False
                   ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Self-attention probabilities per layer, each (B, nh, T, T) (rows: queries, columns: keys).

    Works for decoder and encoder models (`model.blocks`); with return_values also the per-head values
    (B, nh, T, hd), so probs @ values gives the heads' outputs before the output projection.
    """
    if not isinstance(model, Transformer) or model.cfg.arch not in ("decoder", "encoder"):
        arch = getattr(getattr(model, "cfg", None), "arch", type(model).__name__)
        raise LlmkitError(f"attention maps need a decoder or encoder Transformer checkpoint, got arch {arch!r}")
    captured: dict[int, dict] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        def pre(_m: nn.Module, args: tuple, i: int = i) -> None:
            # Block calls attn(h, mask, is_causal, rope, cache, layer)
            captured.setdefault(i, {}).update(mask=args[1], is_causal=args[2], rope=args[3] if len(args) > 3 else None)

        def post(_m: nn.Module, _args: tuple, out: torch.Tensor, i: int = i) -> None:
            captured.setdefault(i, {})["qkv"] = out

        handles.append(block.attn.register_forward_pre_hook(pre))
        handles.append(block.attn.qkv.register_forward_hook(post))
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if model.cfg.causal else None
    else:
        position_ids = None
    try:
        model.hidden(idx, attention_mask=attention_mask, position_ids=position_ids, token_type_ids=token_type_ids)
    finally:
        for h in handles:
            h.remove()
    probs, values = [], []
    for i, block in enumerate(model.blocks):
        c = captured[i]
        p, v = attention_probs(block.attn, c["qkv"], c["mask"], c["is_causal"], c["rope"])
        probs.append(p)
        values.append(v)
    return (probs, values) if return_values else probs


def _heatmap_png(prob: torch.Tensor, labels: list[str], title: str, size: float = 6.0) -> bytes:
    """PNG bytes of one (T, T) attention map with token labels on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = prob.size(0)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(prob.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    fs = max(4, min(10, int(220 / max(T, 1))))
    ax.set_xticks(range(T), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(T), labels, fontsize=fs)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _layer_png(probs: torch.Tensor, labels: list[str], layer: int) -> bytes:
    """PNG bytes of all heads of one layer side by side; probs (nh, T, T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nh, T = probs.size(0), probs.size(1)
    fig, axes = plt.subplots(1, nh, figsize=(3.2 * nh, 3.4), squeeze=False)
    fs = max(3, min(8, int(120 / max(T, 1))))
    for h, ax in enumerate(axes[0]):
        ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=fs)
        ax.set_yticks(range(T), labels if h == 0 else [""] * T, fontsize=fs)
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _html_page(probs: list[torch.Tensor], labels: list[str], text: str, source: str) -> str:
    """A self-contained page: one row of heatmaps (all heads) per layer, PNGs inlined as base64."""
    rows = []
    for li, p in enumerate(probs):
        png = base64.b64encode(_layer_png(p, labels, li)).decode()
        rows.append(f'<h2>layer {li}</h2><img src="data:image/png;base64,{png}" alt="layer {li}, all heads">')
    return ("<!doctype html><html><head><meta charset=utf-8><title>llmkit attention</title><style>"
            "body{font-family:sans-serif;margin:1em}img{max-width:100%}</style></head><body>"
            f"<h1>Attention maps</h1><p>checkpoint: <code>{html.escape(source)}</code></p>"
            f"<p>text: {html.escape(text)}</p><p>tokens: {html.escape(' | '.join(labels))}</p>"
            "<p>Rows are queries, columns the keys they attend to; each row sums to 1 (colour scale 0..1).</p>"
            + "".join(rows) + "</body></html>\n")


def encode_for(model: nn.Module, tokenizer, text: str) -> list[int]:
    """Token ids for an explanation: [CLS] ... [SEP] for encoders, the plain text for decoders."""
    if not text.strip():
        raise LlmkitError("the text is empty; pass --text with a sentence to explain")
    ids = tokenizer.encode(text, add_special_tokens=model.cfg.arch == "encoder")
    if len(ids) > model.cfg.block_size:
        raise LlmkitError(f"the text has {len(ids)} tokens but the model's context is {model.cfg.block_size}; "
                          "shorten it")
    return ids


def explain_attention(checkpoint: str, *, text: str | None = None, image: str | None = None, layer: int = 0,
                      head: int = 0, out: str = "attention", device: str = "cpu") -> dict[str, str]:
    """Draw a layer/head's attention over a text as a heatmap PNG (and every head on one HTML page), or, for
    an image-text checkpoint, the attention over an image's patches drawn on the image.

    Args:
        checkpoint: decoder or encoder checkpoint folder (with tokenizer.json), or a `multimodal train clip`
            / `multimodal train caption` checkpoint (then give --image).
        text: the text whose attention to show (at most the model's context length in tokens).
        image: image checkpoints: a PNG/JPEG file, or digits:N (the N-th held-out digit). CLIP: the image
            encoder's [CLS] -> patch attention of every layer; captioner: the cross-attention of the chosen
            layer while it writes each word of its greedy caption.
        layer: layer index, 0-based (negative counts from the last).
        head: head index within the layer, 0-based; -1 = mean over heads (image checkpoints).
        out: output folder; gets attention_L{layer}_H{head}.png and attention.html (text), or
            attention_image_L{layer}_H{head}.png (image; CLIP: attention_image_layers_H{head}.png).
        device: cpu or cuda.

    Examples:
        llmkit explain attention runs/demo --text "In the beginning God created the heavens" --layer 1 --head 2
        llmkit explain attention runs/demo --text "And God said" --out runs/attn
        llmkit explain attention runs/caption --image digits:0 --layer -1 --head -1 --out runs/attn
        llmkit explain attention runs/clip --image digit.png --head -1
    """
    model, tok = load(checkpoint, device)
    if tok is None:
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; it cannot turn text into tokens")
    if isinstance(model, (CLIP, ImageCaptioner)):
        if image is None or text is not None:
            raise LlmkitError(f"{checkpoint} is an image-text checkpoint: give --image (a PNG/JPEG or digits:N), "
                              "not --text")
        return explain_image_attention(model, tok, image, layer, head, out, str(checkpoint))
    if image is not None or text is None:
        raise LlmkitError("give --text for a text checkpoint (--image is for multimodal checkpoints)")
    n_layer, n_head = len(getattr(model, "blocks", [])), model.cfg.n_head
    if not -n_layer <= layer < n_layer:
        raise LlmkitError(f"layer {layer} does not exist: the model has {n_layer} layers (0..{n_layer - 1})")
    layer %= n_layer
    if not 0 <= head < n_head:
        raise LlmkitError(f"head {head} does not exist: the model has {n_head} heads per layer (0..{n_head - 1})")
    ids = encode_for(model, tok, text)
    probs = attention_maps(model, torch.tensor([ids], device=device))
    probs = [p[0].cpu() for p in probs]  # (nh, T, T) per layer
    labels = token_labels(tok, ids)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"attention_L{layer}_H{head}.png"
    page = folder / "attention.html"
    atomic_write_bytes(png, _heatmap_png(probs[layer][head], labels, f"layer {layer}, head {head}"))
    atomic_write_bytes(page, _html_page(probs, labels, text, str(checkpoint)).encode("utf-8"))
    p = probs[layer][head]
    top = [labels[int(j)] for j in p.argmax(-1)]
    print(f"{len(ids)} tokens; layer {layer} head {head}: each query's most attended key:")
    print("  " + "  ".join(f"{q}->{k}" for q, k in zip(labels, top)))
    print(f"wrote {png} and {page} ({n_layer} layers x {n_head} heads)")
    return {"png": str(png), "html": str(page)}
