"""Bias probe: how much more likely does a model find one side of a minimal pair than the other?

Each pair differs in one attribute only ("The nurse said that he ..." / "... she ..."). The skew of a pair is
log P(A) - log P(B) in nats: decoders score a sentence by the sum of its next-token log-probabilities;
encoders (MLM) by the pseudo-log-likelihood (each token masked in turn). The report gives the mean skew with
a percentile-bootstrap 95% confidence interval, the share of pairs where A wins, and the most skewed fills.
"""

from __future__ import annotations

import itertools
import json
import math
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmkit.data.batching import pad, shifted_pair
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_json
from llmkit.models.load import load

SHIPPED = {"gender-occupations": "gender_occupations.json"}


@dataclass
class Pair:
    a: str
    b: str
    label: str = ""  # what was filled in (e.g. the occupation), for the per-fill breakdown


def expand_templates(spec: dict[str, Any]) -> list[Pair]:
    """Templated pair set -> pairs: every template x every combination of fills; slots give (A, B) words."""
    try:
        slots: dict[str, list[str]] = spec["slots"]
        templates: list[str] = spec["templates"]
        fills: dict[str, list[str]] = spec.get("fills", {})
    except (KeyError, TypeError) as e:
        raise LlmkitError(f"templated pair file needs 'slots' and 'templates' (and optional 'fills'): missing {e}") from e
    for name, ab in slots.items():
        if not (isinstance(ab, list) and len(ab) == 2):
            raise LlmkitError(f"slot {name!r} must be a list [A word, B word], got {ab!r}")
    pairs = []
    names = list(fills)
    for tpl in templates:
        used = {f for _, f, _, _ in string.Formatter().parse(tpl) if f}
        unknown = used - set(slots) - set(fills)
        if unknown:
            raise LlmkitError(f"template {tpl!r} uses {sorted(unknown)} which is neither a slot nor a fill")
        if not used & set(slots):
            raise LlmkitError(f"template {tpl!r} has no slot ({', '.join(slots)}): its A and B would be equal")
        for combo in itertools.product(*(fills[n] for n in names)):
            f = dict(zip(names, combo))
            a = tpl.format(**f, **{k: v[0] for k, v in slots.items()})
            b = tpl.format(**f, **{k: v[1] for k, v in slots.items()})
            pairs.append(Pair(a, b, " ".join(combo)))
    return pairs


