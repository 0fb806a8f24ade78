"""Attention over image patches: recomputed CLIP ViT self-attention and captioner cross-attention reproduce
the modules' outputs, maps are (H/p, W/p) grids summing to 1, and `explain attention --image` writes a PNG."""

from __future__ import annotations

import pytest
import torch

from llmkit.cli import main
from llmkit.data.images import digits_split, save_png
from llmkit.explain.image_attention import cross_attention, image_attention, patch_grid, vit_attention
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import ModelConfig, preset
from llmkit.models.vision import CLIP, ImageCaptioner, VisionConfig
from llmkit.tokenizer import train_from_iterator

pytest.importorskip("sklearn")
VIS = VisionConfig(8, 2, 1)  # 16 patches in a 4 x 4 grid, + [CLS]


def _tok(kind: str = "wordpiece"):
    """wordpiece for CLIP's text encoder; bpe (with bos/eos) for the captioner, as the training commands do."""
    texts = [f"a handwritten digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    return train_from_iterator(texts * 3, kind, vocab_size=120 if kind == "wordpiece" else 300, show_progress=False)


def _clip(tok) -> CLIP:
    torch.manual_seed(0)
    text = preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, block_size=16,
                  pad_token_id=tok.pad_id)
    vision = ModelConfig(arch="encoder", vocab_size=1, block_size=VIS.n_patches + 1, n_layer=2, n_head=2,
                         d_model=32, prenorm=True, pos="none")
    model = CLIP(text, vision, VIS, 16).eval()
    with torch.no_grad():  # random init attends almost uniformly; sharpen it so the checks mean something
        for b in model.image.blocks:
            b.attn.qkv.weight.mul_(8.0)
        model.image.patch.proj.weight.mul_(8.0)
    return model


def _captioner(tok) -> ImageCaptioner:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="seq2seq", vocab_size=tok.vocab_size, block_size=8, n_layer=2, n_head=2, d_model=32,
                      prenorm=True, pos="learned", pad_token_id=tok.pad_id)
    model = ImageCaptioner(cfg, VIS).eval()
    with torch.no_grad():
        for b in model.text.dec_blocks:
            b.cross_attn.q.weight.mul_(8.0)
            b.cross_attn.kv.weight.mul_(8.0)
    return model


def _digits(n: int) -> torch.Tensor:
    return digits_split()["test"][0][:n]


def test_vit_attention_reproduces_the_image_encoder():
    model = _clip(_tok())
    outs = {}
    handles = [b.attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
               for i, b in enumerate(model.image.blocks)]
    try:
        probs, values = vit_attention(model, _digits(3), return_values=True)
    finally:
        for h in handles:
            h.remove()
    for i, (p, v) in enumerate(zip(probs, values)):
        assert p.shape == (3, 2, 17, 17)
        y = model.image.blocks[i].attn.proj((p @ v).transpose(1, 2).reshape(3, 17, -1))
        torch.testing.assert_close(y, outs[i], atol=1e-5, rtol=1e-4)
        assert float(p.max()) > 0.2  # sharpened: far from uniform (1/17)


def test_cross_attention_reproduces_the_decoder():
    tok = _tok("bpe")
    model = _captioner(tok)
    outs = {}
    handles = [b.cross_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
               for i, b in enumerate(model.text.dec_blocks)]
    tgt = torch.randint(5, tok.vocab_size, (2, 5))
    try:
        probs, values = cross_attention(model, _digits(2), tgt, return_values=True)
    finally:
        for h in handles:
            h.remove()
    for i, (p, v) in enumerate(zip(probs, values)):
        assert p.shape == (2, 2, 5, 17)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5))
        y = model.text.dec_blocks[i].cross_attn.proj((p @ v).transpose(1, 2).reshape(2, 5, -1))
        torch.testing.assert_close(y, outs[i], atol=1e-5, rtol=1e-4)


def test_maps_are_patch_grids_that_sum_to_one():
    rows = torch.softmax(torch.randn(3, 17), -1)
    grid = patch_grid(rows, 4)
    assert grid.shape == (3, 4, 4)
    torch.testing.assert_close(grid.sum((-2, -1)), torch.ones(3))
    torch.testing.assert_close(grid[1, 2, 3] * (1 - rows[1, 0]), rows[1, 1 + 2 * 4 + 3])  # row-major patches
    tok = _tok()
    maps, titles, cap = image_attention(_clip(tok), tok, _digits(1), head=-1)
    assert maps.shape == (2, 4, 4) and len(titles) == 2 and cap == ""
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2))
    maps, titles, cap = image_attention(_captioner(_tok("bpe")), _tok("bpe"), _digits(1), layer=-1, head=1)
    assert maps.shape == (len(titles), 4, 4) and len(titles) >= 1 and cap
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(len(titles)))


def test_explain_attention_writes_an_overlay_png(tmp_path, capsys):
    from PIL import Image

    for name, tok, model in (("clip", _tok(), _clip(_tok())), ("caption", _tok("bpe"), _captioner(_tok("bpe")))):
        save_checkpoint(tmp_path / name, model, model.cfg, tok, meta={"multimodal": model.meta()})
    save_png(_digits(1)[0], tmp_path / "d.png")
    assert main(["explain", "attention", str(tmp_path / "clip"), "--image", str(tmp_path / "d.png"),
                 "--head", "-1", "--out", str(tmp_path / "a")]) == 0
    png = tmp_path / "a" / "attention_image_layers_Hmean.png"
    assert "most attended patch" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 150
    assert main(["explain", "attention", str(tmp_path / "caption"), "--image", "digits:0", "--layer", "-1",
                 "--head", "0", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "attention_image_L1_H0.png").stat().st_size > 1000
    assert main(["explain", "attention", str(tmp_path / "clip"), "--text", "a digit", "--out", str(tmp_path)]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["explain", "attention", str(tmp_path / "clip"), "--image", "digits:99999"]) == 2
