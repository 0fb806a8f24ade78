"""BERT pretraining with next-sentence prediction: `llmkit pretrain --preset_name bert-tiny --objective mlm+nsp`.

Each example is `[CLS] A [SEP] B [SEP]` with segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`; B is the
text that follows A in its document half the time and text from another document otherwise (Devlin et al.
2019, section 3.1). The loss is the masked-LM loss plus the 2-way NSP cross-entropy, as in transformers'
`BertForPreTraining`; validation reports both parts and the NSP accuracy (0.5 is chance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.batching import pad_batch
from llmkit.data.corpus import sentence_documents
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import dist_info

IS_NEXT, RANDOM = 0, 1


@dataclass(frozen=True)
class Pair:
    """Sentence pair by position: A = docs[doc_a][a0:a1], B = docs[doc_b][b0:b1]; label 0 = B follows A."""

    doc_a: int
    a0: int
    a1: int
    doc_b: int
    b0: int
    b1: int
    label: int


def _fill(lengths: list[int], start: int, budget: int, stop: int) -> int:
    """End index of the run of sentences from `start` (at least one, before `stop`) that fits `budget` tokens."""
    end, total = start + 1, lengths[start]
    while end < stop and total + lengths[end] <= budget:
        total += lengths[end]
        end += 1
    return end


def sample_pair(doc_lengths: list[list[int]], docs: list[int], gen: torch.Generator, max_tokens: int) -> Pair:
    """Draw one NSP pair from the documents `docs` (indices into doc_lengths, each with >= 2 sentences).

    A takes consecutive sentences up to half the budget, leaving at least one sentence after it; B is the
    run that follows A (label 0) or a run from a different document (label 1), each with probability 1/2.
    """
    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    d = docs[pick(len(docs))]
    lens = doc_lengths[d]
    a0 = pick(len(lens) - 1)
    a1 = _fill(lens, a0, max_tokens // 2, len(lens) - 1)
    budget = max_tokens - sum(lens[a0:a1])
    if pick(2) == IS_NEXT or len(docs) < 2:
        return Pair(d, a0, a1, d, a1, _fill(lens, a1, budget, len(lens)), IS_NEXT)
    other = docs[pick(len(docs) - 1)]
    other = docs[-1] if other == d else other  # uniform over the documents other than d
    b0 = pick(len(doc_lengths[other]))
    return Pair(d, a0, a1, other, b0, _fill(doc_lengths[other], b0, budget, len(doc_lengths[other])), RANDOM)


def pair_ids(a: list[int], b: list[int], cls_id: int, sep_id: int, max_len: int) -> tuple[list[int], list[int]]:
    """`[CLS] A [SEP] B [SEP]` ids and segment ids, trimming the longer side's tail until it fits max_len."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_len - 3:
        (a if len(a) >= len(b) else b).pop()
    ids = [cls_id, *a, sep_id, *b, sep_id]
    return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)


