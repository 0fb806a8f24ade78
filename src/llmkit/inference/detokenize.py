"""Incremental detokenization with stop strings, O(1) work per token: only a few tokens are re-decoded
(a multi-byte character may span tokens) and only the held-back tail is searched for stop strings."""

from __future__ import annotations

from llmkit.tokenizer import Tokenizer

WINDOW = 5  # tokens of left context decoded with the new ones (spaces/merges at a boundary come out right)


class TextStream:
    """Turn tokens into text as they arrive (`push`), holding back what may still become a stop string or
    a multi-byte character; `finish` releases the rest. Shared by `generate_text` and the serving engine.

    Decoding follows the two-offset scheme of vLLM/HF streamers: `ids[prefix:read]` was decoded already,
    `ids[prefix:]` is decoded now and the difference is the new text, so a token's bytes that complete a
    character in a later token are emitted with that token; at most WINDOW tokens of left context are kept.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # token offsets (see the class doc)
        self.pending = ""  # decoded text not shown yet: at most the hold-back window plus the newest piece
        self.shown: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything shown so far (O(length); for the end of a generation)."""
        return "".join(self.shown)

    def push(self, token: int) -> str:
        """Add one generated token; return the newly visible text ('' while held back or after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):  # an incomplete character: wait for its bytes
            return ""
        self.pending += now[len(before):]
        self.prefix, self.read = max(len(self.ids) - WINDOW, self.read), len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (incomplete characters decode as U+FFFD), cut at a stop string."""
        if self.stopped:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.pending += now[len(before):]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def visible(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(all text safe to show, whether a stop string was hit) for the growing list of generated ids.

        Returns the whole text, so a loop calling it per token is O(output) per call: loops use push/finish.
        """
        for t in ids[len(self.ids):] if not self.stopped else []:
            self.push(t)
        if final:
            self.finish()
        return self.text, self.stopped

    def _release(self, final: bool) -> str:
        # a stop string ending in the newest text starts within the held-back window, i.e. inside `pending`
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
        else:
            cut = len(self.pending) if final else max(len(self.pending) - self.hold, 0)
            out, self.pending = self.pending[:cut], self.pending[cut:]
        if out:
            self.shown.append(out)
        return out
