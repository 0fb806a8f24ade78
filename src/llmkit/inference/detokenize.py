"""Incremental detokenization with stop strings: text safe to show while a stop string may still be forming.

Each new token costs O(window + length of the stop strings), not O(length of the output): only a short
window of recent tokens is decoded (vLLM's prefix/read offsets, so decoders that strip or merge at token
boundaries stay right), and only the new text plus `max stop length - 1` characters before it is searched.
"""

from __future__ import annotations

from llmkit.tokenizer import Tokenizer

WINDOW = 5  # tokens of left context decoded with the new ones (spaces/merges at a boundary come out right)


class TextStream:
    """Incremental detokenisation with stop strings, as `generate_text` does it (hold back a possible stop).

    `visible(ids, final)` is called with the growing list of generated ids (the same list, appended to)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # decoded text of ids[:read]
        self.prefix = self.read = 0  # ids[prefix:read] is the window decoded before the new tokens
        self.searched = 0  # text[:searched] holds no stop string
        self.hit: int | None = None  # where the first stop string starts

    def _advance(self, ids: list[int], final: bool) -> None:
        if len(ids) <= self.read:
            return
        before = self.tok.decode(ids[self.prefix: self.read])
        now = self.tok.decode(ids[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return  # wait for the rest of a multi-byte character
        self.text += now[len(before):]
        self.prefix, self.read = max(len(ids) - WINDOW, self.read), len(ids)

    def _search(self) -> None:
        if self.hit is not None or not self.stops:
            return
        start = max(self.searched - self.hold, 0)
        tail = self.text[start:]
        hits = [tail.find(s) for s in self.stops if s in tail]
        if hits:
            self.hit = start + min(hits)
        self.searched = len(self.text)

    def visible(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was hit)."""
        if self.hit is None:
            self._advance(ids, final)
            self._search()
        if self.hit is not None:
            return self.text[: self.hit], True
        if final or not self.stops:
            return self.text, False
        return self.text[: max(len(self.text) - self.hold, 0)], False
