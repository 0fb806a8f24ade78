"""Image-text training on the digits: a tiny CLIP beats chance zero-shot with held-out templates, checkpoints
load through llmkit.load, search ranks images and captions, the captioner trains and captions PNG files."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.data.images import digits_split, load_image, save_png
from llmkit.errors import LlmkitError
from llmkit.models.load import load
from llmkit.models.vision import CLIP, ImageCaptioner
from llmkit.train.multimodal import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    caption,
    digit_in,
    search,
    train_caption,
    train_clip,
)

pytest.importorskip("sklearn")


def test_templates_are_held_out_and_digits_parse():
    assert not set(HELD_OUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert digit_in("a picture of the number 7") == 7 and digit_in("this is a handwritten three") == 3
    assert digit_in("a handwritten digit") is None and digit_in("one or 2") is None


def test_png_round_trip(tmp_path):
    img = digits_split()["test"][0][0]
    save_png(img, tmp_path / "d.png")
    back = load_image(tmp_path / "d.png", 8)
    assert back.shape == (1, 8, 8) and (back - img).abs().max() < 0.01


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "clip"
    res = train_clip(out=str(out), steps=200, groups=2, d_model=32, n_layer=1, n_head=2, d_embed=32, eval_every=200)
    return out, res


def test_tiny_clip_beats_chance_zero_shot(clip_ckpt):
    _, res = clip_ckpt
    assert res["zero_shot_accuracy"] >= 0.25  # chance is 0.1; held-out templates only (0.29-0.5 seen)
    assert res["i2t_recall@5"] >= res["i2t_recall@1"] and res["fit_seconds"] > 0


def test_clip_checkpoint_loads_and_searches(clip_ckpt, tmp_path):
    out, res = clip_ckpt
    model, tok = load(out)
    assert isinstance(model, CLIP) and tok is not None and not model.training
    ranked = search(str(out), text="a picture of the number 0", top_k=5)
    assert len(ranked) == 5 and ranked[0][1] >= ranked[-1][1]
    px, ys = digits_split()["test"]
    i = int((ys == 0).nonzero()[0])
    save_png(px[i], tmp_path / "zero.png")
    caps = search(str(out), image=str(tmp_path / "zero.png"), top_k=40)
    assert len(caps) == 40
    with pytest.raises(LlmkitError, match="exactly one"):
        search(str(out))
    with pytest.raises(LlmkitError, match="not a ImageCaptioner"):
        caption(str(out), image=str(tmp_path / "zero.png"))


def test_captioner_trains_and_captions_files(tmp_path):
    res = train_caption(out=str(tmp_path / "cap"), steps=40, batch_size=32, d_model=32, n_layer=1, n_head=2,
                        eval_every=40)
    assert {"digit_accuracy", "exact_match", "bleu"} <= set(res)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cap" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0] - 1.0  # it learns the caption language (5.7 -> 3.6 nats when written)
    model, _ = load(tmp_path / "cap")
    assert isinstance(model, ImageCaptioner)
    px = digits_split()["test"][0][:2]
    (tmp_path / "imgs").mkdir()
    for k in range(2):
        save_png(px[k], tmp_path / "imgs" / f"{k}.png")
    caps = caption(str(tmp_path / "cap"), image=str(tmp_path / "imgs"), beam=2)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)  # an undertrained model may say nothing
    assert torch.equal(digits_split()["test"][1], digits_split()["test"][1])  # the split is deterministic


@pytest.mark.slow  # ~10 s: renders 7,000 scenes, 300 steps, captions 1,000 held-out scenes
def test_captioner_learns_shape_scenes(tmp_path):
    from PIL import Image

    from llmkit.data.shapes import scenes

    res = train_caption(out=str(tmp_path / "shp"), data="shapes", steps=300, batch_size=32, d_model=32, n_layer=1,
                        n_head=2, eval_every=300)
    assert {"exact_match", "bleu", "novel_exact_match", "novel_bleu"} <= set(res) and "digit_accuracy" not in res
    assert res["bleu"] > 40  # the caption grammar and some attributes (an untrained model: BLEU ~ 0)
    model, _ = load(tmp_path / "shp")
    assert model.vis.channels == 3 and model.vis.n_patches == 36
    px, caps = scenes(1, 99)
    Image.fromarray((px[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "scene.png")
    written = caption(str(tmp_path / "shp"), image=str(tmp_path / "scene.png"))
    assert len(written) == 1 and written[0].startswith("a ")
    with pytest.raises(LlmkitError, match="unknown image data"):
        train_caption(out=str(tmp_path / "x"), data="cats", steps=1)
