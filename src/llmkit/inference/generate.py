"""Text generation: KV-cache prefill + one-token decode steps, greedy/temperature/top-k/top-p sampling,
repetition penalty, stop strings, streaming and batched prompts (left-padded).

The same primitives (`sample_next`, `left_pad`) are used by the server's continuous-batching engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmkit.data.batching import left_pad
from llmkit.errors import LlmkitError
from llmkit.inference.constrained import Constraint, check_schema, json_constraint, validate_json
from llmkit.inference.detokenize import TextStream
from llmkit.inference.sampling import SamplingParams, sample_next
from llmkit.inference.speculative import speculative_greedy
from llmkit.models.decode_step import StaticKVCache, bucket, check_compiler, step_fn
from llmkit.models.load import load
from llmkit.models.native_step import native_step
from llmkit.tokenizer import Tokenizer


def _context_len(model: nn.Module) -> int:
    return model.cfg.block_size


def check_prompt(n_prompt: int, max_new_tokens: int, block_size: int) -> int:
    """Validate a prompt length against the context; returns how many new tokens fit.

    A prompt that fills the whole context is an error; otherwise generation stops at the context end
    (finish_reason "length") rather than silently dropping the start of the prompt.
    """
    if n_prompt == 0:
        raise LlmkitError("the prompt is empty; give at least one token of text")
    if n_prompt >= block_size:
        raise LlmkitError(f"the prompt has {n_prompt} tokens but the model's context is {block_size}; "
                          "shorten the prompt")
    return min(max_new_tokens, block_size - n_prompt)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: list[list[int]], params: SamplingParams, eos_id: int | None = None,
                 pad_id: int = 0, use_cache: bool = True,
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 constraints: list[Constraint | None] | None = None,
                 compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, per decode step, the new token of every row (None once a row has finished).

    A row finishes at eos, at max_new_tokens, at the end of the context, when `should_stop(row, ids)`
    says so (used for stop strings), or when its constraint (structured output) is complete.
    compile: decode steps run the fixed-shape step under torch.compile (decoder Transformers; see
    models/decode_step.py).
    """
    model.eval()
    B = len(prompts)
    block = _context_len(model)
    budget = min(check_prompt(len(p), params.max_new_tokens, block) for p in prompts)
    if getattr(model.cfg, "arch", "") == "lstm" and len({len(p) for p in prompts}) > 1:
        # an LSTM state cannot skip padding tokens: run ragged prompts one by one, in lockstep
        streams = [generate_ids(model, [p], params, eos_id, pad_id, use_cache,
                                None if should_stop is None else (lambda _r, ids, i=i: should_stop(i, ids)),
                                None if constraints is None else [constraints[i]])
                   for i, p in enumerate(prompts)]
        done = [False] * B
        while not all(done):
            step: list[int | None] = []
            for i, s in enumerate(streams):
                tok = None if done[i] else next(s, None)
                if tok is None:
                    done[i] = True
                step.append(None if tok is None else tok[0])
            if not all(done):
                yield step
        return
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    idx, mask = left_pad(prompts, pad_id)
    idx, mask = idx.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) position of each token within its own prompt
    seen = None
    if params.repetition_penalty != 1.0:
        V = model.cfg.vocab_size
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, mask.bool())
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    # the one-call native step where it applies (Llama-shaped fp32/int8/int4 decoders, models/native_step.py),
    # else the Python step over the same static cache when compiling
    native = native_step(model, B) if use_cache and model.cfg.arch == "decoder" else None
    static = native is not None or (compile and use_cache and model.cfg.arch == "decoder")
    if static:
        step_call = native if native is not None else step_fn(model, compile=True)
        cache = StaticKVCache(model.cfg, B, bucket(idx.size(1) + budget), device, model.tok_emb.weight.dtype)
    else:
        cache = model.new_cache(B, idx.size(1) + budget) if use_cache else None
    inp, inp_mask, inp_pos = idx, mask, pos
    for i_step in range(budget):
        if static and i_step > 0:  # one token per row at a tensor position: the compiled graph is reused
            cache.write_pos.fill_(cache.pos)
            cache.static = True
            logits = step_call(inp, inp_pos, cache)[:, None]
            cache.static = False
            cache.pos += 1
        elif native is not None and B * idx.size(1) <= native.prefill_tokens:
            logits = native.prefill(idx, pos, mask, cache)[:, None]
        elif cache is not None:
            logits = model(inp, attention_mask=inp_mask, position_ids=inp_pos, cache=cache, last_only=True).logits
        else:
            logits = model(idx, attention_mask=mask, position_ids=pos, last_only=True).logits
        allowed = _allowed_rows(constraints, finished, model.cfg.vocab_size)
        nxt = sample_next(logits[:, -1].cpu() if device != torch.device("cpu") else logits[:, -1], params, gen,
                          None if seen is None else seen.cpu(), allowed=allowed).to(device)
        step_out: list[int | None] = []
        for i in range(B):
            if finished[i]:
                step_out.append(None)
                continue
            t = int(nxt[i])
            if eos_id is not None and t == eos_id:
                finished[i] = True
                step_out.append(None)
                continue
            out[i].append(t)
            step_out.append(t)
            c = constraints[i] if constraints else None
            if c is not None and (not c.advance(t) or c.finished):
                finished[i] = True
            if should_stop is not None and should_stop(i, out[i]):
                finished[i] = True
        yield step_out
        if all(finished):
            return
        if seen is not None:
            seen[torch.arange(B), nxt] = True
        nxt_pos = pos[:, -1:] + 1
        if cache is not None:
            inp, inp_mask, inp_pos = nxt[:, None], torch.ones(B, 1, dtype=torch.long, device=device), nxt_pos
        else:
            idx = torch.cat([idx, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=device)], 1)
        pos = torch.cat([pos, nxt_pos], 1) if cache is None else nxt_pos


