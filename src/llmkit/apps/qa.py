"""`llmkit app qa`: answer questions (about a context, or closed-book), scored SQuAD-style (EM and token F1)."""

from __future__ import annotations

from typing import Any

from llmkit.apps.common import (
    ChatMode,
    as_list,
    build_prompt,
    complete,
    exact_match,
    finish,
    load_checkpoint,
    read_jsonl,
    token_f1,
    use_chat,
)
from llmkit.errors import LlmkitError

PROMPT_CONTEXT = "Answer the question with a short phrase from the context.\n\nContext: {context}\n\nQuestion: {question}"
PROMPT_CLOSED = "Answer the question with a short phrase.\n\nQuestion: {question}"


def qa_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """SQuAD v1.1 metrics x100: each prediction takes its best exact match / F1 over the gold answers."""
    if len(predictions) != len(answers):
        raise LlmkitError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    for i, golds in enumerate(answers):
        if not golds or not any(g.strip() for g in golds):
            raise LlmkitError(f"example {i + 1} has no non-empty reference answer; give 'answers' or drop it")
    em = sum(max(exact_match(p, g) for g in golds) for p, golds in zip(predictions, answers))
    f1 = sum(max(token_f1(p, g) for g in golds) for p, golds in zip(predictions, answers))
    return {"exact_match": 100 * em / len(answers), "f1": 100 * f1 / len(answers)}


def _answers(row: dict[str, Any]) -> list[str] | None:
    a = row.get("answers", row.get("answer"))
    if a is None:
        return None
    if isinstance(a, dict) and "text" in a:  # the SQuAD dataset layout {"text": [...], "answer_start": [...]}
        a = a["text"]
    return [a] if isinstance(a, str) else [str(x) for x in a]


def qa(checkpoint: str, *, question: str | list[str] | None = None, context: str | None = None, data: str | None = None,
       out: str | None = None, limit: int | None = None, max_new_tokens: int = 24, batch_size: int = 8,
       chat: ChatMode = "auto") -> dict[str, Any]:
    """Answer questions with a decoder checkpoint; with reference answers, report exact match and token F1.

    Args:
        checkpoint: decoder checkpoint folder.
        question: question(s) to answer (about --context if given).
        context: passage the questions are about.
        data: JSONL with {"question", "context" (optional), "answers": [...] or "answer"} per line.
        out: write {"question", "prediction", ...} per line to this JSONL file.
        limit: use only the first N examples of DATA.
        max_new_tokens: longest answer in tokens.
        batch_size: questions generated together.
        chat: wrap the prompt in the tokenizer's chat template (auto: when it has one).

    Examples:
        llmkit app qa runs/smollm2 --question "Who built the ark?" --context "Noah built the ark of gopher wood."
        llmkit app qa runs/smollm2 --data trivia.jsonl --out runs/qa.jsonl
    """
    question = as_list(question)
    if not question and not data:
        raise LlmkitError("give --question (and optionally --context) or --data (JSONL with 'question')")
    rows = [{"question": q, **({"context": context} if context else {})} for q in (question or [])]
    rows += read_jsonl(data, ("question",), limit) if data else []
    golds = [_answers(r) for r in rows]
    scored = any(g is not None for g in golds)
    if scored and any(g is None for g in golds):
        raise LlmkitError("some examples have reference answers and some do not; give them for all or none")
    if scored:
        qa_scores([""] * len(golds), golds)  # fail on empty references before spending time generating
    model, tok = load_checkpoint(checkpoint)
    is_chat = use_chat(tok, chat)
    prompts = []
    for r in rows:
        template = PROMPT_CONTEXT if r.get("context") else PROMPT_CLOSED
        prompts.append(build_prompt(tok, template.format(**r), is_chat, answer_prefix="" if is_chat else "Answer:"))
    preds = complete(model, tok, prompts, max_new_tokens, stop=["\n"], batch_size=batch_size)
    for r, p in zip(rows, preds):
        r["prediction"] = p
    scores: dict[str, Any] = {"n": len(rows)}
    if scored:
        scores.update(qa_scores(preds, golds))
    return finish("qa", rows, preds, scores, scored, out)
