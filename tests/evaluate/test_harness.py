"""lm-evaluation-harness three ways on one tiny checkpoint and one shipped offline task: the real `lm_eval`
`local-completions` model against `llmkit serve`, the in-process wrapper, and lm-eval's own `hf` model on
the `convert to-hf` export. Per-request log-likelihoods are compared with a direct forward."""

from __future__ import annotations

import httpx
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.evaluate import harness
from llmkit.evaluate.tasks import materialize
from llmkit.interop.commands import to_hf
from llmkit.models.load import load
from llmkit.serve.app import BackgroundServer, create_app

TASK, LIMIT = "llmkit_rt_sentiment", 6


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return materialize(tmp_path_factory.mktemp("tasks"), [TASK])


def lls(results) -> list[float]:
    """Per-request log-likelihoods, in lm-eval's document and choice order."""
    return [r[0] for s in results["samples"][TASK] for r in s["filtered_resps"]]


def direct(model, tok, results) -> list[float]:
    """log p(continuation | context) by one plain forward per request, split the way lm-eval splits."""
    out = []
    for s in results["samples"][TASK]:
        for ctx, cont in s["arguments"]:
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[: len(ctx) - n], ctx[len(ctx) - n:] + cont
            c_ids, whole = tok.encode(ctx), tok.encode(ctx + cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            out.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(c_ids), len(whole))))
    return out


def acc(results) -> float:
    return results["results"][TASK]["acc,none"]


def test_lm_eval_local_completions_in_process_and_hf_agree(tiny_ckpt, task_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok = load(tiny_ckpt)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    common = {"tasks": [TASK], "task_manager": tm, "limit": LIMIT, "log_samples": True, "bootstrap_iters": 0}
    with BackgroundServer(create_app(str(tiny_ckpt), max_batch=4)) as s:
        args = (f"base_url={s.url}/v1/completions,model={tiny_ckpt.name},tokenizer_backend=remote,"
                "tokenized_requests=True,num_concurrent=1,max_retries=1,batch_size=8,max_length=128")
        served = simple_evaluate(model="local-completions", model_args=args, **common)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    ref = direct(model, tok, served)
    assert len(ref) == 2 * LIMIT
    assert lls(served) == pytest.approx(ref, abs=1e-4)

    inproc = harness.run_tasks(model, tok, [TASK], limit=LIMIT, log_samples=True, work=task_dir)
    assert lls(inproc) == pytest.approx(lls(served), abs=1e-4) and acc(inproc) == acc(served)

    to_hf(str(tiny_ckpt), str(tmp_path / "hf"))
    hf = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu",
                         **common)
    assert lls(hf) == pytest.approx(ref, abs=1e-3) and acc(hf) == acc(served)


def test_bad_input_is_one_clear_error(tiny_ckpt, tmp_path, bpe_tokenizer):
    from llmkit.models.build import build_model
    from llmkit.models.config import preset

    model, tok = load(tiny_ckpt)
    with pytest.raises(LlmkitError, match="unknown task"):
        harness.task_manager(None, ["no_such_task"], tmp_path, builtin=False)  # builtin: +20 s of indexing
    with pytest.raises(LlmkitError, match="not a folder"):
        harness.run_tasks(model, tok, [TASK], include_path=str(tmp_path / "missing"), limit=1)
    encoder = build_model(preset("bert-tiny", vocab_size=bpe_tokenizer.vocab_size))
    with pytest.raises(LlmkitError, match="cannot|causal"):
        harness.make_lm(encoder, bpe_tokenizer)


def test_cli_evaluate_tasks_writes_eval_results(tiny_ckpt, tmp_path, capsys):
    import json

    from llmkit.cli import main

    out = tmp_path / "eval_results.json"
    main(["evaluate", str(tiny_ckpt), "--tasks", TASK, "--limit", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["lm_eval"]["results"][TASK]
    assert 0.0 <= res["acc,none"] <= 1.0 and "| task | metric |" in printed and TASK in printed
