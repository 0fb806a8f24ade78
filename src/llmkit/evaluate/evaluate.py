"""`llmkit evaluate`: score a checkpoint and write results JSON next to it.

Fine-tuned classifiers get accuracy and macro/micro P/R/F1 (+ confusion.png), NER models a seqeval
entity report, language models the perplexity of a text file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from llmkit.data.corpus import read_corpus
from llmkit.data.labeled import prepare_tokenizer
from llmkit.errors import LlmkitError
from llmkit.evaluate import harness
from llmkit.evaluate.perplexity import perplexity_of_ids
from llmkit.io import atomic_write_json
from llmkit.metrics.classification import confusion, plot_confusion
from llmkit.models.checkpoint import read_meta
from llmkit.models.heads import load_task_model
from llmkit.models.load import load
from llmkit.train.finetune.run import RESULTS, HeadSource, read_examples, split_examples
from llmkit.train.finetune.task import Encoded, FinetuneTask, HeadData, encode_classify, encode_ner


def evaluate(ckpt: str, *, data: str | None = None, split: Literal["test", "val"] = "test",
             text_field: str | None = None, label_field: str | None = None, stride: int = 0,
             max_tokens: int = 0, out: str | None = None, device: str = "cpu", tasks: str | list[str] | None = None,
             include_path: str | None = None, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16) -> dict[str, Any]:
    """Evaluate a checkpoint; results go to CKPT/eval_results.json (or `out`).

    With --tasks, runs lm-evaluation-harness tasks on the checkpoint in process (shipped offline tasks:
    llmkit_rt_sentiment, llmkit_bible_lastword, llmkit_chatterbot_qa, llmkit_zh_sentiment; or your own YAMLs
    in --include_path) and adds lm-eval's results under "lm_eval" in eval_results.json.

    Args:
        ckpt: checkpoint folder (fine-tuned classifier/NER/multitask model, or a language model).
        data: classifier/NER: labelled file or named dataset to score (default: the held-out split of the
            data it was fine-tuned on); language model: text file or named corpus for perplexity (required).
        split: which held-out split to score when `data` is not given: test or val.
        text_field: text column of `data` (default: the one used in fine-tuning, else "text").
        label_field: label column of `data` (default: the one used in fine-tuning, else "label").
        stride: perplexity sliding-window step in tokens (0 = block_size - 1: windows overlap by one token).
        max_tokens: score only the first N tokens of the text (0 = all).
        out: results JSON path (default CKPT/eval_results.json).
        device: cpu or cuda.
        tasks: lm-eval task names, comma-separated (or a list).
        include_path: a folder of your own lm-eval task YAMLs (e.g. on local JSONL with dataset_path: json).
        limit: score at most N documents per task.
        num_fewshot: few-shot examples per prompt (default: the task's).
        batch_size: sequences per scoring forward.

    Examples:
        llmkit evaluate runs/rt-cls
        llmkit evaluate runs/rt-cls --data my_reviews.csv --out runs/rt-cls/my_reviews.json
        llmkit evaluate runs/wnut-ner
        llmkit evaluate runs/demo --data bible --max_tokens 50000
        llmkit evaluate runs/sft --tasks llmkit_rt_sentiment,llmkit_bible_lastword --limit 200
        llmkit evaluate runs/sft --tasks my_task --include_path my_tasks/
    """
    if tasks:
        return _evaluate_tasks(ckpt, tasks, include_path, limit, num_fewshot, batch_size, device, out)
    meta = read_meta(ckpt)
    results = (_evaluate_heads(ckpt, meta, data, split, text_field, label_field, device, out)
               if "heads" in meta else _evaluate_lm(ckpt, meta, data, stride, max_tokens, device, out))
    return results


def _evaluate_tasks(ckpt: str, tasks: str | list[str], include_path: str | None, limit: int | None,
                    num_fewshot: int | None, batch_size: int, device: str, out: str | None) -> dict[str, Any]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    model, tok = load(ckpt, device)
    if tok is None:
        raise LlmkitError(f"{ckpt} has no tokenizer.json; lm-eval tasks need one to read text")
    res = harness.run_tasks(model, tok, names, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                            batch_size=batch_size)
    print(harness.results_table(res))
    path = Path(out) if out else Path(ckpt) / "eval_results.json"
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results = {**previous, "checkpoint": str(ckpt), "lm_eval": harness.summary(res)}
    atomic_write_json(path, results)
    print(f"wrote {path}")
    return results


def _evaluate_heads(ckpt: str, meta: dict[str, Any], data: str | None, split: str, text_field: str | None,
                    label_field: str | None, device: str, out: str | None) -> dict[str, Any]:
    model, tok, _ = load_task_model(ckpt, device)
    prepare_tokenizer(tok)
    specs, sources = meta["heads"], {d["name"]: d for d in meta.get("data", [])}
    if data is not None and len(specs) > 1:
        raise LlmkitError(f"{ckpt} has {len(specs)} task heads; evaluate it on its own splits (omit --data)")
    s = meta.get("split", {"val_frac": 0.1, "test_frac": 0.1, "seed": 0})
    max_len = int(meta.get("max_len", model.cfg.block_size))
    results: dict[str, Any] = {"checkpoint": str(ckpt)}
    task = FinetuneTask([], tok.pad_id, 1, device=device)
    for name, spec in specs.items():
        kind, labels = spec["kind"], spec["labels"]
        src_meta = sources.get(name, {})
        tf = text_field or src_meta.get("text_field", "text")
        lf = label_field or src_meta.get("label_field", "label")
        if data is not None:
            examples, where = read_examples(kind, data, tf, lf), data
        else:
            if not src_meta:
                raise LlmkitError(f"{ckpt} does not record its training data; pass --data FILE to evaluate on")
            src = HeadSource(name, kind, src_meta["data"], src_meta.get("val"), src_meta.get("test"),
                             text_field=tf, label_field=lf)
            _, val, test = split_examples(src, s["val_frac"], s["test_frac"], s["seed"])
            examples, where = (test if split == "test" else val), f"{src_meta['data']} ({split} split)"
            if not examples:
                raise LlmkitError(f"{ckpt} was trained without a {split} split; pass --data FILE to evaluate on")
        enc: Encoded = (encode_classify if kind == "classify" else encode_ner)(tok, examples, labels, model.cfg.arch,
                                                                               max_len, where)
        head = HeadData(name, kind, labels, enc)
        res = task.predict(model, head, enc)
        results[name] = {"data": where, "loss": res["loss"], **res["report"]}
        if kind == "classify":
            cm = confusion(res["y_true"], res["y_pred"], labels)
            results[name]["confusion"] = {"labels": labels, "matrix": cm}
            png = Path(out).with_suffix(".png") if out else Path(ckpt) / (
                "confusion.png" if len(specs) == 1 else f"confusion_{name}.png")
            plot_confusion(cm, labels, png, f"{name}: {where}")
            print(f"{name}: accuracy {res['report']['accuracy']:.4f}  macro-F1 {res['report']['macro_f1']:.4f}  "
                  f"micro-F1 {res['report']['micro_f1']:.4f}  (n={res['report']['n']})  confusion matrix -> {png}")
        else:
            r = res["report"]
            print(f"{name}: entity P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f}  "
                  f"(n={r['n_sentences']} sentences)")
    path = Path(out) if out else Path(ckpt) / RESULTS
    atomic_write_json(path, results)
    print(f"results -> {path}")
    return results


def _evaluate_lm(ckpt: str, meta: dict[str, Any], data: str | None, stride: int, max_tokens: int, device: str,
                 out: str | None) -> dict[str, Any]:
    if data is None:
        raise LlmkitError("perplexity needs a text: pass --data FILE (or a named corpus such as bible)")
    arch = meta["model"].get("arch")
    if arch not in ("decoder", "lstm"):
        raise LlmkitError(f"perplexity is defined for causal language models; {ckpt} is a {arch} model")
    model, tok = load(ckpt, device)
    if tok is None:
        raise LlmkitError(f"{ckpt} has no tokenizer.json; perplexity needs the model's tokenizer")
    ids = tok.encode(read_corpus(data))
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LlmkitError(f"{data} has fewer than 2 tokens; perplexity needs some text")
    block = model.cfg.block_size
    res = {"checkpoint": str(ckpt), "data": data, "block_size": block, "stride": min(stride or block, block - 1),
           **perplexity_of_ids(model, ids, block, stride or block, device)}
    path = Path(out) if out else Path(ckpt) / "eval_results.json"
    atomic_write_json(path, res)
    print(f"perplexity {res['perplexity']:.3f} ({res['bits_per_token']:.4f} bits/token over {res['n_tokens']:,} "
          f"tokens) -> {path}")
    return res
