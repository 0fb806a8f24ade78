"""Continuous-batching inference engine: requests join and leave one running decode batch at token boundaries.

One background thread owns the model. It keeps a slot cache of `max_batch` rows (`KVCache` of
(max_batch, nkv, L, hd), L = 1.5 x the served context) whose rows all end at the shared write position `pos`:

    row i holds its n_i cached tokens at buffer positions [pos - n_i, pos); earlier positions are invalid.

Waiting prompts are prefilled together (left-padded into one batch with its own cache, as many as there
are free slots and as long as padding stays below the real tokens), in chunks between decode steps while
streams run: each chunk is sized, from the measured time of the previous one, to last about CHUNK_STEPS
decode steps, so a long prompt never stalls the running streams for much longer than that. Each prefilled row's K/V is then copied
right-aligned into its slot and it decodes with everyone else: one (B, 1) forward per step with per-row `position_ids` (each row's own
logical position) and an attention mask hiding other rows' stale positions and free slots. When `pos`
reaches L the buffer is shifted left (compaction); a prompt longer than `pos` shifts it right.
Finished, stopped and cancelled requests free their slot at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmkit.data.batching import left_pad
from llmkit.errors import LlmkitError
from llmkit.inference.constrained import Constraint
from llmkit.inference.detokenize import TextStream
from llmkit.inference.sampling import SamplingParams, argmax_rows, sample_rows
from llmkit.models.kv_cache import KVCache
from llmkit.models.native_step import MAX_ROWS, native_step
from llmkit.tokenizer import Tokenizer

log = logging.getLogger("llmkit.serve")


@dataclass
class TokenEvent:
    """Text produced for one request since the last event; `finish_reason` is set on the last one."""

    index: int  # choice index within the HTTP request
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]]  # per token: {"token_id", "logprob", "top": [(token_id, logprob), ...]}
    finish_reason: str | None = None
    n_generated: int = 0  # tokens sampled so far (for usage)
    error: str | None = None
    internal: bool = False  # the error is a bug (HTTP 500), not a bad request (400)
    exc: BaseException | None = None  # a bug's exception, traceback included, for the log under the request id


@dataclass
class _Prefill:
    """Requests being prefilled together: left-padded ids (rows, T), their own cache, tokens done so far."""

    reqs: list[GenRequest]
    slots: list[int]
    idx: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    cache: KVCache
    done: int = 0


@dataclass
class GenRequest:
    """One sequence to generate. `sink` receives `TokenEvent`s from the engine thread."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent], None]
    index: int = 0
    logprobs: int | None = None  # number of top alternatives to report per token (None = no logprobs)
    stop_ids: set[int] = field(default_factory=set)  # single special tokens that end the turn
    constraint: Constraint | None = None  # structured output: the grammar the tokens must follow
    # runtime state, owned by the engine thread
    out_ids: list[int] = field(default_factory=list)
    n_cached: int = 0
    slot: int = -1
    next_token: int = -1
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    n_sampled: int = 0  # tokens sampled, including a final end-of-turn token (usage counts these)
    generator: torch.Generator | None = None
    budget: int = 0
    stream: TextStream | None = None
    counts: torch.Tensor | None = None  # (V,) generated-token counts, for presence/frequency penalties
    seen: torch.Tensor | None = None  # (V,) bool: prompt and output tokens, for the repetition penalty


# a prefill chunk lasts about this many decode steps: running streams' gaps stay near 1 + this times the usual
CHUNK_STEPS = 1.0


