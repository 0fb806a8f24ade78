"""lm-evaluation-harness in process: an llmkit model as an `lm_eval.api.model.LM`, and
`llmkit evaluate CKPT --tasks ...`, which runs lm-eval's `simple_evaluate` on it.

Log-likelihoods come from `inference.scoring.score_tokens` (the same batched scoring the server's
`echo` + `logprobs` uses), generations from `inference.generate.generate_text` (greedy, the task's `until`
strings as stop strings). Tokenization is lm-eval's own (`TemplateLM` splits context and continuation),
so a task scores the same here, through `llmkit serve` + `local-completions`, and with lm-eval's `hf` model
on the checkpoint exported by `llmkit convert to-hf`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.evaluate.tasks import GENERATION_TASKS, TASKS, materialize
from llmkit.inference.generate import generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scoring import score_tokens
from llmkit.tokenizer import Tokenizer

LM_EVAL_HINT = "lm-evaluation-harness is not installed; run `pip install 'lm-eval>=0.4.5'` (or llmkit[eval])"


def _lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise LlmkitError(LM_EVAL_HINT) from None
    return TemplateLM


def can_generate(model: nn.Module) -> bool:
    return getattr(model.cfg, "arch", "") in ("decoder", "lstm")


def make_lm(model: nn.Module, tok: Tokenizer, batch_size: int = 16) -> Any:
    """An lm-eval `LM` over an llmkit causal model and its tokenizer."""
    TemplateLM = _lm_eval()
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if not can_generate(model):
        raise LlmkitError(f"this checkpoint is an {model.cfg.arch} model; lm-eval tasks need a causal language "
                          "model (a decoder) that can score and generate text")

    class LlmkitLM(TemplateLM):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch_size = model, tok, batch_size
            self.max_length = model.cfg.block_size

        @property
        def eot_token_id(self) -> int:
            return tok.eos_id if tok.eos_id is not None else tok.pad_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_kw: Any) -> list[int]:
            return tok.encode(string)

        def _score(self, seqs: list[list[int]], n_last: list[int]) -> list[tuple[float, bool]]:
            """(sum of log p, all greedy) over the last n tokens of each sequence."""
            out = []
            for s, n in zip(score_tokens(model, seqs, 0, tok.pad_id), n_last):
                out.append((float(sum(s.logprobs[len(s.logprobs) - n:])), all(s.greedy[len(s.greedy) - n:])))
            return out

        def _loglikelihood_tokens(self, requests: list[Any], **_kw: Any) -> list[tuple[float, bool]]:
            seqs, n_last = [], []
            for _, ctx, cont in requests:
                seqs.append((ctx + cont)[-(self.max_length + 1):])  # left-truncate what does not fit
                n_last.append(len(cont))
            return self._score(seqs, n_last)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    tok.encode(req.args[0]), self.prefix_token_id, self.max_length, 1)]
                scores = self._score([c + p for c, p in windows], [len(p) for _, p in windows])
                out.append(sum(s for s, _ in scores))
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, kw = req.args
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n_new = int(kw.get("max_gen_toks", 256))
                room = self.max_length - n_new
                if room < 1:
                    raise LlmkitError(f"max_gen_toks={n_new} leaves no room for the prompt in a context of "
                                      f"{self.max_length} tokens; lower it in the task's generation_kwargs")
                ids = tok.encode(context)
                if len(ids) > room:  # keep the end of a long prompt
                    context = tok.decode(ids[-room:])
                params = SamplingParams(n_new, temperature=0.0, stop=until)
                out.append(generate_text(model, tok, [context], params)[0].text)
            return out

    return LlmkitLM()


def task_manager(include_path: str | None, tasks: list[str], work: Path, builtin: bool = True) -> Any:
    """lm-eval's TaskManager with the shipped tasks (materialized into `work`) and the user's folder (and
    lm-eval's built-in tasks when `builtin` and a task is not found there; those download their data)."""
    from lm_eval.tasks import TaskManager

    shipped = [t for t in tasks if t in TASKS]
    paths = [str(materialize(work, shipped))] if shipped else []
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LlmkitError(f"--include_path {include_path} is not a folder; point it at a folder of task YAMLs")
        paths.append(str(Path(include_path).resolve()))
    tm = TaskManager(include_path=paths or None, include_defaults=False)  # indexing lm-eval's own ~10k YAMLs
    if builtin and any(t not in tm.all_tasks for t in tasks):  # ~20 s: only for a task not ours or the user's
        tm = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise LlmkitError(f"unknown task {', '.join(unknown)}; shipped offline tasks: {', '.join(TASKS)} "
                          "(or give --include_path DIR with your own YAMLs)")
    return tm


def run_tasks(model: nn.Module, tok: Tokenizer, tasks: list[str], *, include_path: str | None = None,
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 16,
              log_samples: bool = False, work: str | Path | None = None) -> dict[str, Any]:
    """lm-eval's simple_evaluate on an llmkit model; returns its results dict."""
    _lm_eval()
    from lm_eval import simple_evaluate

    if not tasks:
        raise LlmkitError(f"give at least one task, e.g. --tasks {TASKS[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        tm = task_manager(include_path, tasks, Path(work or tmp))
        lm = make_lm(model, tok, batch_size)
        return simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                               log_samples=log_samples, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                               fewshot_random_seed=0, bootstrap_iters=1000)


def results_table(results: dict[str, Any]) -> str:
    """The metrics with their standard errors, one row per task and metric, as lm-eval prints them."""
    rows = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, res in sorted(results["results"].items()):
        for key, value in res.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            err = res.get(f"{metric}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else "-"
            rows.append(f"| {task} | {metric} | {value:.4f} | {err_s} |")
    return "\n".join(rows)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of lm-eval's results (metrics, configs' names, versions, n-shot, sample counts)."""
    return {k: results[k] for k in ("results", "versions", "n-shot", "n-samples", "higher_is_better")
            if k in results}


def generation_tasks(tasks: list[str]) -> list[str]:
    return [t for t in tasks if t in GENERATION_TASKS]
