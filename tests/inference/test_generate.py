"""Generation: KV cache vs no cache, batching vs single prompts, sampling filters, stop strings, streaming."""

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.inference.generate import generate, generate_ids, generate_text
from llmkit.inference.sampling import SamplingParams, process_rows, sample_next
from llmkit.models.build import build_model
from llmkit.models.config import preset
from llmkit.models.load import load


def _run(model, prompts, params, use_cache=True):
    outs = [[] for _ in prompts]
    for step in generate_ids(model, prompts, params, use_cache=use_cache):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "lstm-tiny"])
def test_greedy_with_cache_equals_without_and_batch_equals_single(name):
    torch.manual_seed(1)
    model = build_model(preset(name, vocab_size=257)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    cached = _run(model, prompts, params)
    assert all(len(o) == 24 for o in cached)
    assert cached == _run(model, prompts, params, use_cache=False)
    assert cached == [_run(model, [p], params)[0] for p in prompts]


def test_top_k_and_top_p_filters():
    def kept(logits: torch.Tensor, **kw: float) -> list[list[bool]]:
        return (process_rows(logits, [SamplingParams(**kw)])[2] > 0).tolist()

    assert kept(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2) == [[False, True, True, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(probs, top_p=0.7) == [[True, True, False, False]]  # 0.5 < 0.7 so the second token is needed too
    assert kept(probs, top_p=0.5) == [[True, False, False, False]]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(1, 50).repeat(200, 1)
    params = SamplingParams(temperature=1.0, top_k=3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = sample_next(logits, params, g1), sample_next(logits, params, g2)
    assert torch.equal(a, b)
    assert set(a.tolist()) <= set(torch.topk(logits[0], 3).indices.tolist())


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9]])
    seen = torch.tensor([[True, False]])
    assert sample_next(logits, SamplingParams(temperature=0), seen=seen).item() == 0
    assert sample_next(logits, SamplingParams(temperature=0, repetition_penalty=1.2), seen=seen).item() == 1


def test_stop_strings_streaming_and_finish_reason(tiny_ckpt):
    model, tok = load(tiny_ckpt)
    free = generate_text(model, tok, ["And God said"], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.ids) == 30
    stop = free.text[5:8]
    streamed = []
    got = generate_text(model, tok, ["And God said"], SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]),
                        on_text=lambda _i, d: streamed.append(d))[0]
    assert got.finish_reason == "stop"
    assert got.text == free.text[: free.text.find(stop)]
    assert "".join(streamed) == got.text


def test_overlong_prompt_and_bad_params_are_clear_errors(tiny_ckpt):
    model, tok = load(tiny_ckpt)
    with pytest.raises(LlmkitError, match="context is 128"):
        generate_text(model, tok, ["word " * 300], SamplingParams(max_new_tokens=5))
    with pytest.raises(LlmkitError, match="top_p"):
        SamplingParams(top_p=1.5)
    # a prompt that nearly fills the context stops at the context end with finish_reason "length"
    ids = tok.encode("word " * 200)[:120]
    out = generate_text(model, tok, [tok.decode(ids)], SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out.ids) <= 128 - len(tok.encode(tok.decode(ids))) and out.finish_reason == "length"


def test_generate_command_samples_and_batches(tiny_ckpt, capsys):
    outs = generate(str(tiny_ckpt), prompt=["In the", "The LORD said"], max_new_tokens=8, temperature=0.9,
                    seed=3, num_samples=2)
    assert len(outs) == 4 and outs[0].startswith("In the") and outs[2].startswith("The LORD said")
    again = generate(str(tiny_ckpt), prompt=["In the", "The LORD said"], max_new_tokens=8, temperature=0.9,
                     seed=3, num_samples=2)
    assert outs == again
    streamed = generate(str(tiny_ckpt), prompt=["In the"], max_new_tokens=8, temperature=0, stream=True)
    assert streamed[0] in capsys.readouterr().out


def test_text_stream_equals_full_decode(bpe_tokenizer):
    """Incremental detokenization (O(1) per token) against decoding the whole output at once, with multi-byte
    characters split across byte-level tokens and stop strings anywhere (also spanning tokens)."""
    import random

    from llmkit.inference.detokenize import TextStream

    tok = bpe_tokenizer
    text = "In the beginning God created 天地 — the heavens and the earth. Ça va? 北京是中国的首都. And God said"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    rng = random.Random(0)
    for _ in range(20):
        cut = ids[: rng.randrange(1, len(ids) + 1)]
        full = tok.decode(cut)
        stops = [] if rng.random() < 0.3 else [full[i: i + rng.randrange(1, 5)] for i in
                                                 (rng.randrange(max(len(full), 1)),)]
        s = TextStream(tok, stops)
        pieces = [s.push(t) for t in cut]
        assert all("\ufffd" not in p for p in pieces)  # a character is shown only once complete
        pieces.append(s.finish())
        hits = [full.find(x) for x in stops if x and x in full]
        want = full[: min(hits)] if hits else full
        assert "".join(pieces) == s.text == want, (stops, full)
        assert s.stopped == bool(hits)
