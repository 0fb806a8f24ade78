"""Shared fixtures: a tiny trained tokenizer and tiny checkpoints, built once per test session."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (a command's --threads) must not change the numerics of the
    tests after it: restore the count, so results do not depend on test order."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare from ../shared/data (tests/benchmarks only; never committed)."""
    p = SHARED_DATA / "tinyshakespeare.txt"
    if not p.exists():
        pytest.skip(f"Tiny Shakespeare not found at {p} (../shared/data is only present on dev/CI machines)")
    return p


@pytest.fixture(scope="session")
def bible_sample() -> list[str]:
    """The first 3,000 verses of the World English Bible (packaged corpus)."""
    from llmkit.data.corpus import bible_verses

    return list(itertools.islice(bible_verses(), 3000))


@pytest.fixture(scope="session")
def bpe_tokenizer(bible_sample):
    """A byte-level BPE tokenizer with 512 tokens trained on Bible verses."""
    from llmkit.tokenizer import train_from_iterator

    return train_from_iterator(bible_sample, "bpe", vocab_size=512, show_progress=False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, bpe_tokenizer) -> Path:
    """A randomly initialised gpt2-tiny checkpoint folder (vocab 512) with its tokenizer."""
    from llmkit.models.build import build_model
    from llmkit.models.checkpoint import save_checkpoint
    from llmkit.models.config import preset

    torch.manual_seed(0)
    cfg = preset("gpt2-tiny", vocab_size=bpe_tokenizer.vocab_size)
    model = build_model(cfg)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "gpt2-tiny", model, cfg, bpe_tokenizer)
