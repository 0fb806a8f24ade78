"""BERT MLM + next-sentence prediction: pairs balanced and correct, segment layout, parity of both heads and
the summed loss with transformers' BertForPreTraining (fp32, <= 1e-4), to-hf/from-hf, and a tiny run."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from llmkit.interop.commands import from_hf, to_hf
from llmkit.models.build import build_model
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import preset
from llmkit.models.heads import TaskModel, nsp_model
from llmkit.models.load import load_model
from llmkit.tokenizer import train_from_iterator
from llmkit.train.nsp import IS_NEXT, RANDOM, NSPTask, pretraining_loss, sample_pair
from llmkit.train.pretrain import pretrain

ATOL = 1e-4  # fp32 logits and loss, llmkit vs transformers on the same weights and inputs
WORDS = "zero one two three four five six seven eight nine".split()


def _docs(n_docs: int = 12, n_sent: int = 6) -> list[list[str]]:
    """Sentences that say which document and position they are: 'doc three line five .'"""
    return [[f"doc {WORDS[d % 10]} {WORDS[d // 10]} line {WORDS[i]} ." for i in range(n_sent)] for d in range(n_docs)]


def test_pairs_are_balanced_and_correct():
    gen = torch.Generator().manual_seed(0)
    lengths = [[3 + (i * 7 + d) % 5 for i in range(6 + d % 3)] for d in range(10)]
    docs = list(range(10))
    pairs = [sample_pair(lengths, docs, gen, 20) for _ in range(4000)]
    share = sum(p.label == IS_NEXT for p in pairs) / len(pairs)
    assert 0.47 <= share <= 0.53  # 4,000 fair coin flips: 3 sigma is 0.024
    for p in pairs:
        assert 0 <= p.a0 < p.a1 < len(lengths[p.doc_a]) and p.b0 < p.b1 <= len(lengths[p.doc_b])
        assert sum(lengths[p.doc_a][p.a0:p.a1]) <= 10 or p.a1 == p.a0 + 1  # A: at most half the budget
        if p.label == IS_NEXT:  # B is exactly the text after A in the same document
            assert p.doc_b == p.doc_a and p.b0 == p.a1
        else:
            assert p.label == RANDOM and p.doc_b != p.doc_a
    assert len({p.doc_b for p in pairs if p.label == RANDOM}) == 10


def test_batches_have_bert_pair_layout():
    docs = _docs()
    tok = train_from_iterator([s for d in docs for s in d], "wordpiece", vocab_size=150, show_progress=False)
    task = NSPTask(docs, tok, max_len=24, batch_size=64, seed=0, eval_batches=1)
    assert task.val_docs == [0] and 0 not in task.train_docs  # held-out documents
    b = task.train_batch(0, 0)
    cls_id, sep_id, pad_id = tok.special_id("cls"), tok.special_id("sep"), tok.special_id("pad")
    n_masked = 0
    for i in range(64):
        n = int(b["attention_mask"][i].sum())
        ids, tt, lab = b["input_ids"][i, :n], b["token_type_ids"][i, :n], b["labels"][i]
        orig = torch.where(lab != -100, lab, b["input_ids"][i])[:n]
        seps = (orig == sep_id).nonzero().flatten().tolist()
        assert orig[0] == cls_id and len(seps) == 2 and seps[1] == n - 1 and n <= 24
        assert tt[: seps[0] + 1].eq(0).all() and tt[seps[0] + 1:].eq(1).all()
        assert (lab[:n][[0, *seps]] == -100).all() and (lab[n:] == -100).all() and (ids.ne(pad_id)).all()
        a, bb = tok.decode(orig[1 : seps[0]].tolist()), tok.decode(orig[seps[0] + 1 : n - 1].tolist())
        doc_a, doc_b = a.split(" line")[0], bb.split(" line")[0]
        next_line = WORDS.index(re.findall(r"line (\w+)", a)[-1]) + 1 == WORDS.index(re.findall(r"line (\w+)", bb)[0])
        if b["next_sentence_label"][i] == IS_NEXT:
            assert doc_a == doc_b and next_line, (a, bb)
        else:
            assert doc_a != doc_b, (a, bb)
        n_masked += int((lab != -100).sum())
    n_real = int(b["attention_mask"].sum()) - 3 * 64
    assert 0.10 < n_masked / n_real < 0.20  # 15 % of the non-special tokens


def _tiny_nsp_checkpoint(tmp_path, tok):
    torch.manual_seed(0)
    cfg = preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, block_size=32)
    model = nsp_model(build_model(cfg))
    with torch.no_grad():  # non-trivial head biases, so a dropped bias would show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    save_checkpoint(tmp_path / "ours", model, cfg, tok, meta={"task": "mlm+nsp", "heads": model.specs})
    return model.eval()


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 17), generator=g)
    tt = torch.zeros_like(ids)
    tt[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    return ids, tt, mask, labels, torch.tensor([0, 1, 1])


def _compare(ours: TaskModel, ref, vocab: int) -> None:
    ids, tt, mask, labels, nsp_labels = _inputs(vocab)
    with torch.no_grad():
        mlm, nsp = ours.pretraining_logits(ids, tt, mask)
        loss = pretraining_loss(mlm, nsp, labels, nsp_labels)[0]
        out = ref(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels, next_sentence_label=nsp_labels)
    real = mask.bool()
    assert (mlm[real] - out.prediction_logits[real]).abs().max() <= ATOL
    assert (nsp - out.seq_relationship_logits).abs().max() <= ATOL
    assert abs(float(loss) - float(out.loss)) <= ATOL


def test_heads_and_loss_match_bert_for_pretraining(tmp_path):
    transformers = pytest.importorskip("transformers")
    docs = _docs()
    tok = train_from_iterator([s for d in docs for s in d], "wordpiece", vocab_size=150, show_progress=False)
    ours = _tiny_nsp_checkpoint(tmp_path, tok)
    to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    ref = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    _compare(ours, ref, tok.vocab_size)
    # and back: an HF BertForPreTraining (random weights) imports with its NSP head
    torch.manual_seed(2)
    hf_cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                                     architectures=["BertForPreTraining"])
    ref2 = transformers.BertForPreTraining(hf_cfg).eval()
    ref2.save_pretrained(tmp_path / "hf2")
    tok.save(tmp_path / "hf2")
    from_hf(str(tmp_path / "hf2"), str(tmp_path / "ours2"))
    ours2, meta = load_model(tmp_path / "ours2")
    assert isinstance(ours2, TaskModel) and meta["task"] == "mlm+nsp" and "extra_tensors" not in meta["model"]["extra"]["source"]
    _compare(ours2, ref2, tok.vocab_size)


def test_pretrain_mlm_nsp_runs_and_saves_the_head(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join("\n".join(d) for d in _docs(n_docs=30)) + "\n", encoding="utf-8")
    recs = pretrain(data=str(corpus), out=str(tmp_path / "run"), preset_name="bert-tiny", objective="mlm+nsp",
                    vocab_size=150, n_layer=1, d_model=32, n_head=2, block_size=32, max_steps=6, batch_size=8,
                    warmup_steps=1, eval_every=3, eval_batches=1, log_every=1)
    val = [r for r in recs if "nsp_accuracy" in r]
    assert len(val) == 2 and {"val_mlm_loss", "val_nsp_loss", "val_loss"} <= set(val[-1])
    assert abs(val[-1]["val_loss"] - val[-1]["val_mlm_loss"] - val[-1]["val_nsp_loss"]) < 1e-4
    model, meta = load_model(tmp_path / "run")
    assert isinstance(model, TaskModel) and list(model.specs) == ["nsp"] and meta["task"] == "mlm+nsp"
    with pytest.raises(Exception, match="raw corpus"):
        pretrain(data=str(tmp_path / "run_data"), out=str(tmp_path / "x"), preset_name="bert-tiny",
                 objective="mlm+nsp", max_steps=1)


@pytest.mark.slow  # ~10 s: 400 steps
def test_nsp_is_learned_where_it_is_easy(tmp_path):
    """Documents on 7 topics, each with its own 8 words: B from another document almost always changes the
    topic, so a working pipeline (labels, segments, pooler, loss) reaches high held-out NSP accuracy fast.
    The held-out documents (every 20th) span 5 topics, so validation can only be passed by comparing A and B."""
    rng = random.Random(0)
    topics = [[f"w{t}x{i}" for i in range(8)] for t in range(7)]
    docs = [[" ".join(rng.choice(topics[d % 7]) for _ in range(6)) + " ." for _ in range(12)] for d in range(100)]
    corpus = tmp_path / "topics.txt"
    corpus.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    recs = pretrain(data=str(corpus), out=str(tmp_path / "run"), preset_name="bert-tiny", objective="mlm+nsp",
                    vocab_size=200, n_layer=2, d_model=32, n_head=2, block_size=32, dropout=0.0, max_steps=800,
                    batch_size=32, lr=3e-3, warmup_steps=10, eval_every=800, eval_batches=4, log_every=100)
    val = [r for r in recs if "nsp_accuracy" in r][-1]
    assert val["nsp_accuracy"] >= 0.9 and val["val_nsp_loss"] < 0.4, val  # chance: 0.5 and ln 2 = 0.693
