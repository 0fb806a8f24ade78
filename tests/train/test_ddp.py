"""Data-parallel pretraining through torchrun: 2 CPU processes (gloo) match 1 process at the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from llmkit.data.prepare import prepare


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, bible_sample, bpe_tokenizer):
    (tmp_path / "c.txt").write_text("\n".join(bible_sample[:600]) + "\n", encoding="utf-8")
    bpe_tokenizer.save(tmp_path / "tok")
    prepare(data=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "d"))
    common = ["pretrain", "--data", str(tmp_path / "d"), "--preset_name", "gpt2-tiny", "--n_layer", "1",
              "--d_model", "32", "--n_head", "2", "--block_size", "16", "--max_steps", "4", "--warmup_steps", "1",
              "--eval_every", "0", "--eval_batches", "1", "--log_every", "1", "--dropout", "0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = [sys.executable, "-m", "llmkit", *common, "--out", str(tmp_path / "one"), "--batch_size", "8"]
    subprocess.run(single, check=True, env=env, capture_output=True, timeout=300)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "llmkit", *common, "--out", str(tmp_path / "two"), "--batch_size", "4"]
    r = subprocess.run(ddp, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)  # float summation order differs across processes
