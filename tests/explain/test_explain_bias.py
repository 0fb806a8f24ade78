"""Bias probe: exact sentence log-probs, a bootstrap CI that agrees with scipy, and a planted bias found."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
from scipy import stats

from llmkit.cli import main
from llmkit.explain.bias import Pair, bias_report, bootstrap_ci, load_pairs, sentence_logprobs
from llmkit.models.build import build_model
from llmkit.models.config import preset


def test_shipped_set_is_minimal_pairs() -> None:
    pairs, meta = load_pairs("gender-occupations")
    assert len(pairs) == 8 * 40 and meta["a"] == "male"
    for p in pairs:
        wa, wb = p.a.split(), p.b.split()
        diff = [(x, y) for x, y in zip(wa, wb) if x != y]
        assert len(wa) == len(wb) and len(diff) == 1, (p.a, p.b)
        assert diff[0][0].strip(".,") in ("he", "his", "him") and diff[0][1].strip(".,") in ("she", "her")


def test_bootstrap_ci_agrees_with_scipy() -> None:
    x = np.random.default_rng(1).normal(0.3, 1.0, 300)
    lo, hi = bootstrap_ci(x, n_boot=4000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                          random_state=2).confidence_interval
    se = x.std() / np.sqrt(len(x))  # different resampling streams: agree to a fraction of a standard error
    assert abs(lo - ref.low) < 0.15 * se and abs(hi - ref.high) < 0.15 * se


def test_logprobs_match_unbatched_loss(tiny_ckpt, bpe_tokenizer) -> None:
    from llmkit.models.load import load

    model, tok = load(tiny_ckpt)
    texts = ["In the beginning God created the heavens.", "And the earth was", "Light."]
    got = sentence_logprobs(model, tok, texts, batch_size=2)  # padded batches
    for t, g in zip(texts, got):
        ids = torch.tensor([[tok.bos_id] + tok.encode(t)])
        with torch.no_grad():
            ref = -float(model(ids[:, :-1], ids[:, 1:]).loss) * (ids.size(1) - 1)
        assert g == pytest.approx(ref, abs=1e-3)


def test_swapped_pairs_negate_and_equal_pairs_vanish(tiny_ckpt) -> None:
    from llmkit.models.load import load

    model, tok = load(tiny_ckpt)
    pairs = load_pairs("gender-occupations")[0][::20]  # 16 pairs
    r = bias_report(model, tok, pairs, n_boot=500)
    rs = bias_report(model, tok, [Pair(p.b, p.a, p.label) for p in pairs], n_boot=500)
    np.testing.assert_allclose(rs["skews"], -np.array(r["skews"]), atol=1e-4)
    r0 = bias_report(model, tok, [Pair(p.a, p.a) for p in pairs], n_boot=500)
    assert r0["mean_skew"] == 0.0 and r0["ci95"] == [0.0, 0.0] and not r0["significant"]


def test_encoder_pseudo_loglik_matches_one_at_a_time(bible_sample) -> None:
    from llmkit.tokenizer import train_from_iterator

    tok = train_from_iterator(bible_sample[:500], "wordpiece", vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = build_model(preset("bert-tiny", vocab_size=tok.vocab_size, block_size=32)).eval()
    text = "God saw the light"
    got = sentence_logprobs(model, tok, [text])[0]
    ids = tok.encode(text, add_special_tokens=True)
    ref = 0.0
    for i in range(1, len(ids) - 1):  # skip [CLS] and [SEP]
        x = torch.tensor([ids])
        x[0, i] = tok.special_id("mask")
        with torch.no_grad():
            ref += float(model(x).logits[0, i].log_softmax(-1)[ids[i]])
    assert got == pytest.approx(ref, abs=1e-4)


def test_probe_finds_a_planted_bias(bpe_tokenizer, tmp_path) -> None:
    """Train on text where 3 occupations always take 'he' and 3 'she': the probe must see both skews."""
    spec = json.loads(resources.files("llmkit.explain").joinpath("data", "gender_occupations.json").read_text())
    spec["fills"]["occupation"] = ["nurse", "engineer", "secretary", "carpenter", "receptionist", "mechanic"]
    (tmp_path / "six.json").write_text(json.dumps(spec))
    pairs, _ = load_pairs(str(tmp_path / "six.json"))  # a user templated file: 8 frames x 6 = 48 pairs
    male = {"engineer", "carpenter", "mechanic"}
    corpus = [p.a if p.label in male else p.b for p in pairs]
    tok = bpe_tokenizer
    seqs = [[tok.bos_id] + tok.encode(t) for t in corpus]
    T = max(map(len, seqs))
    idx = torch.full((len(seqs), T), tok.pad_id)
    tgt = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
        tgt[i, :len(s) - 1] = torch.tensor(s[1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=64, n_head=2,
                                   block_size=64))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            b = torch.randint(0, len(seqs), (32,), generator=g)
            loss = model(idx[b, :-1], tgt[b, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    rm = bias_report(model, tok, [p for p in pairs if p.label in male], n_boot=1000)
    rf = bias_report(model, tok, [p for p in pairs if p.label not in male], n_boot=1000)
    assert rm["significant"] and rm["ci95"][0] > 0, rm["ci95"]
    assert rf["significant"] and rf["ci95"][1] < 0, rf["ci95"]
    assert rm["share_a_preferred"] > 0.75 and rf["share_a_preferred"] < 0.25


def test_cli_user_file_and_errors(tiny_ckpt, tmp_path, capsys) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"a": f"The {w} said he was tired.", "b": f"The {w} said she was tired.",
                                       "label": w}) for w in ["nurse", "smith", "king", "shepherd"]) + "\n")
    out = tmp_path / "rep" / "bias.json"
    assert main(["explain", "bias", str(tiny_ckpt), "--pairs", str(f), "--n_boot", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 pairs" in printed and "95% CI" in printed
    rep = json.loads(out.read_text())
    assert len(rep["skews"]) == 4 and rep["ci95"][0] <= rep["mean_skew"] <= rep["ci95"][1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "only one side"}\n')
    for args, msg in [(["--pairs", str(bad)], "bad.jsonl:1: each line must be"),
                      (["--pairs", str(tmp_path / "missing.tsv")], "no pair file"),
                      (["--n_boot", "10"], "too few resamples")]:
        assert main(["explain", "bias", str(tiny_ckpt), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
