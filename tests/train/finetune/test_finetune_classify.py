"""Fine-tuning end to end on tiny models: classification (encoder [CLS]/mean, decoder last token), NER with
first-sub-token labels, multi-task weighted loss, LoRA, `llmkit evaluate`, and bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.cli import main


@pytest.fixture(scope="module")
def verses(bible_sample) -> list[str]:
    return bible_sample[:1400]


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory, verses) -> Path:
    """A 1-layer, 32-wide BERT-style encoder with a WordPiece tokenizer (random weights)."""
    from llmkit.models.build import build_model
    from llmkit.models.checkpoint import save_checkpoint
    from llmkit.models.config import preset
    from llmkit.tokenizer import train_from_iterator

    tok = train_from_iterator(verses, "wordpiece", vocab_size=600, show_progress=False)
    torch.manual_seed(0)
    cfg = preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, block_size=64)
    return save_checkpoint(tmp_path_factory.mktemp("ft") / "bert", build_model(cfg), cfg, tok)


def _label(v: str) -> str:
    return "said" if "said" in v.split() or "said," in v.split() else "other"


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory, verses) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls")
    parts = {"train": verses[:1000], "val": verses[1000:1200], "test": verses[1200:1400]}
    out = {}
    for name, vs in parts.items():
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": v, "label": _label(v)}) + "\n" for v in vs), encoding="utf-8")
        out[name] = p
    return out


def _run_classify(init, out, files, **kw):
    from llmkit.train.finetune.run import HeadSource, finetune

    args = dict(max_steps=60, batch_size=16, lr=3e-3, eval_every=20, patience=0, max_len=48, progress=False)
    args.update(kw)
    pooling = args.pop("pooling", "mean")
    src = HeadSource("main", "classify", str(files["train"]), str(files["val"]), str(files["test"]), pooling=pooling)
    return finetune([src], str(init), str(out), task="classify", **args)


def test_classify_learns_and_report_matches_sklearn(bert_ckpt, cls_files, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    from llmkit.data.labeled import read_text_labels
    from llmkit.models.heads import load_classifier

    out = tmp_path / "cls"
    res = _run_classify(bert_ckpt, out, cls_files)
    test = read_text_labels(cls_files["test"])
    y_true = [lab for _, lab in test]
    majority = max(y_true.count("said"), y_true.count("other")) / len(y_true)
    r = res["main"]
    assert r["split"] == "test" and r["n"] == 200
    assert r["accuracy"] > majority + 0.05, (r["accuracy"], majority)

    # independent pass: reload, classify each text alone (no padding), score with sklearn
    model, tok, labels = load_classifier(out)
    assert labels == ["other", "said"]
    cls_id, sep_id = tok.special_id("cls"), tok.special_id("sep")
    y_pred = []
    with torch.no_grad():
        for text, _ in test:
            ids = torch.tensor([[cls_id] + tok.encode(text)[:46] + [sep_id]])
            y_pred.append(labels[int(model("main", ids, torch.ones_like(ids)).argmax(-1))])
    assert r["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-9)
    assert r["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-9)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["main"]["accuracy"] == r["accuracy"]
    assert sum(map(sum, saved["main"]["confusion"]["matrix"])) == 200
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.jsonl").exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["task"] == "classify" and meta["labels"] == ["other", "said"]

    # `llmkit evaluate` on the checkpoint's recorded test file reproduces the numbers
    assert main(["evaluate", str(out), "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["main"]["accuracy"] == pytest.approx(r["accuracy"], abs=1e-9)


def test_decoder_last_token_pooling_ignores_padding(tiny_ckpt):
    """A decoder's classification logits for a text must not change when it is batched with longer texts."""
    from llmkit.data.batching import pad_batch
    from llmkit.data.labeled import encode_texts
    from llmkit.models.heads import TaskModel
    from llmkit.train.finetune.run import load_backbone

    backbone, tok = load_backbone(str(tiny_ckpt))
    torch.manual_seed(0)
    model = TaskModel(backbone, {"main": {"kind": "classify", "labels": ["a", "b", "c"], "pooling": "last"}}).eval()
    texts = ["In the beginning", "God created the heavens and the earth, and the earth was formless", "Amen"]
    seqs = encode_texts(tok, texts, "decoder", 64)
    assert all(s[-1] == tok.eos_id for s in seqs)
    b = pad_batch(seqs, tok.pad_id)
    with torch.no_grad():
        batched = model("main", b["input_ids"], b["attention_mask"])
        for i, s in enumerate(seqs):
            alone = model("main", torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


def _conll(path: Path, verses: list[str]) -> None:
    names = {"God", "Yahweh", "Abraham", "Isaac", "Jacob", "Joseph", "Moses", "Sarah"}
    places = {"Egypt", "Canaan", "Haran", "Bethel"}
    lines = []
    for v in verses:
        for w in v.replace(",", " ,").replace(".", " .").replace(";", " ;").split():
            tag = "B-PER" if w in names else "B-LOC" if w in places else "O"
            lines.append(f"{w}\t{tag}")
        lines.append("\t")  # WNUT-16 style separator: a line holding only a TAB
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_ner_predictions_match_independent_alignment(bert_ckpt, verses, tmp_path):
    from seqeval.metrics import f1_score

    from llmkit.data.labeled import read_conll
    from llmkit.models.heads import load_task_model
    from llmkit.train.finetune.ner import most_frequent_tag_baseline
    from llmkit.train.finetune.run import HeadSource, finetune

    _conll(tmp_path / "train.conll", verses[:1200:2])
    _conll(tmp_path / "test.conll", verses[1:400:4])
    src = HeadSource("main", "ner", str(tmp_path / "train.conll"), str(tmp_path / "test.conll"),
                     str(tmp_path / "test.conll"))
    res = finetune([src], str(bert_ckpt), str(tmp_path / "ner"), task="ner", max_steps=60, batch_size=16, lr=1e-2,
                   eval_every=30, patience=0, max_len=64, progress=False)
    r = res["main"]
    assert set(r["per_type"]) <= {"PER", "LOC"}

    # independent decoding: each sentence alone, word -> first sub-token via the tokenizer's word_ids
    model, tok, meta = load_task_model(tmp_path / "ner")
    labels = meta["heads"]["main"]["labels"]
    test = read_conll(tmp_path / "test.conll")
    y_pred = []
    with torch.no_grad():
        for words, _ in test:
            enc = tok.tok.encode(words, is_pretokenized=True, add_special_tokens=False)
            ids = [tok.special_id("cls")] + enc.ids[:62] + [tok.special_id("sep")]
            wid = [None] + enc.word_ids[:62] + [None]
            arg = model("main", torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].argmax(-1)
            first = {}
            for pos, w in enumerate(wid):
                if w is not None and w not in first:
                    first[w] = pos
            y_pred.append([labels[int(arg[first[i]])] if i in first else "O" for i in range(len(words))])
    y_true = [t for _, t in test]
    assert r["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-9)
    assert r["f1"] > 0.5  # names/places are a closed, learnable set

    base = most_frequent_tag_baseline(read_conll(tmp_path / "train.conll"), [w for w, _ in test])
    assert f1_score(y_true, base) > 0.9  # every entity word is unambiguous here: the baseline is near perfect


def test_multitask_loss_is_weighted_sum(bert_ckpt, cls_files, verses, tmp_path):
    from llmkit.data.labeled import prepare_tokenizer
    from llmkit.models.heads import TaskModel
    from llmkit.train.finetune.multitask import multitask
    from llmkit.train.finetune.run import HeadSource, build_heads, load_backbone
    from llmkit.train.finetune.task import FinetuneTask

    _conll(tmp_path / "ner.conll", verses[:300])
    backbone, tok = load_backbone(str(bert_ckpt))
    prepare_tokenizer(tok)
    sources = [HeadSource("sent", "classify", str(cls_files["train"]), weight=0.3, pooling="mean"),
               HeadSource("ents", "ner", str(tmp_path / "ner.conll"), weight=0.0)]
    heads = build_heads(sources, tok, "encoder", 48, 0.1, 0.1, seed=0)
    model = TaskModel(backbone, {h.name: h.spec() for h in heads}).eval()
    task = FinetuneTask(heads, tok.pad_id, batch_size=8)
    batch = task.train_batch(0, 0)
    assert batch["sent.input_ids"].shape[0] == 8 and batch["ents.labels"].shape[0] == 8
    total = task.loss(model, batch)
    l_sent = model.loss("sent", task._sub(batch, "sent", "cpu"))
    l_ents = model.loss("ents", task._sub(batch, "ents", "cpu"))
    assert total.item() == pytest.approx(0.3 * l_sent.item() + 0.0 * l_ents.item(), rel=1e-6)
    total.backward()
    assert model.heads["ents"].out.weight.grad.abs().sum() == 0  # weight 0: the NER head learns nothing
    assert model.heads["sent"].out.weight.grad.abs().sum() > 0
    assert task.train_batch(5, 0)["sent.input_ids"].tolist() == task.train_batch(5, 0)["sent.input_ids"].tolist()

    cfg = tmp_path / "tasks.yaml"
    cfg.write_text(f"tasks:\n  - {{name: sent, kind: classify, data: {cls_files['train']}, weight: 1.0, pooling: mean}}\n"
                   f"  - {{name: ents, kind: ner, data: {tmp_path / 'ner.conll'}, weight: 0.5}}\n", encoding="utf-8")
    res = multitask(str(bert_ckpt), config=str(cfg), out=str(tmp_path / "mt"), max_steps=6, eval_every=3,
                    batch_size=8, lr=1e-3)
    assert {"sent", "ents"} <= set(res)
    rows = [json.loads(x) for x in (tmp_path / "mt" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "val_loss" in x]
    assert evals and all({"sent/accuracy", "ents/f1", "sent/loss", "ents/loss"} <= set(x) for x in evals)
    for x in evals:
        assert x["val_loss"] == pytest.approx(1.0 * x["sent/loss"] + 0.5 * x["ents/loss"], abs=1e-5)


def test_lora_classify_trains_adapters_only(bert_ckpt, cls_files, tmp_path):
    from llmkit.models.checkpoint import load_tensors

    res = _run_classify(bert_ckpt, tmp_path / "lora", cls_files, max_steps=6, eval_every=3, lora_r=4,
                        lora_targets=["attn.qkv"])
    adapter = load_tensors(tmp_path / "lora-adapter" / "adapter.safetensors")
    assert adapter and all(".lora_" in k or k.startswith("heads.") for k in adapter)
    base = load_tensors(bert_ckpt / "model.safetensors")
    merged = load_tensors(tmp_path / "lora" / "model.safetensors")
    for k, v in base.items():  # untouched (non-target) weights are bit-identical; targets moved by B A
        if "attn.qkv.weight" in k:
            continue
        torch.testing.assert_close(merged["backbone." + k], v, atol=0, rtol=0)
    assert "accuracy" in res["main"]


def _write(p: Path, text: str) -> str:
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.filterwarnings("ignore::UserWarning")  # opacus: full backward hooks, accountant alphas
def test_classify_with_dp_epsilon_from_the_cli(bert_ckpt, cls_files, tmp_path):
    pytest.importorskip("opacus")
    out = tmp_path / "dp"
    rc = main(["finetune", "classify", str(bert_ckpt), "--data", str(cls_files["train"]), "--val",
               str(cls_files["val"]), "--test", str(cls_files["test"]), "--out", str(out), "--max_steps", "4",
               "--batch_size", "16", "--max_len", "32", "--dp_epsilon", "8", "--dp_reproducible", "true"])
    assert rc == 0
    dp = json.loads((out / "eval_results.json").read_text())["dp"]
    assert 0 < dp["epsilon_spent"] <= 8.0 and dp["noise_multiplier"] > 0 and dp["delta"] == pytest.approx(1e-4)


def test_bad_input_exits_2(bert_ckpt, cls_files, tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    bad = _write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    assert main(["finetune", "classify", str(bert_ckpt), "--data", bad, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:2: malformed JSON" in err and "Traceback" not in err

    val = _write(tmp_path / "val.jsonl", '{"text": "a", "label": "said"}\n{"text": "b", "label": "angel"}\n')
    assert main(["finetune", "classify", str(bert_ckpt), "--data", str(cls_files["train"]), "--val", val,
                 "--out", out]) == 2
    assert "label(s) ['angel'] not among the training labels" in capsys.readouterr().err

    empty = _write(tmp_path / "empty.csv", "text,label\n")
    assert main(["finetune", "classify", str(bert_ckpt), "--data", empty, "--out", out]) == 2
    assert "no examples" in capsys.readouterr().err
    cols = _write(tmp_path / "cols.csv", "review,stars\ngood,5\n")
    assert main(["finetune", "classify", str(bert_ckpt), "--data", cols, "--out", out]) == 2
    assert "found ['review', 'stars']" in capsys.readouterr().err
    assert main(["finetune", "ner", str(bert_ckpt), "--data", "rotten_tomatoes", "--out", out]) == 2
    assert "classification dataset" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing half-written

    # a trained classifier evaluated on data with a label it does not have
    _run_classify(bert_ckpt, tmp_path / "cls", cls_files, max_steps=2, eval_every=2)
    three = _write(tmp_path / "three.csv", "text,label\nx,said\ny,other\nz,angel\n")
    assert main(["evaluate", str(tmp_path / "cls"), "--data", three]) == 2
    assert "['angel'] not among the training labels" in capsys.readouterr().err

    assert main(["evaluate", str(tiny_ckpt)]) == 2
    assert "perplexity needs a text" in capsys.readouterr().err
    assert main(["evaluate", str(bert_ckpt), "--data", "bible"]) == 2
    assert "causal language models" in capsys.readouterr().err


def test_evaluate_perplexity_cli(tiny_ckpt, tmp_path):
    from llmkit.evaluate.perplexity import perplexity_of_ids
    from llmkit.models.load import load

    text = _write(tmp_path / "t.txt", "In the beginning God created the heavens and the earth.\n" * 30)
    res_path = tmp_path / "ppl.json"
    assert main(["evaluate", str(tiny_ckpt), "--data", text, "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    model, tok = load(tiny_ckpt)
    ids = tok.encode(Path(text).read_text())
    ref = perplexity_of_ids(model, ids, model.cfg.block_size)
    assert res["n_tokens"] == len(ids) - 1
    assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert 100 < res["perplexity"] < 2000  # random 512-token model: near-uniform