def _allowed_rows(constraints: list[Constraint | None] | None, finished: list[bool], V: int
                  ) -> torch.Tensor | None:
    """(B, V) mask of the tokens each row's constraint allows (all for unconstrained or finished rows)."""
    if not constraints or all(c is None for c in constraints):
        return None
    return torch.stack([c.allowed() if c is not None and not done else torch.ones(V, dtype=torch.bool)
                        for c, done in zip(constraints, finished)])


@dataclass
class Completion:
    """One generated continuation: its text, token ids, and why it ended ("stop" or "length")."""

    text: str
    ids: list[int]
    finish_reason: str


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams,
                  use_cache: bool = True, on_text: Callable[[int, str], None] | None = None,
                  constraints: list[Constraint | None] | None = None, draft: str | nn.Module | None = None,
                  compile: bool = False) -> list[Completion]:
    """Generate a continuation per prompt; `on_text(row, delta)` streams text as it is produced;
    `constraints` (one per prompt, see inference/constrained.py) make outputs follow a grammar.

    draft: speculative greedy decoding (one prompt, temperature 0): "ngram" (prompt lookup) or a draft model.
    compile: decode steps under torch.compile (see `generate_ids`).
    """
    ids = [tokenizer.encode(p) for p in prompts]
    B = len(ids)
    budget = min(check_prompt(len(p), params.max_new_tokens, _context_len(model)) for p in ids)
    streams = [TextStream(tokenizer, params.stop) for _ in range(B)]

    def emit(row: int, delta: str) -> None:
        if on_text is not None and delta:
            on_text(row, delta)

    def should_stop(row: int, out: list[int]) -> bool:  # called once per new token of the row
        emit(row, streams[row].push(out[-1]))
        return streams[row].stopped

    gen_ids: list[list[int]] = [[] for _ in range(B)]
    if draft is not None:
        if B != 1 or params.temperature != 0 or params.repetition_penalty != 1.0 or constraints:
            raise LlmkitError("speculative decoding is greedy, one prompt at a time: use --temperature 0, "
                              "one prompt, no repetition penalty and no JSON schema")
        for chunk in speculative_greedy(model, ids[0], budget, tokenizer.eos_id,
                                        None if draft == "ngram" else draft):
            gen_ids[0].extend(chunk)
            if should_stop(0, gen_ids[0]):
                break
    else:
        for step in generate_ids(model, ids, params, tokenizer.eos_id, tokenizer.pad_id, use_cache, should_stop,
                                 constraints, compile):
            for i, t in enumerate(step):
                if t is not None:
                    gen_ids[i].append(t)
    results = []
    for i in range(B):
        emit(i, streams[i].finish())
        reason = "stop" if streams[i].stopped or len(gen_ids[i]) < budget else "length"
        results.append(Completion(streams[i].text, gen_ids[i], reason))
    return results


