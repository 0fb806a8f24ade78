"""`llmkit app ...` end to end on tiny checkpoints: outputs, scores recomputed from the written predictions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.cli import main


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seq2seq_ckpt(tmp_path_factory, bpe_tokenizer) -> Path:
    from llmkit.models.build import build_model
    from llmkit.models.checkpoint import save_checkpoint
    from llmkit.models.config import preset

    torch.manual_seed(0)
    cfg = preset("transformer-tiny", vocab_size=bpe_tokenizer.vocab_size, d_model=32, n_head=2, n_layer=1,
                 d_ff=64, block_size=64)
    return save_checkpoint(tmp_path_factory.mktemp("s2s") / "mt", build_model(cfg), cfg, bpe_tokenizer)


def test_qa_scores_match_written_predictions(tiny_ckpt, tmp_path, capsys):
    from llmkit.apps.qa import qa_scores

    data = _write(tmp_path / "qa.jsonl", [
        {"question": "Who made the heavens?", "context": "In the beginning God created the heavens.", "answers": ["God"]},
        {"question": "What was on the waters?", "answer": "God's Spirit"},
    ])
    out = tmp_path / "pred.jsonl"
    assert main(["app", "qa", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--max_new_tokens", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows = _jsonl(out)
    assert [r["question"] for r in rows] == ["Who made the heavens?", "What was on the waters?"]
    expect = qa_scores([r["prediction"] for r in rows], [["God"], ["God's Spirit"]])
    assert line == f"qa: n 2  exact_match {expect['exact_match']:.2f}  f1 {expect['f1']:.2f}"


def test_extract_constrained_always_gives_the_fields(tiny_ckpt, tmp_path):
    import jsonschema

    from llmkit.apps.common import complete
    from llmkit.apps.extract import extract, extraction_schema, record_bytes
    from llmkit.models.load import load

    res = extract(str(tiny_ckpt), fields=["person", "place"], text=["Moses went up to Sinai.", "Ruth stayed."],
                  max_new_tokens=3)
    assert res["scores"]["valid_json"] == 100.0
    for p in res["predictions"]:  # a random model still yields exactly the requested keys
        assert set(p) == {"person", "place"} and all(v is None or isinstance(v, str) for v in p.values())
    # the raw outputs under the schema's grammar, sampled hot from a random model (which would write anything
    # unconstrained), long prompts cut to leave the record's room: every one parses and validates
    model, tok = load(tiny_ckpt)
    fields = ["person", "place", 'na"me']
    schema = extraction_schema(fields, 4)
    prompts = ["Moses went up to Sinai.", "摩西上了西奈山。 " * 40, 'He said "no".']
    for seed in range(3):
        outs = complete(model, tok, prompts, record_bytes(fields, 4) + 1, temperature=1.5, seed=seed,
                        json_schema=schema)
        for o in outs:
            jsonschema.validate(json.loads(o), schema)


def test_extract_validate_retries_until_valid(tiny_ckpt, monkeypatch):
    import llmkit.apps.extract as ex

    replies = iter([["no json here", '{"person": "Ann", "place": null}'], ['{"person": "Bob", "place": "Rome"}']])
    calls = []

    def fake_complete(model, tok, prompts, max_new_tokens, stop=None, batch_size=8, temperature=0.0, seed=0):
        calls.append((len(prompts), temperature))
        return next(replies)

    monkeypatch.setattr(ex, "complete", fake_complete)
    res = ex.extract(str(tiny_ckpt), text=["Ann left.", "Bob is in Rome."], fields=["person", "place"],
                     mode="validate", retries=2)
    assert calls == [(2, 0.0), (1, 0.7)]  # only the invalid one is regenerated, with sampling
    assert res["scores"]["retries"] == 1 and res["scores"]["valid_json"] == 100.0
    assert res["predictions"] == [{"person": "Bob", "place": "Rome"}, {"person": "Ann", "place": None}]


def test_extract_scores_with_gold(tiny_ckpt, tmp_path):
    from llmkit.apps.extract import extract, field_scores

    data = _write(tmp_path / "x.jsonl", [{"text": "Noah built an ark.", "fields": {"person": "Noah", "place": None}},
                                         {"text": "Jonah went to Nineveh.", "fields": {"person": "Jonah",
                                                                                        "place": "Nineveh"}}])
    res = extract(str(tiny_ckpt), data=str(data), max_new_tokens=3)
    golds = [r["fields"] for r in _jsonl(data)]
    assert {k: v for k, v in res["scores"].items() if k.startswith("f1")} == \
        field_scores(res["predictions"], golds, ["person", "place"])


def test_translate_decoder_and_seq2seq(tiny_ckpt, seq2seq_ckpt, tmp_path):
    from sacrebleu.metrics import BLEU

    from llmkit.apps.translate import translate

    pairs = tmp_path / "p.tsv"
    pairs.write_text("In the beginning\tAu commencement\nGod said\tDieu dit\n", encoding="utf-8")
    for ckpt, beam in ((tiny_ckpt, 1), (seq2seq_ckpt, 3)):
        out = tmp_path / f"t{beam}.jsonl"
        res = translate(str(ckpt), data=str(pairs), split="all", beam=beam, max_new_tokens=6, out=str(out))
        rows = _jsonl(out)
        assert [r["ref"] for r in rows] == ["Au commencement", "Dieu dit"]
        s = res["scores"]
        assert s["bleu_tokenize"] == "13a" and s["n"] == 2
        ref_bleu = BLEU(tokenize="13a").corpus_score([r["prediction"] for r in rows], [[r["ref"] for r in rows]])
        assert s["bleu"] == pytest.approx(round(ref_bleu.score, 2))


def test_chat_keeps_history(tiny_ckpt):
    from llmkit.apps.chat import app_chat as chat

    h = chat(str(tiny_ckpt), message=["Hello", "Who made the world?"], system="Be brief.", max_new_tokens=4)
    assert [m["role"] for m in h] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("case", ["empty_summary", "empty_answer", "mismatch", "not_decoder", "no_input",
                                  "mixed_refs", "bad_json"])
def test_bad_input_is_one_line_exit_2(case, tiny_ckpt, seq2seq_ckpt, tmp_path, capsys):
    s, t = tmp_path / "s.txt", tmp_path / "t.txt"
    s.write_text("a\nb\nc\n")
    t.write_text("x\ny\n")
    args = {
        "empty_summary": ["summarize", str(tiny_ckpt), "--data",
                          str(_write(tmp_path / "d.jsonl", [{"text": "Some text.", "summary": " "}]))],
        "empty_answer": ["qa", str(tiny_ckpt), "--data",
                         str(_write(tmp_path / "d.jsonl", [{"question": "Who?", "answers": [""]}]))],
        "mismatch": ["translate", str(seq2seq_ckpt), "--data", str(s), "--tgt_file", str(t)],
        "not_decoder": ["qa", str(seq2seq_ckpt), "--question", "Who?"],
        "no_input": ["extract", str(tiny_ckpt), "--fields", "person"],
        "mixed_refs": ["qa", str(tiny_ckpt), "--data", str(_write(tmp_path / "d.jsonl", [
            {"question": "Who?", "answer": "Ann"}, {"question": "Where?"}])), "--max_new_tokens", "2"],
        "bad_json": ["summarize", str(tiny_ckpt), "--data", str(tmp_path / "bad.jsonl")],
    }[case]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    out = tmp_path / "out.jsonl"
    assert main(["app", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()  # nothing half-written