def mlm_mask(x: torch.Tensor, gen: torch.Generator, mask_id: int, vocab_size: int, maskable: torch.Tensor,
             rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking on (B, T) ids: choose `rate` of the maskable positions; 80 % -> [MASK], 10 % random, 10 % kept.

    Returns (input ids, labels) with labels -100 wherever no prediction is asked.
    """
    choose = (torch.rand(x.shape, generator=gen) < rate) & maskable
    labels = torch.where(choose, x, torch.full_like(x, -100))
    action = torch.rand(x.shape, generator=gen)
    random_tokens = torch.randint(vocab_size, x.shape, generator=gen)
    x = torch.where(choose & (action < 0.8), torch.full_like(x, mask_id), x)
    x = torch.where(choose & (action >= 0.8) & (action < 0.9), random_tokens, x)
    return x, labels


def pretraining_loss(mlm_logits: torch.Tensor, nsp_logits: torch.Tensor, labels: torch.Tensor,
                     nsp_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MLM + NSP, MLM, NSP): cross-entropies as transformers' BertForPreTraining sums them."""
    mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
    nsp = F.cross_entropy(nsp_logits.float(), nsp_labels.reshape(-1))
    return mlm + nsp, mlm, nsp


class NSPTask:
    """Sentence pairs from a corpus' documents for `train.loop.fit`: MLM + NSP loss, exact resume.

    Documents are split once: every 20th (at least one) is held out, so validation pairs never share a
    document with training pairs.
    """

    def __init__(self, docs: list[list[str]], tok: Tokenizer, max_len: int, batch_size: int, seed: int,
                 device: str = "cpu", eval_batches: int = 20):
        ids = {r: tok.special_id(r) for r in ("cls", "sep", "mask", "pad")}
        if None in ids.values():
            raise LlmkitError("next-sentence prediction needs a tokenizer with [CLS], [SEP], [MASK] and [PAD]; "
                              "train one with --kind wordpiece")
        if dist_info()[1] > 1:
            raise LlmkitError("--objective mlm+nsp runs in one process; launch it without torchrun")
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = ids["cls"], ids["sep"], ids["mask"], ids["pad"]
        self.vocab_size = tok.vocab_size
        self.tokens = [tok.encode_batch(d) for d in docs]
        self.lengths = [[len(s) for s in d] for d in self.tokens]
        usable = [i for i, d in enumerate(self.tokens) if len(d) >= 2]
        val = usable[::20]
        held_out = set(val)
        train = [i for i in usable if i not in held_out]
        if len(train) < 2 or not val:
            raise LlmkitError(f"next-sentence prediction needs at least 3 documents of 2+ sentences, found "
                              f"{len(usable)}; separate documents with blank lines (or one file each)")
        self.train_docs, self.val_docs = train, val
        self.max_len, self.batch, self.seed, self.device = max_len, batch_size, seed, device
        self.eval_batches = eval_batches
        self.gen = torch.Generator().manual_seed(seed)

    def pairs(self, docs: list[int], gen: torch.Generator, n: int) -> list[Pair]:
        return [sample_pair(self.lengths, docs, gen, self.max_len - 3) for _ in range(n)]

    def encode(self, pairs: list[Pair], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Pairs -> padded ids, segment ids, attention mask, MLM labels and NSP labels (all (B, T) or (B,))."""
        rows, types = [], []
        for p in pairs:
            a = [t for s in self.tokens[p.doc_a][p.a0 : p.a1] for t in s]
            b = [t for s in self.tokens[p.doc_b][p.b0 : p.b1] for t in s]
            ids, tt = pair_ids(a, b, self.cls_id, self.sep_id, self.max_len)
            rows.append(ids)
            types.append(tt)
        padded = pad_batch(rows, self.pad_id)
        x, mask = padded["input_ids"], padded["attention_mask"]
        tt = pad_batch(types, 0)["input_ids"]
        maskable = mask.bool() & (x != self.cls_id) & (x != self.sep_id)
        x, labels = mlm_mask(x, gen, self.mask_id, self.vocab_size, maskable)
        return {"input_ids": x, "token_type_ids": tt, "attention_mask": mask, "labels": labels,
                "next_sentence_label": torch.tensor([p.label for p in pairs])}

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        b = self.encode(self.pairs(self.train_docs, self.gen, self.batch), self.gen)
        return {k: v.to(self.device) for k, v in b.items()}

    def _outputs(self, model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        mlm_logits, nsp_logits = model.pretraining_logits(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        return (*pretraining_loss(mlm_logits, nsp_logits, b["labels"], b["next_sentence_label"]), nsp_logits)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._outputs(model, batch)[0]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed + 1)  # the same held-out pairs and masks every time
        sums = {"val_loss": 0.0, "val_mlm_loss": 0.0, "val_nsp_loss": 0.0}
        correct = n = 0
        for _ in range(self.eval_batches):
            b = {k: v.to(self.device) for k, v in self.encode(self.pairs(self.val_docs, gen, self.batch), gen).items()}
            total, mlm, nsp, logits = self._outputs(model, b)
            for k, v in zip(sums, (total, mlm, nsp)):
                sums[k] += float(v) / self.eval_batches
            correct += int((logits.argmax(-1) == b["next_sentence_label"]).sum())
            n += len(logits)
        return {**sums, "nsp_accuracy": correct / n}

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def nsp_task(data: str, tok: Tokenizer, max_len: int, batch_size: int, seed: int, device: str = "cpu",
             eval_batches: int = 20) -> NSPTask:
    """The NSP task over the documents of a raw corpus (bible, a text file, a folder of .txt files)."""
    return NSPTask(sentence_documents(data), tok, max_len, batch_size, seed, device, eval_batches)
