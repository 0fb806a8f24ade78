"""llmkit: clean, tokenize, pretrain, fine-tune, evaluate, generate, convert, export and serve language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from llmkit.models.config import ModelConfig as ModelConfig
    from llmkit.models.load import load as load


def __getattr__(name: str) -> Any:
    """Lazy top-level API (`llmkit.load`, `llmkit.ModelConfig`, ...) so `import llmkit` stays fast."""
    if name == "load":
        from llmkit.models.load import load

        return load
    if name in ("ModelConfig", "preset"):
        from llmkit.models import config

        return getattr(config, name)
    if name == "build_model":
        from llmkit.models.build import build_model

        return build_model
    if name == "Tokenizer":
        from llmkit.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
