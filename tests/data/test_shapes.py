"""Shape scenes: captions describe what is drawn (colours, order, relation), held-out colour-shape pairs never
reach training and always reach the novel split."""

from __future__ import annotations

import random

import torch

from llmkit.data.shapes import COLOURS, HELD_OUT, SIZES, describe, render, scenes, shapes_split


def _centre(img: torch.Tensor, colour: str) -> tuple[float, float, int]:
    """(x, y) centroid and pixel count of the pixels painted exactly in `colour`."""
    target = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None] / 255
    hit = ((img - target).abs().max(0).values < 1e-3).nonzero().float()
    return float(hit[:, 1].mean()), float(hit[:, 0].mean()), len(hit)


def test_the_caption_describes_the_picture():
    rng = random.Random(0)
    for k in range(60):
        relation = ("left of", "above")[k % 2]
        c1, c2 = rng.sample(list(COLOURS), 2)
        s1, s2 = rng.choice(list(SIZES)), rng.choice(list(SIZES))
        img = render((s1, c1, "square"), relation, (s2, c2, "square"), rng)
        assert img.shape == (3, 24, 24) and 0 <= float(img.min()) and float(img.max()) <= 1
        (x1, y1, n1), (x2, y2, n2) = _centre(img, c1), _centre(img, c2)
        if relation == "left of":
            assert x1 < x2 and abs(y1 - y2) < abs(x1 - x2)
        else:
            assert y1 < y2 and abs(x1 - x2) < abs(y1 - y2)
        if s1 != s2:  # a large square covers more pixels than a small one
            assert (n1 > n2) == (s1 == "large")
    assert describe(("small", "red", "circle"), "left of", ("large", "blue", "square")) == \
        "a small red circle left of a large blue square"


def test_held_out_combinations_only_in_the_novel_split():
    split = shapes_split(n_train=400, n_test=100, seed=3)
    pairs = {f"{c} {s}" for c, s in HELD_OUT}

    def novel(caption: str) -> bool:
        return any(p in caption for p in pairs)

    assert not any(novel(c) for c in split["train"][1] + split["test"][1])
    assert all(novel(c) for c in split["novel"][1])
    assert split["train"][0].shape == (400, 3, 24, 24)
    assert len(set(split["train"][1])) > 200  # compositional: most scenes have their own caption
    x, caps = scenes(5, 3)
    assert torch.equal(x, scenes(5, 3)[0]) and caps == scenes(5, 3)[1]  # seeded
