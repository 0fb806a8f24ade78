"""Encoder-decoder decoding: greedy and beam search with one shared KV cache, and translating texts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.data.batching import pad
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer


def _bos_eos(tok: Tokenizer) -> tuple[int, int]:
    eos = tok.eos_id
    if eos is None:
        raise LlmkitError("the tokenizer has no eos token; seq2seq needs one to end a translation")
    return (tok.bos_id if tok.bos_id is not None else eos), eos


def _encode_sources(model: nn.Module, tok: Tokenizer, sources: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tok.encode(s)[: model.cfg.block_size] or [tok.pad_id] for s in sources]
    src, mask = pad(ids, tok.pad_id)
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

