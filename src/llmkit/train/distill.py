"""`llmkit distill`: knowledge distillation, a small student trained on a big teacher's soft targets.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(student, labels)
(Hinton et al. 2015; the T^2 keeps the soft-target gradients on the scale of the hard-label ones). The
teacher runs in eval mode without gradients; both models must share one tokenizer, because the soft targets
are distributions over the same ids (next tokens for language models, labels for classifiers).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.prepare import META, load_shards
from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import read_meta, save_checkpoint
from llmkit.models.config import PRESETS, preset
from llmkit.models.heads import load_task_model
from llmkit.models.load import load_model
from llmkit.tokenizer import Tokenizer
from llmkit.train.finetune.run import HeadSource, finetune
from llmkit.train.loop import TrainConfig, fit
from llmkit.train.pretrain import LMTask, _data_folder

Logits = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                 alpha: float) -> torch.Tensor:
    """alpha·T²·KL(p_teacher^T || p_student^T) + (1-alpha)·CE(student, labels), averaged over positions with labels.

    student, teacher: logits (..., V); labels (...) with -100 where there is no target (padding).
    """
    V = student.size(-1)
    s, t, y = student.reshape(-1, V).float(), teacher.reshape(-1, V).float(), labels.reshape(-1)
    keep = y != -100
    hard = F.cross_entropy(s, y, ignore_index=-100)
    if alpha == 0:
        return hard
    log_ps = F.log_softmax(s[keep] / temperature, -1)
    log_pt = F.log_softmax(t[keep] / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()  # KL(p_t || p_s) per position, then the mean
    return alpha * temperature**2 * kl + (1 - alpha) * hard


class DistillTask:
    """Wraps a task: same batches and evaluation, loss with the frozen teacher's soft targets added."""

    def __init__(self, inner: Any, teacher: nn.Module, logits: Logits, temperature: float, alpha: float):
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise LlmkitError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature} and {alpha}")
        self.inner, self.logits, self.temperature, self.alpha = inner, logits, temperature, alpha
        self.teacher = teacher.eval().requires_grad_(False)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student, labels = self.logits(model, batch)
        if self.alpha == 0:  # the no-teacher baseline: same data and steps, hard labels only
            return distill_loss(student, student, labels, self.temperature, 0.0)
        self.teacher.eval()
        with torch.no_grad():
            teacher, _ = self.logits(self.teacher, batch)
        return distill_loss(student, teacher, labels, self.temperature, self.alpha)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.inner.train_batch(step, micro)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.inner.evaluate(model)

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return self.inner.n_tokens(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # eval_seconds, steps_run, ... of the wrapped task
        if "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


def same_tokenizer(a: Tokenizer, b: Tokenizer, what: str) -> None:
    """Refuse a student/data whose vocabulary differs from the teacher's: the soft targets would not line up."""
    va, vb = a.tok.get_vocab(), b.tok.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise LlmkitError(f"the teacher and the {what} use different tokenizers ({len(va)} vs {len(vb)} tokens, "
                          f"{diff} entries differ); distillation needs one vocabulary: build the student from a "
                          "preset (it takes the teacher's tokenizer) or prepare the data with the teacher's")


def _student(student: str, tok: Tokenizer, overrides: dict[str, Any]) -> tuple[nn.Module, Tokenizer]:
    """A student checkpoint (same tokenizer required) or a fresh model from a preset with the teacher's vocabulary."""
    if Path(student).is_dir():
        model, _ = load_model(student)
        st = Tokenizer.load(student)
        same_tokenizer(tok, st, f"student {student}")
        return model.train(), st
    if student not in PRESETS:
        raise LlmkitError(f"student {student!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    return build_model(preset(student, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, **overrides)), tok


def _lm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch["x"]).logits, batch["y"]


def _distill_lm(teacher_dir: Path, student: str, data: str, out: Path, tcfg: TrainConfig, overrides: dict[str, Any],
                temperature: float, alpha: float, eval_batches: int) -> dict[str, Any]:
    teacher, _ = load_model(teacher_dir, tcfg.device)
    tok = Tokenizer.load(teacher_dir)
    if teacher.cfg.arch not in ("decoder", "lstm"):
        raise LlmkitError(f"language-model distillation needs a decoder teacher; {teacher_dir} is {teacher.cfg.arch}")
    folder = _data_folder(data, out, str(teacher_dir), "bpe", tok.vocab_size, 0)
    if (Path(data) / META).exists():
        same_tokenizer(tok, Tokenizer.load(folder), f"prepared data {data}")
    train_ids, val_ids, _ = load_shards(folder)
    torch.manual_seed(tcfg.seed)
    model, _ = _student(student, tok, overrides)
    model = model.to(tcfg.device)
    block = min(model.cfg.block_size, teacher.cfg.block_size)
    inner = LMTask(train_ids, val_ids, block, tcfg.batch_size, tcfg.seed, "clm", tcfg.device, eval_batches)
    task = DistillTask(inner, teacher, _lm_logits, temperature, alpha)
    meta = {"task": "causal_lm", "data": str(folder), "train": vars(tcfg),
            "distill": {"teacher": str(teacher_dir), "temperature": temperature, "alpha": alpha}}
    print(f"distilling {teacher_dir} ({sum(p.numel() for p in teacher.parameters()):,} params) into a "
          f"{model.num_params():,}-parameter student, T={temperature}, alpha={alpha}")

    def save(kind: str, state: dict[str, Any]) -> None:
        if kind == "last":
            save_checkpoint(out, model, model.cfg, tok, meta, state)

    t0 = time.perf_counter()
    records = fit(model, task, tcfg, out, save)
    with torch.no_grad():
        teacher_eval = inner.evaluate(teacher)
    final = [r for r in records if "val_loss" in r][-1]
    return {"student_val_ppl": final["val_ppl"], "student_val_loss": final["val_loss"],
            "teacher_val_ppl": teacher_eval["val_ppl"], "fit_seconds": round(time.perf_counter() - t0, 1),
            "student_params": model.num_params(), "teacher_params": sum(p.numel() for p in teacher.parameters())}


def _distill_classify(teacher_dir: Path, meta: dict[str, Any], student: str, data: str, out: Path,
                      overrides: dict[str, Any], temperature: float, alpha: float, fkw: dict[str, Any]) -> dict[str, Any]:
    teacher, tok, _ = load_task_model(teacher_dir, fkw["device"])
    if meta.get("task") != "classify" or len(teacher.specs) != 1:
        raise LlmkitError(f"{teacher_dir} is a {meta.get('task')!r} model; classification distillation needs a "
                          "classifier teacher from `llmkit finetune classify`")
    (head, spec), = teacher.specs.items()

    def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b = {k.split(".", 1)[1]: v.to(fkw["device"]) for k, v in batch.items() if k.startswith("main.")}
        return model(head if model is teacher else "main", b["input_ids"], b["attention_mask"]), b["labels"]

    def wrap(ftask: Any) -> DistillTask:
        if ftask.heads[0].labels != spec["labels"]:
            raise LlmkitError(f"the data's labels {ftask.heads[0].labels} differ from the teacher's {spec['labels']}; "
                              "distil on the data the teacher was fine-tuned for")
        return DistillTask(ftask, teacher, logits, temperature, alpha)

    with tempfile.TemporaryDirectory() as tmp:
        init = student
        if not Path(student).is_dir():  # a fresh student from a preset: save it so finetune can start from it
            model, _ = _student(student, tok, overrides)
            init = str(save_checkpoint(Path(tmp) / "student", model, model.cfg, tok))
        else:
            _student(student, tok, overrides)
        src = HeadSource("main", "classify", data, fkw.pop("val"), fkw.pop("test"), 1.0, fkw.pop("text_field"),
                         fkw.pop("label_field"), False, spec.get("pooling") or "auto", fkw.pop("limit"))
        res = finetune([src], init, str(out), task="classify", wrap_task=wrap, **fkw)
    r = res["main"]
    print(f"student {r['split']}: accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f} (n={r['n']}) -> {out}")
    return res


def distill(*, teacher: str, student: str, data: str, out: str, temperature: float = 2.0, alpha: float = 0.5,
            n_layer: int | None = None, n_head: int | None = None, d_model: int | None = None,
            block_size: int | None = None, max_steps: int = 500, batch_size: int = 16, lr: float = 1e-3,
            warmup_steps: int = 50, weight_decay: float = 0.1, eval_every: int = 100, eval_batches: int = 20,
            max_len: int = 128, epochs: float = 3.0, val: str | None = None, test: str | None = None,
            text_field: str = "text", label_field: str = "label", limit: int = 0, seed: int = 1337,
            device: str = "cpu") -> dict[str, Any]:
    """Train a student on a teacher's soft targets plus the hard labels; writes the student checkpoint to OUT.

    A decoder teacher distils next-token distributions on a corpus (held-out perplexity reported for
    student and teacher); a classifier teacher (`llmkit finetune classify`) distils label distributions
    (test accuracy reported). `--alpha 0` trains the same student on the same batches without the
    teacher: the baseline to compare with.

    Args:
        teacher: checkpoint folder of the teacher (a decoder, or a fine-tuned classifier).
        student: a preset name (built with the teacher's tokenizer) or a checkpoint with the same tokenizer.
        data: decoder: a corpus (bible, a text file, a folder) or a folder prepared with the teacher's
            tokenizer; classifier: a named dataset (rotten_tomatoes, ...) or a CSV/JSONL file.
        out: folder for the student checkpoint and its metrics.
        temperature: softmax temperature T for both distributions (higher = softer targets).
        alpha: weight of the soft-target term; 1 - alpha weighs the hard-label cross-entropy.
        n_layer: override the student preset's depth.
        n_head: override the student preset's attention heads.
        d_model: override the student preset's width.
        block_size: override the student preset's context length (decoders use min(student, teacher)).
        max_steps: optimizer steps (classifiers: 0 = derive from epochs).
        batch_size: sequences per batch.
        lr: peak learning rate (AdamW, warmup then cosine decay).
        warmup_steps: linear warmup steps (decoders).
        weight_decay: AdamW weight decay on weight matrices.
        eval_every: validate every N steps (decoders).
        eval_batches: validation batches (decoders).
        max_len: longest input in tokens (classifiers).
        epochs: passes over the training data when max_steps is 0 (classifiers).
        val: validation file (classifiers); default: cut from data as the teacher's fine-tune did.
        test: test file (classifiers); default: cut from data.
        text_field: text column (classifiers).
        label_field: label column (classifiers).
        limit: train on only the first N examples (classifiers); 0 = all.
        seed: seeds the student's initialisation, the batches and (classifiers) the data split.
        device: cpu or cuda.

    Examples:
        llmkit pretrain --data bible --out runs/teacher --preset_name gpt2-tiny --max_steps 2000
        llmkit distill --teacher runs/teacher --student gpt2-tiny --n_layer 2 --d_model 64 --data bible --out runs/student
        llmkit distill --teacher runs/teacher --student gpt2-tiny --n_layer 2 --d_model 64 --data bible --out runs/plain --alpha 0
        llmkit distill --teacher runs/rt-cls --student bert-tiny --data rotten_tomatoes --out runs/rt-student --max_steps 300
    """
    teacher_dir, out_dir = Path(teacher), Path(out)
    meta = read_meta(teacher_dir)
    overrides = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, d_model=d_model, block_size=block_size).items()
                 if v is not None}
    if "heads" in meta:
        fkw = dict(max_len=max_len, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, seed=seed, device=device, val=val, test=test,
                   text_field=text_field, label_field=label_field, limit=limit)
        return _distill_classify(teacher_dir, meta, student, data, out_dir, overrides, temperature, alpha, fkw)
    tcfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, eval_every=eval_every, eval_batches=eval_batches, seed=seed,
                       device=device)
    res = _distill_lm(teacher_dir, student, data, out_dir, tcfg, overrides, temperature, alpha, eval_batches)
    print(f"student val ppl {res['student_val_ppl']:.2f} (teacher {res['teacher_val_ppl']:.2f}) -> {out}")
    return res
