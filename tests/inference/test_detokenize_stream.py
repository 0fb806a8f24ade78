"""TextStream: incremental text equals a full decode, stop strings are found where `str.find` finds them, and
each token decodes only a short window (O(stops), not O(output))."""

from __future__ import annotations

import random

from llmkit.inference.detokenize import WINDOW, TextStream


def test_incremental_text_and_stops_equal_full_decode(bpe_tokenizer):
    tok = bpe_tokenizer
    rng = random.Random(0)
    texts = ["In the beginning God created the heavens", "起初神创造天地 🌍 and the earth was void", "a.b,c;d"]
    for text in texts:
        ids = tok.encode(text) + [rng.randrange(3, tok.vocab_size) for _ in range(40)]
        full = tok.decode(ids)
        for stops in ([], [full[len(full) // 2: len(full) // 2 + 3]], ["zzzz", full[-2:]]):
            stream, seen = TextStream(tok, stops), ""
            for n in range(1, len(ids) + 1):
                shown, hit = stream.visible(ids[:n], final=False)
                assert shown.startswith(seen) or hit  # never takes back what it showed
                seen = shown
                if hit:
                    break
            shown, hit = stream.visible(ids[:n], final=True)
            cut = min([full.find(s) for s in stops if s in full], default=-1)
            assert shown == (full[:cut] if cut >= 0 else full) and hit == (cut >= 0)


def test_each_token_decodes_a_bounded_window(bpe_tokenizer):
    lengths: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return bpe_tokenizer.decode(ids)

    stream = TextStream(Counting(), ["never"])
    ids = bpe_tokenizer.encode("And God said, Let there be light: and there was light. " * 20)
    for n in range(1, len(ids) + 1):
        stream.visible(ids[:n], final=False)
    assert len(ids) > 100 and max(lengths) <= WINDOW + 1
