"""Every trainer under torchrun is one data-parallel run: 2 CPU processes (gloo) give the losses of 1 process
at the same global batch (within 1e-4: float summation order differs), only rank 0 writes, and a resumed
2-process run with dropout repeats the uninterrupted one (each rank gets its own RNG state back). With
--fsdp (FSDP2) pretrain and sft match 1 process too, the consolidated model.safetensors loads anywhere, and
a run SIGKILLed while checkpointing resumes to the losses of an uninterrupted run.

The 2-process work happens in two torchrun launches (tests/train/dist_worker.py): everything, ending in the
killed run; then its resume.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.data.prepare import prepare
from llmkit.models.checkpoint import load_training_state

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-4


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def _torchrun(spec: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _call(job: dict) -> None:
    import importlib

    module, name = job["fn"].split(":")
    getattr(importlib.import_module(module), name)(*job.get("args", []), **job["kwargs"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bible_sample, bpe_tokenizer):
    """Build tiny inputs, run every job with 2 processes (batch B) and in this process (batch 2B)."""
    from llmkit.models.build import build_model
    from llmkit.models.checkpoint import save_checkpoint
    from llmkit.models.config import preset
    from llmkit.tokenizer import train_from_iterator

    root = tmp_path_factory.mktemp("ddp")
    (root / "c.txt").write_text("\n".join(bible_sample[:600]) + "\n", encoding="utf-8")
    bpe_tokenizer.save(root / "tok")
    prepare(data=str(root / "c.txt"), tokenizer=str(root / "tok"), out=str(root / "d"))
    torch.manual_seed(0)
    dcfg = preset("gpt2-tiny", vocab_size=bpe_tokenizer.vocab_size, n_layer=1, d_model=32, n_head=2,
                  block_size=96, dropout=0.0)
    save_checkpoint(root / "gpt", build_model(dcfg), dcfg, bpe_tokenizer)
    wp = train_from_iterator(bible_sample[:600], "wordpiece", vocab_size=400, show_progress=False)
    bcfg = preset("bert-tiny", vocab_size=wp.vocab_size, n_layer=1, d_model=32, n_head=2, block_size=48, dropout=0.0)
    save_checkpoint(root / "bert", build_model(bcfg), bcfg, wp)
    verses = bible_sample[:300]
    with (root / "chat.jsonl").open("w", encoding="utf-8") as f:  # uneven response lengths per rank
        for a, b in zip(verses[::2], verses[1::2]):
            f.write(json.dumps({"prompt": a[:24], "response": b[: 8 + len(a) % 40]}) + "\n")
    with (root / "cls.jsonl").open("w", encoding="utf-8") as f:
        for v in verses:
            f.write(json.dumps({"text": v, "label": "said" if "said" in v else "other"}) + "\n")
    (root / "pairs.tsv").write_text("".join(f"{v[:40]}\t{v[:40].upper()}\n" for v in verses), encoding="utf-8")

    lm = dict(data=str(root / "d"), preset_name="gpt2-tiny", n_layer=1, d_model=32, n_head=2, block_size=16,
              max_steps=4, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1, dropout=0.0)
    sft = dict(data=str(root / "chat.jsonl"), max_steps=3, warmup_steps=1, eval_every=0, log_every=1, lr=1e-3,
               max_len=96)
    jobs = {  # name -> (function, positional args, kwargs with the per-process batch size B)
        "pretrain": ("llmkit.train.pretrain:pretrain", [], {**lm, "batch_size": 4}),
        "sft": ("llmkit.train.finetune.sft:sft", [str(root / "gpt")], {**sft, "batch_size": 3}),
        "classify": ("llmkit.train.finetune.classify:classify", [str(root / "bert")],
                     dict(data=str(root / "cls.jsonl"), max_steps=3, eval_every=3, patience=0, lr=1e-3,
                          max_len=32, batch_size=5, dropout=0.0)),
        "seq2seq": ("llmkit.train.seq2seq:train_seq2seq", [str(root / "pairs.tsv")],
                    dict(tokenizer=str(root / "tok"), d_model=32, n_layer=1, n_head=2, d_ff=64, max_len=24,
                         max_steps=3, warmup_steps=1, eval_every=0, beam=1, eval_examples=2, dropout=0.0,
                         valid_fraction=0.05, batch_size=4)),
    }
    two, one = [], []
    for name, (fn, args, kw) in jobs.items():
        for n_proc, jobs_of in ((2, two), (1, one)):
            out = str(root / f"{name}-{n_proc}")
            batch = {"batch_size": kw["batch_size"] * (3 - n_proc)}  # the same global batch
            if name == "seq2seq":  # OUT is positional there
                jobs_of.append({"fn": fn, "args": [*args, out], "kwargs": {**kw, **batch}})
            else:
                jobs_of.append({"fn": fn, "args": args, "kwargs": {**kw, **batch, "out": out}})
    # dropout on: an uninterrupted 2-process run vs stop at step 2 + resume
    drop = {**lm, "batch_size": 4, "dropout": 0.1}
    two += [{"fn": jobs["pretrain"][0], "kwargs": {**drop, "out": str(root / "drop-straight")}},
            {"fn": jobs["pretrain"][0], "kwargs": {**drop, "out": str(root / "drop-resumed"), "stop_at": 2}},
            {"fn": jobs["pretrain"][0], "kwargs": {**drop, "out": str(root / "drop-resumed"), "resume": True}}]
    # FSDP: the same pretrain / sft jobs sharded; then a 6-step run killed at its step-4 save, and its reference
    two += [{**j, "kwargs": {**j["kwargs"], "fsdp": True, "out": j["kwargs"]["out"] + "-fsdp"}}
            for j in two[:2]]
    fsdp = {**lm, "batch_size": 4, "fsdp": True, "max_steps": 6, "save_every": 2}
    two += [{"fn": jobs["pretrain"][0], "kwargs": {**fsdp, "out": str(root / "fsdp-straight")}},
            {"fn": jobs["pretrain"][0], "kwargs": {**fsdp, "out": str(root / "fsdp-killed")}, "kill_at_step": 4}]
    resume = [{"fn": jobs["pretrain"][0], "kwargs": {**fsdp, "out": str(root / "fsdp-killed"), "resume": True}}]
    for i, (spec, expect_kill) in enumerate(((two, True), (resume, False))):
        (root / f"jobs{i}.json").write_text(json.dumps(spec), encoding="utf-8")
        r = _torchrun(root / f"jobs{i}.json")
        errors = "\n".join(x for x in r.stderr.splitlines() if "Error" in x or "[rank" in x)[-3000:]
        if expect_kill:  # rank 0 died by SIGKILL in the last job, nothing else failed
            assert r.returncode != 0 and "SIGKILL" in r.stderr, errors
            assert load_training_state(root / "fsdp-killed")["step"] == 2
        else:
            assert r.returncode == 0, errors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in one:
            _call(job)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pretrain", "sft", "classify", "seq2seq"])
def test_two_processes_match_one_at_the_same_global_batch(runs, name):
    one, two = _losses(runs / f"{name}-1"), _losses(runs / f"{name}-2")
    assert len(one) == len(two) >= 2
    assert max(abs(a - b) for a, b in zip(one, two)) < TOL, (one, two)


@pytest.mark.slow
def test_only_rank_0_writes_and_results_are_complete(runs):
    assert json.loads((runs / "classify-2" / "eval_results.json").read_text())["main"]["n"] > 0
    assert (runs / "seq2seq-2" / "scores.json").exists() and (runs / "sft-2" / "sft_summary.json").exists()
    rows = [json.loads(r) for r in (runs / "pretrain-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one writer, no duplicates


@pytest.mark.slow
def test_resume_restores_each_ranks_rng(runs):
    straight, resumed = _losses(runs / "drop-straight"), _losses(runs / "drop-resumed")
    assert len(straight) == len(resumed) == 4
    assert max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-6, (straight, resumed)
    rng = load_training_state(runs / "drop-resumed")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pretrain", "sft"])
def test_fsdp_matches_one_process_and_saves_one_loadable_model(runs, name):
    from llmkit.models.load import load_model

    one, two = _losses(runs / f"{name}-1"), _losses(runs / f"{name}-2-fsdp")
    assert len(one) == len(two) >= 3
    assert max(abs(a - b) for a, b in zip(one, two)) < TOL, (one, two)
    m1, _ = load_model(runs / f"{name}-1")
    m2, _ = load_model(runs / f"{name}-2-fsdp")  # consolidated weights, loaded without any process group
    for (k, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=k)
    assert [p.name for p in (runs / f"{name}-2-fsdp.shards").iterdir()] == [f"step_{len(one):08d}"]


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_repeats_the_uninterrupted_run(runs):
    straight, resumed = _losses(runs / "fsdp-straight"), _losses(runs / "fsdp-killed")
    assert len(straight) == len(resumed) == 6
    assert max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-6, (straight, resumed)
