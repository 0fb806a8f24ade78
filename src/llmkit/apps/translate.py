"""`llmkit app translate`: translate with a seq2seq checkpoint (beam search) or a decoder (prompted), scored
with sacrebleu BLEU (tokenizer suited to the target language) and chrF."""

from __future__ import annotations

from typing import Any

from llmkit.apps.common import as_list, build_prompt, complete, finish, load_checkpoint, use_chat
from llmkit.data.parallel import read_pairs, split_pairs
from llmkit.errors import LlmkitError
from llmkit.inference.beam import translate_texts
from llmkit.metrics.translation import BleuTokenize, score_translations
from llmkit.models.checkpoint import read_meta

PROMPT = "Translate the following {src_lang} text into {tgt_lang}. Reply with the translation only.\n\n{text}"


def _held_out(checkpoint_meta: dict[str, Any], data: str, tgt_file: str | None, split: str) -> list[Any]:
    pairs = read_pairs(data, tgt_file)
    if split == "all":
        return pairs
    # the same hash split the checkpoint was trained with, so "valid" pairs were never seen in training
    frac = float(checkpoint_meta.get("valid_fraction", 0.02))
    seed = int(checkpoint_meta.get("split_seed", 0))
    return split_pairs(pairs, frac, seed)[1 if split == "valid" else 0]


def translate(checkpoint: str, *, text: str | list[str] | None = None, data: str | None = None,
              tgt_file: str | None = None, split: str = "valid", out: str | None = None, limit: int | None = None,
              beam: int = 4, length_penalty: float = 0.6, max_new_tokens: int = 128, batch_size: int = 16,
              bleu_tokenize: BleuTokenize = "auto", src_lang: str = "English", tgt_lang: str = "Japanese",
              ) -> dict[str, Any]:
    """Translate sentences; with references (DATA), report corpus BLEU and chrF from sacrebleu.

    Args:
        checkpoint: a seq2seq checkpoint from `llmkit train seq2seq`, or a decoder (prompted to translate).
        text: sentence(s) to translate.
        data: parallel data with references: `bible-en-ja`, a .tsv, a .jsonl or a source-lines file (+ --tgt_file).
        tgt_file: reference lines aligned with DATA.
        split: which pairs of DATA: valid (the checkpoint's held-out split), train, or all.
        out: write {"src", "prediction", "ref"} per line to this JSONL file.
        limit: use only the first N pairs.
        beam: beam width (seq2seq checkpoints; 1 = greedy).
        length_penalty: GNMT length-penalty exponent for beam search.
        max_new_tokens: longest translation in tokens.
        batch_size: sentences decoded together.
        bleu_tokenize: sacrebleu tokenizer; auto = ja-mecab for Japanese, zh for Chinese, 13a otherwise.
        src_lang: source language name (decoder prompts only).
        tgt_lang: target language name (decoder prompts only).

    Examples:
        llmkit app translate runs/mt --text "In the beginning God created the heavens and the earth."
        llmkit app translate runs/mt --data bible-en-ja --limit 200 --beam 4 --out runs/mt/valid.jsonl
        llmkit app translate runs/smollm2 --data pairs.tsv --src_lang English --tgt_lang French --bleu_tokenize 13a
    """
    text = as_list(text)
    if not text and not data:
        raise LlmkitError("give --text or --data (parallel data with references)")
    if split not in ("valid", "train", "all"):
        raise LlmkitError(f"--split must be valid, train or all, got {split!r}")

    model, tok = load_checkpoint(checkpoint, decoder_only=False)
    if model.cfg.arch not in ("seq2seq", "decoder"):
        raise LlmkitError(f"{checkpoint} is an {model.cfg.arch} model; translate needs a seq2seq or decoder checkpoint")
    rows: list[dict[str, Any]] = [{"src": t} for t in (text or [])]
    if data:
        pairs = _held_out(read_meta(checkpoint), data, tgt_file, split)
        rows += [{"id": p.id, "src": p.src, "ref": p.tgt} for p in pairs]
    if limit:
        rows = rows[:limit]
    sources = [r["src"] for r in rows]
    if model.cfg.arch == "seq2seq":
        preds = translate_texts(model, tok, sources, beam, length_penalty, max_new_tokens, batch_size)
    else:
        is_chat = use_chat(tok, "auto")
        prompts = [build_prompt(tok, PROMPT.format(src_lang=src_lang, tgt_lang=tgt_lang, text=s), is_chat,
                                answer_prefix="" if is_chat else f"{tgt_lang}:") for s in sources]
        preds = complete(model, tok, prompts, max_new_tokens, stop=["\n"], batch_size=batch_size)
    for r, p in zip(rows, preds):
        r["prediction"] = p
    scores: dict[str, Any] = {"n": len(rows)}
    refs = [r["ref"] for r in rows if "ref" in r]
    if refs:
        scored = [r for r in rows if "ref" in r]
        scores.update(score_translations([r["prediction"] for r in scored], refs, bleu_tokenize))
    return finish("translate", rows, preds, scores, bool(refs), out)
