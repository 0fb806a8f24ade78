"""Incremental detokenization with stop strings: text safe to show while a stop string may still be forming."""

from __future__ import annotations

from llmkit.tokenizer import Tokenizer


class TextStream:
    """Incremental detokenisation with stop strings, as `generate_text` does it (hold back a possible stop)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def visible(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was hit)."""
        text = self.tok.decode(ids)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        if self.stops:
            return text[: max(len(text) - self.hold, 0)], False
        return text.rstrip("\ufffd"), False  # wait for the rest of a multi-byte character

