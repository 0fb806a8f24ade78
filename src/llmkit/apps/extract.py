"""`llmkit app extract`: structured JSON fields from text, by constrained decoding to a JSON schema of the
record (llguidance, inference/constrained.py; always valid) or by free generation + JSON validation + retry;
scored by per-field F1.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from llmkit.apps.common import (
    ChatMode,
    as_list,
    build_prompt,
    complete,
    finish,
    load_checkpoint,
    normalize_answer,
    read_jsonl,
    use_chat,
)
from llmkit.errors import LlmkitError
from llmkit.inference.constrained import validate_json

PROMPT = ("Extract these fields from the text: {fields}. Reply with one JSON object with exactly these keys; "
          "use null for a field the text does not mention.\n\nText: {text}")
_NULLS = {"", "null", "none", "n/a", "unknown"}


def _value(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return None if s.lower() in _NULLS else s


def parse_json_object(text: str, fields: list[str]) -> dict[str, str | None] | None:
    """The first JSON object in `text` if it has every field (values str/number/null), else None."""
    start = text.find("{")
    while start >= 0:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict) and all(f in obj for f in fields) and \
                all(v is None or isinstance(v, (str, int, float)) for v in obj.values()):
            return {f: _value(obj[f]) for f in fields}
        return None
    return None


def field_scores(predictions: list[dict[str, Any]], golds: list[dict[str, Any]], fields: list[str]
                 ) -> dict[str, float]:
    """Per-field and micro F1 x100. A field counts as true positive when both values are present and equal after
    SQuAD normalisation; a wrong present value is both a false positive and a false negative."""
    if len(predictions) != len(golds):
        raise LlmkitError(f"{len(predictions)} predictions but {len(golds)} gold records")
    out: dict[str, float] = {}
    TP = FP = FN = 0
    for f in fields:
        tp = fp = fn = 0
        for p, g in zip(predictions, golds):
            pv, gv = _value(p.get(f)), _value(g.get(f))
            if pv is not None and gv is not None and normalize_answer(pv) == normalize_answer(gv):
                tp += 1
                continue
            fp += pv is not None
            fn += gv is not None
        out[f"f1_{f}"] = 100 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 100.0
        TP, FP, FN = TP + tp, FP + fp, FN + fn
    out["f1_micro"] = 100 * 2 * TP / (2 * TP + FP + FN) if TP + FP + FN else 100.0
    return out


def extraction_schema(fields: list[str], max_chars: int) -> dict[str, Any]:
    """JSON schema of one record: every field, nothing else; each value a string of at most `max_chars`
    characters (no quote, backslash or control character, so no escapes) or null."""
    value = {"anyOf": [{"type": "string", "pattern": r'^[^"\\\x00-\x1f]{0,' + str(max_chars) + '}$'},
                       {"type": "null"}]}
    return {"type": "object", "properties": {f: value for f in fields}, "required": list(fields),
            "additionalProperties": False}


def record_bytes(fields: list[str], max_chars: int) -> int:
    """UTF-8 bytes of the longest record `extraction_schema` allows (compact separators, 4 bytes a character):
    a token is at least one byte, so this many tokens always finish the document."""
    keys = sum(len(json.dumps(f, ensure_ascii=False).encode()) + 2 for f in fields)  # "key": and a space
    return 2 + keys + 2 * (len(fields) - 1) + len(fields) * max(4, 2 + 4 * max_chars)


def _constrained(model: Any, tok: Any, prompts: list[str], fields: list[str], max_chars: int,
                 batch_size: int) -> list[dict[str, str | None]]:
    """Constrained decoding to `extraction_schema` (llguidance, inference/constrained.py): the model writes the
    whole record under a grammar, so every output parses and validates (checked with jsonschema)."""
    schema = extraction_schema(fields, max_chars)
    outs = complete(model, tok, prompts, record_bytes(fields, max_chars) + 1, batch_size=batch_size,
                    json_schema=schema)
    records = [validate_json(o, schema) for o in outs]
    return [{f: _value(r[f]) for f in fields} for r in records]


def _validated(model: Any, tok: Any, prompts: list[str], fields: list[str], max_new_tokens: int, batch_size: int,
               retries: int) -> tuple[list[dict[str, str | None] | None], int]:
    """Free generation parsed as JSON; invalid outputs are regenerated with sampling (new seed) up to `retries`."""
    budget = max_new_tokens * len(fields) + 16
    results: list[dict[str, str | None] | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    extra = 0
    for attempt in range(retries + 1):
        if not todo:
            break
        extra += len(todo) if attempt else 0
        outs = complete(model, tok, [prompts[i] for i in todo], budget, batch_size=batch_size,
                        temperature=0.0 if attempt == 0 else 0.7, seed=attempt)
        for i, o in zip(list(todo), outs):
            parsed = parse_json_object(o, fields)
            if parsed is not None:
                results[i] = parsed
                todo.remove(i)
    return results, extra


def extract(checkpoint: str, *, fields: str | list[str] | None = None, text: str | list[str] | None = None,
            data: str | None = None, out: str | None = None, limit: int | None = None,
            mode: Literal["constrained", "validate"] = "constrained", retries: int = 2, max_new_tokens: int = 16,
            batch_size: int = 8, chat: ChatMode = "auto") -> dict[str, Any]:
    """Extract named fields from texts as JSON; with gold records, report F1 per field.

    Args:
        checkpoint: decoder checkpoint folder.
        fields: field names to extract (default: the keys of the first gold record in DATA).
        text: text(s) to extract from.
        data: JSONL with {"text": ..., "fields": {name: value or null}} per line.
        out: write {"text", "prediction", "fields"} per line to this JSONL file.
        limit: use only the first N examples of DATA.
        mode: constrained (decoding constrained to the record's JSON schema: always valid) or validate (free
            JSON, parsed, retried).
        retries: validate mode: regenerations (sampled) for outputs that are not valid JSON with every field.
        max_new_tokens: longest value per field: characters in constrained mode, tokens in validate mode.
        batch_size: texts generated together.
        chat: wrap the prompt in the tokenizer's chat template (auto: when it has one).

    Examples:
        llmkit app extract runs/smollm2 --fields+ person --fields+ location --text "Obama spoke in Paris today."
        llmkit app extract runs/smollm2 --data tweets.jsonl --mode validate --retries 3 --out runs/extract.jsonl
    """
    fields = as_list(fields)
    text = as_list(text)
    if not text and not data:
        raise LlmkitError("give --text or --data (JSONL with 'text' and gold 'fields')")
    rows: list[dict[str, Any]] = [{"text": t} for t in (text or [])]
    rows += read_jsonl(data, ("text",), limit) if data else []
    golds = [r.get("fields") for r in rows]
    if any(g is not None and not isinstance(g, dict) for g in golds):
        raise LlmkitError('"fields" must be a JSON object {name: value or null} in every example')
    if not fields:
        first = next((g for g in golds if g), None)
        if first is None:
            raise LlmkitError("give --fields NAME (repeatable), or gold 'fields' objects in --data")
        fields = list(first)
    if any(not f or '"' in f for f in fields):
        raise LlmkitError(f"field names must be non-empty and contain no quotes, got {fields}")
    if any(g is not None for g in golds) and any(g is None for g in golds):
        raise LlmkitError("some examples have gold 'fields' and some do not; give them for all or none")
    model, tok = load_checkpoint(checkpoint)
    is_chat = use_chat(tok, chat)
    prompts = [build_prompt(tok, PROMPT.format(fields=", ".join(fields), text=r["text"]), is_chat) for r in rows]
    scores: dict[str, Any] = {"n": len(rows), "mode": mode}
    if mode == "constrained":
        preds: list[dict[str, str | None] | None] = list(_constrained(model, tok, prompts, fields, max_new_tokens,
                                                                      batch_size))
        scores["valid_json"] = 100.0
    else:
        preds, extra = _validated(model, tok, prompts, fields, max_new_tokens, batch_size, retries)
        scores["valid_json"] = 100.0 * sum(p is not None for p in preds) / len(preds)
        scores["retries"] = extra
    final = [p if p is not None else {f: None for f in fields} for p in preds]
    for r, p in zip(rows, final):
        r["prediction"] = p
    scored = any(g is not None for g in golds)
    if scored:
        scores.update(field_scores(final, golds, fields))
    return finish("extract", rows, final, scores, scored, out, show=lambda p: json.dumps(p, ensure_ascii=False))
