"""Speculative greedy decoding (prompt lookup and a draft model) equals plain greedy decoding token for token."""

from __future__ import annotations

import pytest
import torch

from llmkit.inference.generate import generate_ids
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.speculative import NgramDraft, SpecStats, speculative_greedy
from llmkit.models.build import build_model
from llmkit.models.config import preset


def _greedy(model, prompt, n):
    return [s[0] for s in generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0))]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = build_model(preset("llama-tiny", vocab_size=64, n_layer=2, block_size=128)).eval()
    draft = build_model(preset("llama-tiny", vocab_size=64, n_layer=1, d_model=64, block_size=128)).eval()
    return target, draft


def test_ngram_index_finds_latest_continuation():
    d = NgramDraft(3)
    d.extend([1, 2, 3, 4, 1, 2, 3, 5, 9, 1, 2, 3])
    assert d.propose(2) == [5, 9]  # the latest earlier "1 2 3" was followed by 5 9
    d.extend([7])
    assert d.propose(3) == []  # "7" never occurred before
    d.accept(12)
    assert d.seq[-1] == 3


@pytest.mark.parametrize("use_draft", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_equals_greedy(models, use_draft, k):
    target, draft = models
    g = torch.Generator().manual_seed(1)
    # a repetitive prompt, so prompt lookup drafts often and is sometimes right, sometimes wrong
    prompt = torch.randint(0, 64, (12,), generator=g).tolist() * 3
    want = _greedy(target, prompt, 40)
    stats = SpecStats()
    got = [t for chunk in speculative_greedy(target, prompt, 40, draft=draft if use_draft else None, k=k,
                                             stats=stats) for t in chunk]
    assert got == want
    assert stats.drafted > 0 and stats.rounds < 40 or k == 1


def test_speculative_draft_model_equal_to_target_accepts_everything(models):
    target, _ = models
    prompt = list(range(10))
    stats = SpecStats()
    got = [t for c in speculative_greedy(target, prompt, 30, draft=target, k=4, stats=stats) for t in c]
    assert got == _greedy(target, prompt, 30)
    assert stats.accepted == stats.drafted and stats.rounds <= 30 // 5 + 1  # 5 tokens per target forward


def test_generate_text_speculative_equals_plain(tiny_ckpt):
    from llmkit.inference.generate import generate_text
    from llmkit.models.load import load

    model, tok = load(tiny_ckpt)
    prompt = "And God said, Let there be light: and there was light. And God said, Let there be"
    p = SamplingParams(max_new_tokens=24, temperature=0)
    plain = generate_text(model, tok, [prompt], p)[0]
    spec = generate_text(model, tok, [prompt], p, draft="ngram")[0]
    assert (spec.text, spec.ids, spec.finish_reason) == (plain.text, plain.ids, plain.finish_reason)
    with pytest.raises(Exception, match="greedy"):
        generate_text(model, tok, [prompt], SamplingParams(max_new_tokens=4, temperature=0.7), draft="ngram")