class Engine:
    """Runs decoder generation for many concurrent requests in one batched decode loop (see module doc)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 8,
                 on_step: Callable[[int, float], None] | None = None, max_context: int | None = None,
                 prefill_chunk: int | None = None):
        cfg = model.cfg
        if cfg.arch != "decoder":
            raise LlmkitError(f"the server generates with decoder models; this checkpoint is arch={cfg.arch!r}")
        if max_batch < 1:
            raise LlmkitError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tok, self.max_batch = model.eval(), tokenizer, max_batch
        # the served context: the model's, or less to bound the slot cache (8192-token models need GBs)
        self.block_size = min(cfg.block_size, max_context or cfg.block_size)
        self.device = next(model.parameters()).device
        slack = max(16, self.block_size // 2)  # positions the shared window can advance between compactions
        self.cache: KVCache = model.new_cache(max_batch, self.block_size + slack, bounded=False)  # rows shift in place
        self._native = native_step(model, 1)  # the one-call decode step where it applies (models/native_step.py)
        self.slots: list[GenRequest | None] = [None] * max_batch
        self.pending: queue.SimpleQueue[GenRequest | Callable[[], None]] = queue.SimpleQueue()
        self.on_step = on_step  # metrics hook: (tokens produced this step, seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting: list[GenRequest] = []
        self.error: BaseException | None = None
        self.stats = {"steps": 0, "prefills": 0, "compactions": 0, "shifts": 0, "aborted": 0,
                      "prefill_batches": 0, "prefill_chunks": 0}  # for tests and /metrics
        self.prefill_chunk = prefill_chunk  # tokens per row per chunk; None = sized by time (see _chunk_len)
        self._job: _Prefill | None = None
        self._step_s = 0.0  # moving average of a decode step's seconds
        self._chunk_tokens = 0  # the adaptive chunk size (all rows together), 0 until the first chunk

    # -- public API (any thread) --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still running and stop the loop."""
        self._stop.set()
        self.pending.put(lambda: None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: GenRequest) -> None:
        """Queue a request; the engine admits it at the next token boundary with a free slot."""
        if not self.alive:
            raise LlmkitError("the engine is not running")
        self.pending.put(req)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between decode steps (e.g. embeddings) and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller's thread
                box["error"] = e
            finally:
                done.set()

        self.pending.put(job)
        while not done.wait(0.5):
            if not self.alive:
                raise LlmkitError("the engine stopped")
        if "error" in box:
            raise box["error"]
        return box["value"]

    @staticmethod
    def cancel(req: GenRequest) -> None:
        """Mark a request cancelled (client gone); its slot is freed at the next token boundary."""
        req.cancelled = True

    @property
    def n_running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting) + self.pending.qsize()

    # -- the loop (engine thread) -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    self._drain(block=self.n_running == 0 and not self._waiting and self._job is None)
                    self._admit()
                    if self.n_running:
                        try:
                            self._step()
                        except Exception as e:  # a bug must not take the server down: fail this batch only
                            self._fail_running(e)
        except BaseException as e:  # never die silently: fail every request and report
            self.error = e
            raise
        finally:
            for r in [s for s in self.slots if s is not None] + self._waiting + (self._job.reqs if self._job else []):
                self._finish(r, "abort")
            while not self.pending.empty():
                item = self.pending.get()
                if isinstance(item, GenRequest):
                    self._finish(item, "abort")
                else:
                    item()

    def _drain(self, block: bool) -> None:
        """Move queued requests to the waiting list; run queued jobs."""
        try:
            item = self.pending.get(timeout=0.2) if block else self.pending.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, GenRequest):
                self._waiting.append(item)
            else:
                item()
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Start prefilling waiting requests into free slots, and run the next chunk of the prefill under way."""
        if self._job is None:
            self._start_prefill()
        if self._job is None:
            return
        job = self._job
        try:
            self._prefill_chunk(job)
        except Exception as e:
            self._job = None
            internal = not isinstance(e, LlmkitError)
            if internal:
                log.error("prefill failed", exc_info=e)
            msg = f"internal error: {type(e).__name__}" if internal else str(e)  # details: the log only
            for req in job.reqs:
                self._release(req)
                req.sink(TokenEvent(req.index, "", [], [], "error", error=msg, internal=internal,
                                    exc=e if internal else None))

    def _start_prefill(self) -> None:
        """Take waiting requests for the free slots (lowest first) into one left-padded prefill batch."""
        free = [i for i, r in enumerate(self.slots) if r is None]
        reqs: list[GenRequest] = []
        while self._waiting and len(reqs) < len(free):
            req = self._waiting[0]
            n = len(req.prompt_ids)
            longest = max([n] + [len(r.prompt_ids) for r in reqs])
            if reqs and longest * (len(reqs) + 1) > 2 * (n + sum(len(r.prompt_ids) for r in reqs)):
                break  # the padding would exceed the real tokens: this one starts the next batch
            self._waiting.pop(0)
            if req.cancelled:
                self._finish(req, "abort")
                continue
            req.budget = min(req.params.max_new_tokens, self.block_size - n)
            if req.params.temperature > 0:
                req.generator = torch.Generator(device="cpu")
                if req.params.seed is not None:
                    req.generator.manual_seed(req.params.seed % 2**63)
                else:
                    req.generator.seed()
            if req.budget <= 0:
                self._finish(req, "length")
                continue
            reqs.append(req)
        if not reqs:
            return
        idx, mask = left_pad([r.prompt_ids for r in reqs], 0)
        idx, mask = idx.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_cache(len(reqs), idx.size(1), bounded=False)
        self._job = _Prefill(reqs, free[: len(reqs)], idx, mask, pos, cache)
        self.stats["prefills"] += len(reqs)
        self.stats["prefill_batches"] += 1

    def _chunk_len(self, rows: int) -> int:
        """Prefill tokens per row for the next chunk: fixed, or sized so that a chunk takes about CHUNK_STEPS
        decode steps (a running stream's gap is then about 1 + CHUNK_STEPS times its usual gap)."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        n = max(1, (self._chunk_tokens or 32) // rows)
        # with the native step, chunks stay decode-sized: a dequantizing GEMM has a fixed cost of several steps
        piece = self._native.piece if self._native is not None else 0
        return min(n, piece // rows) if rows <= piece else n

    def _adapt_chunk(self, tokens: int, seconds: float) -> None:
        """Scale the chunk toward CHUNK_STEPS decode steps of time. A chunk's cost is not proportional to its
        size (each call has a fixed overhead), so a rate measured on small chunks would keep them small:
        the size follows the time ratio instead, at most 2x per chunk either way."""
        if not self._step_s:
            return
        ratio = min(2.0, max(0.5, CHUNK_STEPS * self._step_s / max(seconds, 1e-6)))
        self._chunk_tokens = max(8, int(tokens * ratio))

    def _prefill_chunk(self, job: _Prefill) -> None:
        """Run the next chunk of `job` (all of it when nothing decodes); place its rows when it is done."""
        T = job.idx.size(1)
        end = T if self.n_running == 0 else min(T, job.done + self._chunk_len(len(job.reqs)))
        t0 = time.perf_counter()
        rows, nat = len(job.reqs), self._native
        step = nat.piece // rows if nat is not None else 0
        native = step > 0 and (
            end - job.done <= step if self.n_running else rows * (end - job.done) <= nat.engine_prefill_tokens)
        if native:  # in pieces of <= nat.piece tokens, each written at the cache position it fills
            logits = nat.prefill(job.idx, job.pos, job.mask, job.cache, job.done, end, logits=end == T)
        else:
            sl = slice(job.done, end)
            logits = self.model(job.idx[:, sl], attention_mask=job.mask[:, sl], position_ids=job.pos[:, sl],
                                cache=job.cache, last_only=True).logits[:, -1]  # (rows, V)
        if self.n_running and end < T:  # a full chunk beside running streams (the last one is a remainder)
            self._adapt_chunk((end - job.done) * len(job.reqs), time.perf_counter() - t0)
        self.stats["prefill_chunks"] += 1
        job.done = end
        if end < T:
            return
        self._job = None
        c = self.cache
        if not any(r is not None for r in self.slots):
            c.valid.zero_()
            c.pos = T
        elif c.pos < T:  # the new prompts are longer than the shared window: shift everyone right
            self._realign(T)
        for row, (req, slot) in enumerate(zip(job.reqs, job.slots)):
            n = len(req.prompt_ids)
            for layer in range(len(c.k)):
                c.k[layer][slot, :, c.pos - n: c.pos] = job.cache.k[layer][row, :, T - n:]
                c.v[layer][slot, :, c.pos - n: c.pos] = job.cache.v[layer][row, :, T - n:]
            c.valid[slot] = False
            c.valid[slot, c.pos - n: c.pos] = True
            req.slot, req.n_cached = slot, n
            self.slots[slot] = req
        live = [row for row, req in enumerate(job.reqs) if not req.cancelled]
        for req in job.reqs:
            if req.cancelled:
                self._finish(req, "abort")
        toks = self._choose([job.reqs[row] for row in live], logits[live])
        for row, tok in zip(live, toks):
            self._accept(job.reqs[row], logits[row], tok)

    def _fail_running(self, e: Exception) -> None:
        log.error("decode step failed; failing the running batch", exc_info=e)
        for r in self.slots:
            if r is not None:
                self._release(r)
                r.sink(TokenEvent(r.index, "", [], [], "error", error=f"internal error: {type(e).__name__}",
                                  internal=True, exc=e))
        self.cache.valid.zero_()
        self.cache.pos = 0

    def _realign(self, new_end: int) -> None:
        """Shift every row so the shared end moves from `pos` to `new_end` (all rows fit: n_i <= new_end)."""
        c = self.cache
        self.stats["compactions" if new_end < c.pos else "shifts"] += 1
        m = max((r.n_cached for r in self.slots if r is not None), default=0)
        if m:
            for buf in (c.k, c.v):
                for layer in range(len(buf)):
                    buf[layer][:, :, new_end - m: new_end] = buf[layer][:, :, c.pos - m: c.pos].clone()
            window = c.valid[:, c.pos - m: c.pos].clone()
            c.valid.zero_()
            c.valid[:, new_end - m: new_end] = window
        else:
            c.valid.zero_()
        c.pos = new_end

    def _step(self) -> None:
        """One decode step for every active slot."""
        t0 = time.perf_counter()
        for r in self.slots:
            if r is not None and r.cancelled:
                self._finish(r, "abort")
        hi = max((i + 1 for i, r in enumerate(self.slots) if r is not None), default=0)
        if hi == 0:
            return
        c = self.cache
        if c.pos >= c.max_len:  # compaction: drop the stale left part of the buffer
            self._realign(max(r.n_cached for r in self.slots if r is not None))
        rows = self.slots[:hi]
        active = [i for i, r in enumerate(rows) if r is not None]
        live = [rows[i] for i in active]  # the requests stepped, in the order of the logits kept below
        if self._native is not None and len(active) <= MAX_ROWS:  # writes at c.pos, attends only to valid keys
            # only the occupied slots are computed (a freed slot in the middle costs nothing), and each scans
            # only its own span of the shared buffer: [c.pos - n_cached, c.pos]
            tokens = torch.tensor([[r.next_token] for r in live])
            pos = torch.tensor([[r.n_cached] for r in live])
            start = torch.tensor([c.pos - r.n_cached for r in live])
            logits = self._native.run(tokens, pos, c.k, c.v, c.valid, c.pos, start=start, rows=torch.tensor(active))
            c.pos += 1
        else:
            tokens = torch.tensor([[r.next_token if r else 0] for r in rows], device=self.device)  # (hi, 1)
            pos = torch.tensor([[r.n_cached if r else 0] for r in rows], device=self.device)  # (hi, 1)
            mask = torch.tensor([[1 if r else 0] for r in rows], device=self.device)  # (hi, 1)
            # a view of rows [0, hi) and buffer positions [lo, L): everything left of lo is stale for every row,
            # so attention only spans the longest active sequence (+1), not the whole buffer
            lo = c.pos - max(r.n_cached for r in rows if r is not None)
            view = KVCache.__new__(KVCache)
            view.k, view.v = [k[:hi, :, lo:] for k in c.k], [v[:hi, :, lo:] for v in c.v]
            view.valid, view.pos, view.max_len = c.valid[:hi, lo:], c.pos - lo, c.max_len - lo
            view.memory, view.memory_mask, view.cross_kv = None, None, {}
            logits = self.model(tokens, attention_mask=mask, position_ids=pos, cache=view, last_only=True).logits
            logits = logits[active]  # the occupied slots' rows
            c.pos = view.pos + lo
        self.stats["steps"] += 1
        dt = time.perf_counter() - t0
        self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt
        logits = logits[:, -1]  # (len(live), V)
        toks = self._choose(live, logits)
        for r, row, tok in zip(live, logits, toks):
            r.n_cached += 1
            self._accept(r, row, tok)
        produced = len(live)
        if self.on_step is not None:
            self.on_step(produced, time.perf_counter() - t0)

    @staticmethod
    def _choose(reqs: list[GenRequest], logits: torch.Tensor) -> list[int]:
        """The next token of each request from its logits row (R, V): one batched argmax for plain greedy rows,
        one vectorized `sample_rows` pass for the rest (each with its own settings, constraint and seed)."""
        toks = argmax_rows(logits).tolist()
        idx = [i for i, r in enumerate(reqs) if not (r.params.plain_greedy and r.constraint is None)]
        if not idx:
            return toks
        sub = [reqs[i] for i in idx]
        V = logits.size(-1)
        seen = counts = allowed = None
        if any(r.params.repetition_penalty != 1.0 for r in sub):
            for r in sub:  # built once per request, then one entry per token in _accept (not O(length) a step)
                if r.seen is None:
                    r.seen = torch.zeros(V, dtype=torch.bool)
                    r.seen[r.prompt_ids + r.out_ids] = True
            seen = torch.stack([r.seen for r in sub])  # rows with penalty 1 are unchanged by it
        for r in sub:
            if r.params.needs_counts and r.counts is None:
                r.counts = torch.zeros(V)
        if any(r.counts is not None for r in sub):
            counts = torch.stack([r.counts if r.counts is not None else torch.zeros(V) for r in sub])
        if any(r.constraint is not None for r in sub):
            allowed = torch.stack([r.constraint.allowed() if r.constraint is not None
                                   else torch.ones(V, dtype=torch.bool) for r in sub])
        new = sample_rows(logits[idx].cpu(), [r.params for r in sub], [r.generator for r in sub], seen, counts,
                          allowed).tolist()
        for i, t in zip(idx, new):
            toks[i] = t
        return toks

    def _accept(self, req: GenRequest, logits: torch.Tensor, tok: int) -> None:
        """Take `tok` (chosen by `_choose`) as the next token of `req`, emit its text, finish it if done."""
        req.n_sampled += 1
        if req.t_first is None:
            req.t_first = time.perf_counter()
        eos = self.tok.eos_id
        if ((eos is not None and tok == eos) or tok in req.stop_ids) and not req.params.ignore_eos:
            self._finish(req, "stop")  # the end-of-turn token itself is not part of the output
            return
        lp: list[dict[str, Any]] = []
        if req.logprobs is not None:
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, req.logprobs) if req.logprobs > 0 else None
            lp.append({"token_id": tok, "logprob": float(logp[tok]),
                       "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))})
        req.out_ids.append(tok)
        req.next_token = tok
        if req.counts is not None:
            req.counts[tok] += 1
        if req.seen is not None:
            req.seen[tok] = True
        if req.constraint is not None:
            req.constraint.advance(tok)
        delta = req.stream.push(tok)
        hit = req.stream.stopped or (req.constraint is not None and req.constraint.finished)
        reason = "stop" if hit else "length" if len(req.out_ids) >= req.budget else None
        if reason is not None:
            self._release(req)
            delta += req.stream.finish()
        req.sink(TokenEvent(req.index, delta, [tok], lp, reason, req.n_sampled))

    def _release(self, req: GenRequest) -> None:
        if 0 <= req.slot < self.max_batch and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            self.cache.valid[req.slot] = False
        req.slot = -1

    def _finish(self, req: GenRequest, reason: str) -> None:
        """Free the request's slot and send its last event with any held-back text."""
        self._release(req)
        text = ""
        if reason == "abort":
            self.stats["aborted"] += 1
        elif req.stream is not None:
            text = req.stream.finish()
        req.sink(TokenEvent(req.index, text, [], [], reason, req.n_sampled))


def new_request(engine: Engine, prompt_ids: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None],
                index: int = 0, logprobs: int | None = None, stop_ids: set[int] | None = None,
                constraint: Constraint | None = None) -> GenRequest:
    """A `GenRequest` with its text stream set up for the engine's tokenizer and the request's stop strings."""
    req = GenRequest(list(prompt_ids), params, sink, index, logprobs, set(stop_ids or ()), constraint)
    req.stream = TextStream(engine.tok, params.stop)
    return req


