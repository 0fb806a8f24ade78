"""Rendered shape scenes for compositional captions: two coloured shapes side by side or one above the other,
captioned "a small red circle left of a large blue square" (numpy + Pillow, no download).

Every caption names the first object (the left or the upper one), the relation, then the second object, so a
scene has exactly one correct caption. `shapes_split` holds out colour-shape combinations: training scenes
never show a red triangle, a green circle or a blue square; the "novel" split always shows at least one.
"""

from __future__ import annotations

import random

import numpy as np
import torch

SIZES = {"small": 3, "large": 5}  # radius in pixels on the default 24-pixel canvas
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "above")
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "square")}
Obj = tuple[str, str, str]  # (size, colour, shape)


def describe(first: Obj, relation: str, second: Obj) -> str:
    return f"a {' '.join(first)} {relation} a {' '.join(second)}"


def render(first: Obj, relation: str, second: Obj, rng: random.Random, size: int = 24) -> torch.Tensor:
    """A (3, size, size) image in [0, 1]: black ground, `first` left of (or above) `second`, positions jittered."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(im)
    scale = size / 24
    half = size // 2
    for k, (sz, colour, shape) in enumerate((first, second)):
        r = SIZES[sz] * scale
        lo, hi = r + 1, half - r - 1  # keep the shape inside its half of the canvas
        along = k * half + rng.uniform(lo, max(lo, hi))
        # across the relation both shapes stay near the middle line, so "left of" never also reads as "above"
        across = min(max(size / 2 + rng.uniform(-3, 3) * scale, r + 1), size - r - 1)
        cx, cy = (along, across) if relation == "left of" else (across, along)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return torch.tensor(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _objects(held_out: bool | None, rng: random.Random) -> tuple[Obj, Obj]:
    """Two objects; held_out False: neither is a held-out colour-shape pair; True: at least one is."""
    while True:
        objs = tuple((rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2))
        n_novel = sum((c, s) in HELD_OUT for _, c, s in objs)
        if held_out is None or (n_novel > 0) == held_out:
            return objs  # type: ignore[return-value]


def scenes(n: int, seed: int, held_out: bool | None = False, size: int = 24) -> tuple[torch.Tensor, list[str]]:
    """n random scenes: images (n, 3, size, size) and their captions."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        first, second = _objects(held_out, rng)
        relation = rng.choice(RELATIONS)
        images.append(render(first, relation, second, rng, size))
        captions.append(describe(first, relation, second))
    return torch.stack(images), captions


def shapes_split(n_train: int = 6000, n_test: int = 500, seed: int = 0, size: int = 24
                 ) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{"train", "test" (same combinations, new scenes), "novel" (held-out colour-shape pairs)}, seeded."""
    return {"train": scenes(n_train, seed, False, size), "test": scenes(n_test, seed + 1, False, size),
            "novel": scenes(n_test, seed + 2, True, size)}
