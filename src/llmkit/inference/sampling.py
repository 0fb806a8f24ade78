"""Next-token choice: greedy, temperature, top-k, top-p, the repetition penalty, OpenAI's logit bias and
presence/frequency penalties, and a constrained-decoding mask, each a vectorized function over rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.errors import LlmkitError


@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI logit_bias: token id -> added to its logit
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens

    @property
    def needs_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the argmax of the raw logits is the answer."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.logit_bias
                and not self.needs_counts)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LlmkitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LlmkitError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise LlmkitError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LlmkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LlmkitError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LlmkitError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits / penalty, negative * penalty.

    seen: (B, V) bool of tokens in the prompt or generated so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (always keeps the best token)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens whose preceding mass already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """Add OpenAI's logit_bias {token id: bias} to every row (-100 bans a token, +100 all but forces it)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, vals.expand(*logits.shape[:-1], -1))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit - frequency * count - presence * (count > 0), counts (B, V) of generated tokens."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Constrained decoding: tokens outside `allowed` (B, V) bool get -inf (a row with none allowed is kept)."""
    if allowed is None:
        return logits
    allowed = allowed & allowed.any(-1, keepdim=True) | ~allowed.any(-1, keepdim=True)
    return logits.masked_fill(~allowed, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) -> (B,).

    seen: (B, V) bool for the repetition penalty; counts: (B, V) generated-token counts for the presence and
    frequency penalties; allowed: (B, V) bool mask of a constrained decoder (structured outputs)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = apply_logit_bias(logits, params.logit_bias)
    if counts is not None:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    logits = apply_allowed(logits, allowed)
    if params.temperature < 1e-4:  # 0 = greedy; below 1e-4 logits / T overflows, and the argmax is the answer
        return logits.argmax(-1)
    best = logits.argmax(-1)
    probs = filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
    bad = ~torch.isfinite(probs).all(-1)  # extreme settings (top_p 1e-300) can underflow: take the argmax
    if bad.any():
        probs[bad] = torch.nn.functional.one_hot(best[bad], probs.size(-1)).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

