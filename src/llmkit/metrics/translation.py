"""Translation metrics from sacrebleu (BLEU, chrF), with the BLEU tokenizer picked for the target language."""

from __future__ import annotations

from typing import Literal

from llmkit.errors import LlmkitError

BleuTokenize = Literal["auto", "13a", "intl", "char", "ja-mecab", "zh", "ko-mecab", "none"]


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

