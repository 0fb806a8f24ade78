"""`llmkit app summarize`: summaries from a decoder checkpoint, scored with ROUGE-1/2/L (`rouge-score`)."""

from __future__ import annotations

from typing import Any

from llmkit.apps.common import (
    ChatMode,
    as_list,
    build_prompt,
    complete,
    finish,
    load_checkpoint,
    read_jsonl,
    use_chat,
)
from llmkit.errors import LlmkitError

PROMPT = "Summarize the following text in one sentence.\n\n{text}"


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x100 (Google's rouge-score, Porter stemming), as in summarisation papers."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise LlmkitError(f"{len(predictions)} summaries but {len(references)} references")
    for i, r in enumerate(references):
        if not r.strip():
            raise LlmkitError(f"reference summary {i + 1} is empty; give a non-empty 'summary' or drop the example")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)  # score(target, prediction)
        for k in totals:
            totals[k] += s[k].fmeasure
    return {k: 100 * v / len(references) for k, v in totals.items()}


def summarize(checkpoint: str, *, text: str | list[str] | None = None, data: str | None = None, out: str | None = None,
              limit: int | None = None, prompt: str = PROMPT, max_new_tokens: int = 60, batch_size: int = 4,
              chat: ChatMode = "auto") -> dict[str, Any]:
    """Summarize texts with a decoder checkpoint; with reference summaries, report ROUGE-1/2/L.

    Args:
        checkpoint: decoder checkpoint folder (e.g. SmolLM2-135M-Instruct imported with `llmkit convert from-hf`).
        text: text(s) to summarize.
        data: JSONL file with {"text": ..., "summary": reference (optional)} per line.
        out: write {"text", "prediction", "summary"} per line to this JSONL file.
        limit: use only the first N examples of DATA.
        prompt: instruction template; {text} is replaced by the text.
        max_new_tokens: longest summary in tokens.
        batch_size: texts generated together.
        chat: wrap the prompt in the tokenizer's chat template (auto: when it has one).

    Examples:
        llmkit app summarize runs/smollm2 --text "The quick brown fox ... long text ..."
        llmkit app summarize runs/smollm2 --data news.jsonl --limit 50 --out runs/summaries.jsonl
    """
    text = as_list(text)
    if not text and not data:
        raise LlmkitError("give --text or --data (JSONL with a 'text' field and optional 'summary')")
    rows = [{"text": t} for t in (text or [])] + (read_jsonl(data, ("text",), limit) if data else [])
    has_ref = ["summary" in r for r in rows]
    if any(has_ref) and not all(has_ref):
        raise LlmkitError("some examples have a 'summary' and some do not; give references for all or none")
    for i, r in enumerate(rows):
        if "summary" in r and not str(r["summary"]).strip():
            raise LlmkitError(f"reference summary {i + 1} is empty; give a non-empty 'summary' or drop the example")
    model, tok = load_checkpoint(checkpoint)
    is_chat = use_chat(tok, chat)
    prompts = [build_prompt(tok, prompt.format(text=r["text"]), is_chat) for r in rows]
    preds = complete(model, tok, prompts, max_new_tokens, stop=[] if is_chat else ["\n\n"], batch_size=batch_size)
    for r, p in zip(rows, preds):
        r["prediction"] = p
    scores: dict[str, Any] = {"n": len(rows)}
    if all(has_ref):
        scores.update(rouge_scores([r["prediction"] for r in rows], [str(r["summary"]) for r in rows]))
    return finish("summarize", rows, preds, scores, all(has_ref), out)
