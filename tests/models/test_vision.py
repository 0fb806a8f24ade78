"""Vision blocks: patch order, the symmetric InfoNCE loss against a hand computation, and the captioner
driving the encoder-decoder greedy search (cached = uncached)."""

from __future__ import annotations

import math

import torch

from llmkit.inference.beam import greedy_decode
from llmkit.models.config import ModelConfig
from llmkit.models.vision import ImageCaptioner, PatchEmbed, VisionConfig, clip_loss


def test_patches_are_row_major_squares():
    vis = VisionConfig(image_size=4, patch_size=2, channels=1)
    pe = PatchEmbed(vis, d_model=4)
    with torch.no_grad():  # identity projection, no [CLS]/position terms: the tokens are the raw patches
        pe.proj.weight.copy_(torch.eye(4))
        pe.proj.bias.zero_()
        pe.pos.zero_()
    img = torch.arange(16.0).view(1, 1, 4, 4)
    out = pe(img)[0, 1:]
    want = torch.stack([img[0, 0, r:r + 2, c:c + 2].reshape(-1) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(out, want)


def test_infonce_equals_a_hand_computed_value():
    s = 2.0  # logit scale exp(log 2)
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    # logits = s * img @ txt^T = 2 * [[0.8, 0.0], [0.96, 0.8]]
    L = [[1.6, 0.0], [1.92, 1.6]]

    def ce(row, i):
        return -row[i] + math.log(sum(math.exp(v) for v in row))

    i2t = (ce(L[0], 0) + ce(L[1], 1)) / 2
    t2i = (ce([L[0][0], L[1][0]], 0) + ce([L[0][1], L[1][1]], 1)) / 2
    want = (i2t + t2i) / 2
    got = clip_loss(img, txt, torch.tensor(math.log(s)))
    assert abs(float(got) - want) < 1e-6
    grouped = clip_loss(torch.stack([img, img]), torch.stack([txt, txt]), torch.tensor(math.log(s)))
    assert abs(float(grouped) - want) < 1e-6  # groups are independent contrastive batches


def test_captioner_greedy_decode_cache_matches_no_cache():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="seq2seq", vocab_size=20, block_size=16, n_layer=1, n_head=2, d_model=16, prenorm=True)
    model = ImageCaptioner(cfg, VisionConfig(8, 4, 1)).eval()
    px = torch.rand(3, 1, 8, 8)
    mask = model.memory_mask(px)
    assert model.encode(px).shape == (3, 5, 16)
    a = greedy_decode(model, px, mask, 1, 2, 8, use_cache=True)
    b = greedy_decode(model, px, mask, 1, 2, 8, use_cache=False)
    assert a == b and len(a) == 3
