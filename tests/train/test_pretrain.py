"""Pretraining: exact resume, learning, schedule, weight decay groups, MLM masking, checkpoint safety."""

import json
import math
import os

import pytest
import torch

from llmkit.data.prepare import prepare
from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import load_training_state, save_checkpoint
from llmkit.models.config import preset
from llmkit.models.load import load, load_model
from llmkit.train.loop import TrainConfig, lr_at, param_groups, resume_config
from llmkit.train.pretrain import LMTask, pretrain


@pytest.fixture(scope="module")
def bible_data(tmp_path_factory, bible_sample, bpe_tokenizer):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text("\n".join(bible_sample[:1500]) + "\n", encoding="utf-8")
    bpe_tokenizer.save(root / "tok")
    prepare(data=str(root / "corpus.txt"), tokenizer=str(root / "tok"), out=str(root / "shards"))
    return root / "shards"


SMALL = dict(preset_name="gpt2-tiny", n_layer=2, d_model=64, n_head=2, block_size=32, batch_size=4,
             warmup_steps=5, eval_every=10, eval_batches=2, log_every=1, dropout=0.1, lr=3e-3)


def _losses(records):
    return [r["loss"] for r in records if "loss" in r]


def test_resume_is_exact(bible_data, tmp_path):
    straight = _losses(pretrain(data=str(bible_data), out=str(tmp_path / "a"), max_steps=20, **SMALL))
    first = _losses(pretrain(data=str(bible_data), out=str(tmp_path / "b"), max_steps=20, stop_at=10, **SMALL))
    assert load_training_state(tmp_path / "b")["step"] == 10
    second = _losses(pretrain(data=str(bible_data), out=str(tmp_path / "b"), max_steps=20, resume=True, **SMALL))
    assert len(straight) == 20 and len(first) + len(second) == 20
    for a, b in zip(straight, first + second):
        assert abs(a - b) <= 1e-6
    wa, _ = load_model(tmp_path / "a")
    wb, _ = load_model(tmp_path / "b")
    for (n, p), (_, q) in zip(wa.state_dict().items(), wb.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_pretraining_learns_and_checkpoint_generates(bible_data, tmp_path):
    recs = pretrain(data=str(bible_data), out=str(tmp_path / "m"), max_steps=60,
                    **{**SMALL, "eval_every": 30, "dropout": 0.0})
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert val[-1] < val[0] and val[-1] < math.log(512) - 0.8  # below a uniform guess over 512 tokens (6.24)
    model, tok = load(tmp_path / "m")
    assert model.cfg.vocab_size == tok.vocab_size and not model.training


def test_resume_errors(bible_data, tmp_path):
    with pytest.raises(LlmkitError, match="does not exist"):
        pretrain(data=str(bible_data), out=str(tmp_path / "none"), max_steps=5, resume=True, **SMALL)
    pretrain(data=str(bible_data), out=str(tmp_path / "c"), max_steps=4, **SMALL)
    with pytest.raises(LlmkitError, match="config/checkpoint mismatch"):
        pretrain(data=str(bible_data), out=str(tmp_path / "c"), max_steps=8, resume=True, **{**SMALL, "d_model": 32})
    os.remove(tmp_path / "c" / "training_state.pt")
    with pytest.raises(LlmkitError, match="cannot be resumed"):
        pretrain(data=str(bible_data), out=str(tmp_path / "c"), max_steps=8, resume=True, **SMALL)


def test_resume_refuses_changed_settings_unless_overridden(bible_data, tmp_path):
    run = dict(data=str(bible_data), out=str(tmp_path / "r"), **{**SMALL, "eval_every": 0})
    pretrain(max_steps=10, **run)
    with pytest.raises(LlmkitError, match=r"max_steps 10 -> 14.*--resume_override max_steps"):
        pretrain(max_steps=14, resume=True, **run)
    with pytest.raises(LlmkitError, match="lr 0.003 -> 0.001"):
        pretrain(max_steps=10, resume=True, **{**run, "lr": 1e-3})
    with pytest.raises(LlmkitError, match="unknown setting"):
        pretrain(max_steps=14, resume=True, resume_override="max_stepz", **run)
    recs = pretrain(max_steps=14, resume=True, resume_override="max_steps", **run)
    lrs = [r["lr"] for r in recs if "lr" in r]
    old = TrainConfig(max_steps=10, lr=3e-3, warmup_steps=5)
    # no jump: a finished run extended stays at its cosine floor instead of climbing back towards the peak
    assert lrs[0] == pytest.approx(lr_at(10, old)) and all(lr == pytest.approx(3e-4) for lr in lrs)
    state = load_training_state(tmp_path / "r")
    assert state["step"] == 14 and state["train_config"]["max_steps"] == 14 and len(state["rng"]) == 1


def test_overridden_schedule_continues_from_the_saved_step():
    old = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    saved = {**vars(old)}
    new = resume_config(saved, TrainConfig(max_steps=200, warmup_steps=10, lr=1.0, min_lr=0.1), 50, ["max_steps"])
    assert lr_at(50, new) == pytest.approx(lr_at(50, old))  # continuous at the saved step
    assert lr_at(200, new) == pytest.approx(0.1) and lr_at(125, new) < lr_at(50, new)
    assert lr_at(125, new) == pytest.approx(0.1 + (lr_at(50, old) - 0.1) * 0.5)  # half way down its cosine
    again = resume_config(vars(new), TrainConfig(max_steps=200, warmup_steps=10, lr=1.0, min_lr=0.1), 120)
    assert lr_at(150, again) == pytest.approx(lr_at(150, new))  # a later plain resume keeps the same curve
    free = resume_config(saved, TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, log_every=1), 50)
    assert lr_at(70, free) == lr_at(70, old)  # log/eval/save settings are free to change


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warmup
    assert lrs[10] == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decaying
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(preset("gpt2-tiny", vocab_size=50))
    decay, no_decay = param_groups(model, TrainConfig())
    decay_ids = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay_ids}
    assert names and all(n.endswith(("qkv.weight", "proj.weight", "fc.weight")) for n in names)
    assert id(model.tok_emb.weight) not in decay_ids and id(model.blocks[0].norm1.weight) not in decay_ids
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_mlm_masking_is_15_percent_80_10_10():
    import numpy as np

    data = np.arange(5, 100, dtype=np.uint16).repeat(400)
    task = LMTask(data, data, block_size=64, batch_size=64, seed=0, objective="mlm", mask_id=1,
                  special_ids=[0, 1, 2], vocab_size=100)
    total = chosen = masked = kept = 0
    for step in range(20):
        b = task.train_batch(step, 0)
        sel = b["y"] != -100
        total += b["y"].numel()
        chosen += int(sel.sum())
        masked += int((b["x"][sel] == 1).sum())
        kept += int((b["x"][sel] == b["y"][sel]).sum())
    assert chosen / total == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert kept / chosen == pytest.approx(0.1 + 0.1 / 100, abs=0.02)  # 10 % kept (+ random hits of the same id)


