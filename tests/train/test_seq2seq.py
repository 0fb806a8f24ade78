"""`llmkit train seq2seq` end to end on a toy task, the Bible verse alignment, and bad parallel input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.data.parallel import bible_pairs, read_pairs, split_pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """Digits -> letters (3 1 4 -> d b e): the decoder must align each output with a source position."""
    from llmkit.tokenizer import train_from_iterator

    root = tmp_path_factory.mktemp("toy")
    rnd = random.Random(0)
    lines = []
    for _ in range(1200):
        ds = [rnd.randint(0, 9) for _ in range(rnd.randint(3, 6))]
        lines.append(" ".join(map(str, ds)) + "\t" + " ".join("abcdefghij"[d] for d in ds))
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_from_iterator(["0123456789 abcdefghij"], "char", vocab_size=100, show_progress=False).save(root / "tok")
    return root


@pytest.fixture(scope="module")
def toy_model(toy) -> Path:
    out = toy / "mt"
    rc = main(["train", "seq2seq", str(toy / "pairs.tsv"), str(out), "--tokenizer", str(toy / "tok"),
               "--d_model", "32", "--n_head", "4", "--n_layer", "1", "--d_ff", "64", "--dropout", "0",
               "--max_len", "16", "--batch_size", "32", "--lr", "3e-3", "--warmup_steps", "20",
               "--max_steps", "400", "--eval_every", "0", "--valid_fraction", "0.05", "--beam", "2",
               "--label_smoothing", "0", "--threads", "1"])
    assert rc == 0
    return out


def test_toy_translation_is_learned_and_scored(toy_model):
    scores = json.loads((toy_model / "scores.json").read_text())
    greedy, beam = scores["greedy"], scores["beam2"]
    base = scores["baselines"]
    assert greedy["n"] == beam["n"] > 30
    # learned: BLEU ~80-100 (chrF is lower on these 3-6 letter strings); the baselines get BLEU <= 2, chrF <= 7
    assert greedy["bleu"] > 60 and beam["bleu"] > 60
    assert greedy["chrf"] > 40 and beam["chrf"] > 40
    assert max(b["bleu"] for b in base.values()) < 5 and max(b["chrf"] for b in base.values()) < 15


def test_checkpoint_loads_and_translates(toy_model):
    import llmkit
    from llmkit.inference.beam import translate_texts

    model, tok = llmkit.load(toy_model)
    assert model.cfg.arch == "seq2seq" and tok is not None
    rnd = random.Random(1)
    digits = [[rnd.randint(0, 9) for _ in range(rnd.randint(3, 6))] for _ in range(20)]
    hyps = translate_texts(model, tok, [" ".join(map(str, d)) for d in digits], beam=2)
    right = sum(h == " ".join("abcdefghij"[x] for x in d) for h, d in zip(hyps, digits))
    assert right >= 12, list(zip(hyps, digits))


def test_bible_pairs_align_by_verse_id():
    pairs = {p.id: p for p in bible_pairs()}
    assert len(pairs) > 31_000
    gen = pairs["01001001"]
    assert gen.src.startswith("In the beginning God created") and gen.tgt.startswith("元始に神天地を創造")
    john = pairs["43003016"]  # John 3:16 (the New Testament follows the 39 Old Testament books)
    assert "loved the world" in john.src and "世を愛し" in john.tgt
    assert "{" not in gen.src  # translator notes stripped
    train, valid = split_pairs(list(pairs.values()), 0.02, 0)
    assert not {p.id for p in train} & {p.id for p in valid}
    assert 0.015 < len(valid) / len(pairs) < 0.025
    assert [p.id for p in split_pairs(list(pairs.values()), 0.02, 0)[1]] == [p.id for p in valid]


def test_parallel_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"src": "one", "tgt": "un"}\n{"source": "two", "target": "deux"}\n')
    assert [(p.src, p.tgt) for p in read_pairs(str(tmp_path / "a.jsonl"))] == [("one", "un"), ("two", "deux")]
    (tmp_path / "s.txt").write_text("one\ntwo\n")
    (tmp_path / "t.txt").write_text("un\ndeux\n")
    assert [p.tgt for p in read_pairs(str(tmp_path / "s.txt"), str(tmp_path / "t.txt"))] == ["un", "deux"]


@pytest.mark.parametrize("case", ["mismatch", "columns", "jsonl", "empty", "preset"])
def test_bad_parallel_input_is_one_line_exit_2(tmp_path, capsys, case):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("one\ntwo\nthree\n")
    tgt.write_text("un\ndeux\n")
    args = {
        "mismatch": [str(src), str(tmp_path / "o"), "--tgt_file", str(tgt)],
        "columns": [str(tmp_path / "p.tsv"), str(tmp_path / "o")],
        "jsonl": [str(tmp_path / "p.jsonl"), str(tmp_path / "o")],
        "empty": [str(tmp_path / "e.tsv"), str(tmp_path / "o")],
        "preset": [str(src), str(tmp_path / "o"), "--tgt_file", str(src), "--preset", "gpt2-tiny"],
    }[case]
    (tmp_path / "p.tsv").write_text("a\tb\tc\n")
    (tmp_path / "p.jsonl").write_text('{"src": "a"}\n')
    (tmp_path / "e.tsv").write_text("\n \t \n")
    assert main(["train", "seq2seq", *args, "--max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    expected = {"mismatch": "differ in length", "columns": "SOURCE<TAB>TARGET", "jsonl": '"src" and "tgt"',
                "empty": "no non-empty", "preset": "encoder-decoder"}[case]
    assert expected in err[0]
    assert not (tmp_path / "o").exists()  # nothing half-written
