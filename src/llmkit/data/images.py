"""Images that ship offline: scikit-learn's handwritten digits (1,797 8x8 images), and PNG/JPEG files.

Pixels come out as float tensors (N, 1, H, W) in [0, 1] with ink bright on a dark ground, the digits'
convention; a file with a light background (dark ink on paper) is inverted so both look alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmkit.errors import LlmkitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def digits_split(test_frac: float = 0.2, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """load_digits as {"train": (images, labels), "test": (...)}: a seeded split stratified by digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8), 16 = full ink
    labels = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        n_test = round(len(idx) * test_frac)
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return {"train": (images[sorted(train)], labels[sorted(train)]),
            "test": (images[sorted(test)], labels[sorted(test)])}


def load_image(path: str | Path, size: int, channels: int = 1) -> torch.Tensor:
    """One PNG/JPEG as a (1, size, size) grayscale tensor in [0, 1], bright ink on dark ground, or with
    channels=3 as a (3, size, size) RGB tensor in [0, 1] as it is (colour images are not inverted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gray = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BOX)  # area average
    except FileNotFoundError as e:
        raise LlmkitError(f"image {path} does not exist") from e
    except UnidentifiedImageError as e:
        raise LlmkitError(f"{path} is not an image Pillow can read (PNG or JPEG)") from e
    x = torch.tensor(np.asarray(gray, dtype=np.float32) / 255.0)
    if channels == 3:
        return x.permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
    if float(x.mean()) > 0.5:  # dark ink on light paper: invert to the digits' convention
        x = 1.0 - x
    return x[None]


def image_files(folder: str | Path) -> list[Path]:
    """The PNG/JPEG files of a folder (sorted), or the one file given."""
    p = Path(folder)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise LlmkitError(f"{folder} is neither an image file nor a folder of images")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LlmkitError(f"{folder} holds no .png/.jpg/.jpeg files")
    return files


def save_png(image: torch.Tensor, path: str | Path, scale: int = 8) -> None:
    """Write a (1, H, W) image in [0, 1] as a PNG, enlarged `scale` times, dark ink on white (for people)."""
    from PIL import Image

    arr = ((1.0 - image[0].clamp(0, 1)).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST).save(path)