def test_masked_lm_pretraining_runs_on_an_encoder(tmp_path, bible_sample):
    (tmp_path / "c.txt").write_text("\n".join(bible_sample[:800]), encoding="utf-8")
    recs = pretrain(data=str(tmp_path / "c.txt"), out=str(tmp_path / "bert"), preset_name="bert-tiny",
                    vocab_size=600, block_size=32, max_steps=6, batch_size=4, eval_every=3, eval_batches=1)
    assert any("val_loss" in r for r in recs)
    meta = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert meta["task"] == "mlm" and meta["model"]["arch"] == "encoder"


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, bpe_tokenizer):
    cfg = preset("gpt2-tiny", vocab_size=bpe_tokenizer.vocab_size, n_layer=1)
    torch.manual_seed(0)
    m1 = build_model(cfg)
    save_checkpoint(tmp_path / "ck", m1, cfg, bpe_tokenizer)
    (tmp_path / "ck" / "metrics.jsonl").write_text("{}\n")
    m2 = build_model(cfg)
    real_rename = os.rename

    def crash(src, dst):  # die after the old folder was moved aside, before the new one is in place
        if str(dst).endswith(".ck.old"):
            real_rename(src, dst)
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", m2, cfg, bpe_tokenizer)
    monkeypatch.setattr(os, "rename", real_rename)
    back, _ = load(tmp_path / "ck")  # falls back to the intact previous checkpoint
    torch.testing.assert_close(back.tok_emb.weight, m1.tok_emb.weight)
    assert not any(p.name.startswith(".ck.tmp") for p in tmp_path.iterdir())
    save_checkpoint(tmp_path / "ck", m2, cfg, bpe_tokenizer)  # and a later save recovers cleanly
    back, _ = load(tmp_path / "ck")
    torch.testing.assert_close(back.tok_emb.weight, m2.tok_emb.weight)


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmkitError, match="corrupt or truncated"):
        load(bad)
    shutil.copy(tiny_ckpt / "model.safetensors", bad / "model.safetensors")
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["d_model"] = 64
    meta["model"]["head_dim"] = 16
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LlmkitError, match="shape"):
        load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(LlmkitError, match="not valid JSON"):
        load(bad)
    with pytest.raises(LlmkitError, match="not an llmkit checkpoint"):
        load(tmp_path)


def test_grad_checkpointing_gives_the_same_steps(bible_data, tmp_path):
    run = dict(data=str(bible_data), max_steps=4, **{**SMALL, "eval_every": 0, "dropout": 0.1})
    plain = _losses(pretrain(out=str(tmp_path / "plain"), **run))
    ckpt = _losses(pretrain(out=str(tmp_path / "ckpt"), grad_checkpointing=True, **run))
    assert max(abs(a - b) for a, b in zip(plain, ckpt)) < 1e-5  # recomputation replays the dropout masks
    model, _ = load_model(tmp_path / "ckpt")  # parameter names are unchanged
    assert "forward" not in vars(model.blocks[0])  # and the per-instance wrapper is gone after training


def test_bf16_autocast_keeps_fp32_weights(bible_data, tmp_path):
    run = dict(data=str(bible_data), max_steps=3, **{**SMALL, "eval_every": 0, "dropout": 0.0})
    fp32 = _losses(pretrain(out=str(tmp_path / "fp32"), **run))
    bf16 = _losses(pretrain(out=str(tmp_path / "bf16"), precision="bf16", **run))
    assert fp32 != bf16 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05  # bf16 matmuls, same run
    model, _ = load_model(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = load_training_state(tmp_path / "bf16")
    assert state["train_config"]["precision"] == "bf16"
    with pytest.raises(LlmkitError, match="precision 'bf16' -> 'fp32'"):
        pretrain(out=str(tmp_path / "bf16"), resume=True, **{**run, "max_steps": 3})