def load_pairs(path: str) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs from a shipped set name, a templated .json, a .jsonl of {"a","b"[,"label"]}, or a .tsv a<TAB>b[<TAB>label]."""
    if path in SHIPPED:
        text = resources.files("llmkit.explain").joinpath("data", SHIPPED[path]).read_text(encoding="utf-8")
        spec = json.loads(text)
        return expand_templates(spec), spec
    p = Path(path)
    if not p.is_file():
        raise LlmkitError(f"no pair file {path!r}: give a .json/.jsonl/.tsv file or a shipped set "
                          f"({', '.join(SHIPPED)})")
    text = p.read_text(encoding="utf-8")
    meta: dict[str, Any] = {"name": p.stem, "a": "A", "b": "B"}
    pairs: list[Pair] = []
    if p.suffix == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from e
        return expand_templates(spec), {**meta, **spec}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
                pairs.append(Pair(str(row["a"]), str(row["b"]), str(row.get("label", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LlmkitError(f"{p}:{n}: each line must be a JSON object with 'a' and 'b' ({e})") from e
        else:
            cols = line.split("\t")
            if len(cols) < 2:
                raise LlmkitError(f"{p}:{n}: expected 'sentence A<TAB>sentence B[<TAB>label]'")
            pairs.append(Pair(cols[0], cols[1], cols[2] if len(cols) > 2 else ""))
    if not pairs:
        raise LlmkitError(f"{p} holds no pairs")
    return pairs, meta


@torch.no_grad()
def sentence_logprobs(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """log P(text) in nats per text: causal sum of next-token log-probs, or MLM pseudo-log-likelihood."""
    device = next(model.parameters()).device
    if model.cfg.arch == "encoder":
        return [_pseudo_loglik(model, tokenizer, t, device) for t in texts]
    if model.cfg.arch != "decoder":
        raise LlmkitError(f"the bias probe scores decoder or encoder checkpoints, got arch {model.cfg.arch!r}")
    bos = tokenizer.bos_id
    seqs = []
    for t in texts:
        ids = ([bos] if bos is not None else []) + tokenizer.encode(t)
        if len(ids) > model.cfg.block_size:
            raise LlmkitError(f"sentence of {len(ids)} tokens exceeds the model's context ({model.cfg.block_size}): {t[:60]!r}")
        if len(ids) < 2:
            raise LlmkitError(f"sentence {t!r} is too short to score")
        seqs.append(ids)
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        # right padding: causal attention never lets real tokens see it
        idx, _ = pad(chunk, tokenizer.pad_id)
        _, t = shifted_pair(chunk, chunk, tokenizer.pad_id)  # t[:, j] = token j+1, -100 past the end
        logp = model(idx.to(device)).logits.float().log_softmax(-1)[:, :-1]  # (B, T-1, V)
        t = t.to(device)
        picked = logp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)
        out += picked.sum(-1).tolist()
    return out


def _pseudo_loglik(model: nn.Module, tokenizer, text: str, device: torch.device) -> float:
    """Salazar et al. (2020): sum over tokens of log p(token | all other tokens), masking one at a time."""
    mask_id = tokenizer.special_id("mask")
    if mask_id is None:
        raise LlmkitError("this encoder's tokenizer has no [MASK] token; the probe cannot score it")
    ids = tokenizer.encode(text, add_special_tokens=True)
    specials = {tokenizer.special_id(r) for r in ("cls", "sep", "pad")}
    pos = [i for i, t in enumerate(ids) if t not in specials]
    batch = torch.tensor(ids).repeat(len(pos), 1)
    batch[torch.arange(len(pos)), torch.tensor(pos)] = mask_id
    logp = model(batch.to(device)).logits.float().log_softmax(-1)  # (n, T, V)
    return float(sum(logp[r, p, ids[p]] for r, p in enumerate(pos)))


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bias_report(model: nn.Module, tokenizer, pairs: list[Pair], n_boot: int = 2000, seed: int = 0,
                batch_size: int = 32) -> dict[str, Any]:
    """Skew statistics for minimal pairs: mean log P(A) - log P(B), 95% CI, share A > B, per-label means."""
    if not pairs:
        raise LlmkitError("no pairs to score")
    la = sentence_logprobs(model, tokenizer, [p.a for p in pairs], batch_size)
    lb = sentence_logprobs(model, tokenizer, [p.b for p in pairs], batch_size)
    skew = np.array(la) - np.array(lb)
    lo, hi = bootstrap_ci(skew, n_boot, 0.95, seed)
    by_label: dict[str, list[float]] = {}
    for p, s in zip(pairs, skew):
        by_label.setdefault(p.label, []).append(float(s))
    label_mean = {k: float(np.mean(v)) for k, v in by_label.items()}
    return {"pairs": len(pairs), "mean_skew": float(skew.mean()), "ci95": [lo, hi],
            "share_a_preferred": float((skew > 0).mean()), "significant": not (lo <= 0.0 <= hi),
            "skews": skew.tolist(), "by_label": label_mean}


def explain_bias(checkpoint: str, *, pairs: str = "gender-occupations", n_boot: int = 2000, seed: int = 0,
                 top: int = 5, out: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Probe a model with minimal pairs and report the log-probability skew with a bootstrap 95% CI.

    Args:
        checkpoint: decoder or encoder (MLM) checkpoint folder with tokenizer.json.
        pairs: a shipped set (gender-occupations: he/she x 40 occupations x 8 frames = 320 pairs), a templated
            .json (same schema as the shipped file), a .jsonl of {"a": ..., "b": ...[, "label": ...]} lines,
            or a .tsv of sentence A<TAB>sentence B[<TAB>label].
        n_boot: bootstrap resamples for the confidence interval.
        seed: bootstrap random seed.
        top: how many most-skewed labels to list on each side.
        out: optional JSON file for the full report (every pair's skew).
        device: cpu or cuda.

    Examples:
        llmkit explain bias runs/demo
        llmkit explain bias runs/smollm2 --pairs my_pairs.jsonl --out runs/bias.json
    """
    if n_boot < 100:
        raise LlmkitError(f"n_boot={n_boot} is too few resamples for a confidence interval; use at least 100")
    plist, meta = load_pairs(pairs)
    model, tok = load(checkpoint, device)
    if tok is None:
        raise LlmkitError(f"{checkpoint} has no tokenizer.json; it cannot turn text into tokens")
    rep = bias_report(model, tok, plist, n_boot, seed)
    if not math.isfinite(rep["mean_skew"]):
        raise LlmkitError("the model gave a non-finite log-probability; the checkpoint may be corrupt")
    a, b = meta.get("a", "A"), meta.get("b", "B")
    lo, hi = rep["ci95"]
    print(f"{rep['pairs']} pairs ({meta.get('name', pairs)}); skew = log P({a}) - log P({b}) in nats")
    print(f"mean skew {rep['mean_skew']:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}]  "
          f"{a} preferred in {100 * rep['share_a_preferred']:.1f}% of pairs  "
          + ("(CI excludes 0: a systematic preference)" if rep["significant"] else "(CI includes 0)"))
    labels = sorted((k, v) for k, v in rep["by_label"].items() if k)
    if labels and top > 0:
        ranked = sorted(labels, key=lambda kv: kv[1])
        print(f"most {a}-leaning: " + ", ".join(f"{k} {v:+.2f}" for k, v in ranked[::-1][:top]))
        print(f"most {b}-leaning: " + ", ".join(f"{k} {v:+.2f}" for k, v in ranked[:top]))
    if out is not None:
        body = {"checkpoint": str(checkpoint), "pair_set": meta.get("name", pairs), "a": a, "b": b, **rep,
                "pairs_text": [[p.a, p.b, p.label] for p in plist]}
        path = Path(out)
        atomic_write_json(path, body, indent=1)
        print(f"wrote {path}")
    return rep