def generate(checkpoint: str, *, prompt: str | list[str] | None = None, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop: str | list[str] | None = None, seed: int | None = None, num_samples: int = 1,
             stream: bool = False, no_cache: bool = False, speculative: str | None = None,
             compile: bool = False, device: str = "cpu", json_schema: str | None = None) -> list[str]:
    """Generate text from a checkpoint.

    Args:
        checkpoint: checkpoint folder (config.json + model.safetensors + tokenizer.json).
        prompt: a prompt, or several (`--prompt+ a --prompt+ b` or a JSON list), generated together as a
            left-padded batch.
        max_new_tokens: most tokens to add per sample (fewer if the context fills up).
        temperature: 0 = greedy (deterministic argmax); higher = more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only within the smallest set of tokens whose probability reaches p (nucleus).
        repetition_penalty: > 1 discourages tokens already present (CTRL penalty).
        stop: a stop string or a list of them; the output ends before the first one.
        seed: random seed for reproducible sampling.
        num_samples: samples per prompt.
        stream: print tokens as they are produced (one prompt and one sample at a time).
        no_cache: recompute the whole sequence each step instead of using the KV cache (slower; for checks).
        speculative: greedy speculative decoding, same output as --temperature 0, faster on repetitive text:
            "ngram" drafts from the prompt itself (prompt lookup), or a draft checkpoint sharing the tokenizer.
        compile: run the one-token decode step under torch.compile (needs a C++ compiler; the first call
            compiles for a while, later steps are faster; output identical to eager). Llama-shaped models
            take the native step instead, which is faster still (models/native_step.py).
        device: cpu or cuda.
        json_schema: a JSON schema file (or inline JSON; "{}" = any JSON object): every output is JSON that
            validates against it (constrained decoding with llguidance).

    Examples:
        llmkit generate runs/demo --prompt "In the beginning" --max_new_tokens 60
        llmkit generate runs/sft --prompt "A person as JSON:" --json_schema person.json --temperature 0
        llmkit generate runs/demo --prompt "And God said" --temperature 0 --stop "." --stream true
        llmkit generate runs/demo --prompt+ "The LORD" --prompt+ "Jesus said" --num_samples 2 --seed 1
        llmkit generate runs/smollm2 --prompt "Repeat: a b c d. Again: a b" --temperature 0 --speculative ngram
    """
    if compile:
        check_compiler()
    model, tok = load(checkpoint, device)
    draft = speculative if speculative in (None, "ngram") else load(speculative, device)[0]
    if tok is None:
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; it cannot turn text into tokens")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(stop, str):
        stop = [stop]
    prompts = list(prompt or ["\n"])
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, list(stop or []), seed)
    outputs: list[str] = []
    batch = [p for p in prompts for _ in range(num_samples)]
    schema = _read_schema(json_schema) if json_schema is not None else None

    def cons() -> list[Constraint | None] | None:
        if json_schema is None:
            return None
        return [json_constraint(tok, schema, model.cfg.vocab_size) for _ in range(1 if stream else len(batch))]

    if stream:
        for i, p in enumerate(batch):
            sys.stdout.write(p)
            sys.stdout.flush()

            def emit(_row: int, delta: str) -> None:
                sys.stdout.write(delta)
                sys.stdout.flush()

            if params.seed is not None:
                params.seed = seed + i
            c = generate_text(model, tok, [p], params, not no_cache, on_text=emit, constraints=cons(), draft=draft,
                              compile=compile)[0]
            _check_json(c, schema, json_schema)
            outputs.append(p + c.text)
            sys.stdout.write("\n" + ("-" * 40 + "\n" if i < len(batch) - 1 else ""))
        return outputs
    for p, c in zip(batch, generate_text(model, tok, batch, params, not no_cache, constraints=cons(), draft=draft,
                                         compile=compile)):
        _check_json(c, schema, json_schema)
        outputs.append(p + c.text)
    for i, o in enumerate(outputs):
        print(o)
        if i < len(outputs) - 1:
            print("-" * 40)
    return outputs


def _read_schema(arg: str) -> dict | None:
    """--json_schema: a file path or inline JSON; {} means any JSON object."""
    if not arg.lstrip().startswith("{"):
        if not Path(arg).is_file():
            raise LlmkitError(f"--json_schema {arg}: no such file; give a JSON schema file or inline JSON")
        arg = Path(arg).read_text(encoding="utf-8")
    return check_schema(arg) or None


def _check_json(c: Completion, schema: dict | None, arg: str | None) -> None:
    """A constrained output that ran out of tokens is incomplete JSON: say so instead of printing it silently."""
    if arg is None:
        return
    if c.finish_reason == "length":
        raise LlmkitError("the JSON output did not finish within --max_new_tokens; raise it")
    validate_json(c.text, schema)
