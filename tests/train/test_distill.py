"""Knowledge distillation: the loss equals the formula on known logits, the teacher stays frozen in eval
mode, a tokenizer mismatch is refused, and both modes (decoder, classifier) run end to end on tiny data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import preset
from llmkit.models.heads import TaskModel, save_task_model
from llmkit.models.load import load_model
from llmkit.tokenizer import train_from_iterator
from llmkit.train.distill import DistillTask, distill, distill_loss


def _softmax(xs, T):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_equals_the_formula_on_known_logits():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1, 2, -100])  # the third row carries no target: ignored by both terms
    T, alpha = 2.0, 0.7
    kl, ce = [], []
    for i in range(2):  # by hand: KL(p_t || p_s) at temperature T, CE at temperature 1
        ps, pt = _softmax(s[i].tolist(), T), _softmax(t[i].tolist(), T)
        kl.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
        ce.append(-math.log(_softmax(s[i].tolist(), 1.0)[int(y[i])]))
    want = alpha * T * T * sum(kl) / 2 + (1 - alpha) * sum(ce) / 2
    assert abs(float(distill_loss(s, t, y, T, alpha)) - want) < 1e-6
    assert abs(float(distill_loss(s, t, y, T, 0.0)) - sum(ce) / 2) < 1e-6
    assert float(distill_loss(s, s, y, T, 1.0)) == pytest.approx(0.0, abs=1e-7)


class _Drop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 3), nn.Dropout(0.5)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_teacher_runs_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    teacher, student = _Drop().train(), _Drop()
    seen = []

    def logits(model, batch):
        out = model(batch["x"])
        if model is teacher:
            seen.append((model.training, out.requires_grad, out.detach().clone()))
        return out, batch["y"]

    task = DistillTask(None, teacher, logits, 2.0, 0.5)
    batch = {"x": torch.ones(5, 4), "y": torch.tensor([0, 1, 2, 0, 1])}
    for _ in range(2):
        teacher.train()  # even if something flips it back, the loss runs the teacher in eval mode
        task.loss(student, batch).backward()
    assert [s[:2] for s in seen] == [(False, False), (False, False)]
    torch.testing.assert_close(seen[0][2], seen[1][2])  # no dropout noise: eval mode
    assert all(p.grad is None for p in teacher.parameters()) and student.lin.weight.grad is not None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bible_sample):
    p = tmp_path_factory.mktemp("distill") / "corpus.txt"
    p.write_text("\n".join(bible_sample[:600]) + "\n", encoding="utf-8")
    return p


def test_decoder_distillation_runs_and_refuses_another_tokenizer(tiny_ckpt, corpus, tmp_path, bible_sample):
    before = {k: v.clone() for k, v in load_model(tiny_ckpt)[0].state_dict().items()}
    res = distill(teacher=str(tiny_ckpt), student="gpt2-tiny", n_layer=1, d_model=32, n_head=2, block_size=32,
                  data=str(corpus), out=str(tmp_path / "student"), max_steps=3, batch_size=4, warmup_steps=1,
                  eval_every=3, eval_batches=1)
    assert res["student_params"] < res["teacher_params"] and res["student_val_ppl"] > 1
    student, meta = load_model(tmp_path / "student")
    assert student.cfg.n_layer == 1 and meta["distill"]["alpha"] == 0.5
    after = load_model(tiny_ckpt)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher's files were not touched
    other = train_from_iterator(bible_sample[:500], "bpe", vocab_size=400, show_progress=False)
    cfg = preset("gpt2-tiny", vocab_size=other.vocab_size, n_layer=1, d_model=32, n_head=2)
    save_checkpoint(tmp_path / "other", build_model(cfg), cfg, other)
    with pytest.raises(LlmkitError, match="different tokenizers"):
        distill(teacher=str(tiny_ckpt), student=str(tmp_path / "other"), data=str(corpus), out=str(tmp_path / "x"),
                max_steps=1)


def test_classifier_distillation_runs(tmp_path):
    rows = [(f"good fine great {i}", "pos") if i % 2 else (f"bad awful poor {i}", "neg") for i in range(80)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    tok = train_from_iterator([t for t, _ in rows], "wordpiece", vocab_size=130, show_progress=False)
    torch.manual_seed(0)
    cfg = preset("bert-tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, block_size=32)
    teacher = TaskModel(build_model(cfg), {"main": {"kind": "classify", "labels": ["neg", "pos"], "pooling": "cls"}})
    save_task_model(tmp_path / "teacher", teacher, tok, "classify")
    res = distill(teacher=str(tmp_path / "teacher"), student="bert-tiny", n_layer=1, d_model=16, n_head=2,
                  data=str(tmp_path / "d.csv"), out=str(tmp_path / "student"), max_steps=4, batch_size=8, max_len=16)
    assert res["main"]["n"] == 8 and 0 <= res["main"]["accuracy"] <= 1
    model, meta = load_model(tmp_path / "student")
    assert isinstance(model, TaskModel) and model.cfg.d_model == 16 and meta["labels"] == ["neg", "pos"]
