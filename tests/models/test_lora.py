"""LoRA: parity with peft (an independent implementation), merge == base + adapter, frozen weights untouched
by training, adapter files hold adapters only, and clear errors for bad targets / mismatched bases."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.models.build import build_model
from llmkit.models.checkpoint import save_checkpoint
from llmkit.models.config import preset
from llmkit.models.load import load_model
from llmkit.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    count_trainable,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

ATOL = 1e-5  # float32 on CPU: the two paths sum the same terms in a different order


def _model(name: str = "llama-tiny", **kw):
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=300, block_size=64, **kw)).eval()


def _randomise_b(model, seed: int = 1) -> None:
    """B starts at zero (adapter = identity); give it values so the tests compare something non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _ids(B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(3))


def test_starts_as_identity_and_freezes_base():
    model = _model()
    ids = _ids()
    before = model(ids).logits
    names = apply_lora(model, r=4, alpha=8, targets=["attn.qkv", "attn.proj", "mlp.fc"])
    assert len(names) == 3 * model.cfg.n_layer
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    # base parameter names are unchanged, so the base checkpoint layout still applies
    assert "blocks.0.attn.qkv.weight" in dict(model.named_parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    n_train, n_all = count_trainable(model)
    d, L, r = model.cfg.d_model, model.cfg.n_layer, 4
    qkv_out = (model.cfg.n_head + 2 * model.cfg.n_kv_head) * model.cfg.head_dim
    assert n_train == L * r * ((d + qkv_out) + (d + d) + (d + model.cfg.d_ff))
    assert torch.equal(model(ids).logits, before)  # B = 0


def test_matches_peft():
    """Same A, B and alpha/r: our LoRA model and peft's injected LoRA give the same logits and merged weights."""
    peft = pytest.importorskip("peft")
    model = _model()
    ref = copy.deepcopy(model)
    targets = ["attn.qkv", "mlp.gate", "mlp.proj"]
    names = apply_lora(model, r=4, alpha=12, targets=targets)
    _randomise_b(model)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, lora_dropout=0.0), ref)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            ref_params[f"{name}.lora_A.default.weight"].copy_(m.lora_A)
            ref_params[f"{name}.lora_B.default.weight"].copy_(m.lora_B)
    ids = _ids()
    ours, theirs = model(ids).logits, ref(ids).logits
    assert not torch.allclose(ours, _model()(ids).logits, atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    merge_lora(model)
    for name in names:
        peft_mod = ref.get_submodule(name)
        peft_mod.merge()
        torch.testing.assert_close(model.get_submodule(name).weight, peft_mod.base_layer.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_merged_equals_base_plus_adapter(name):
    model = _model(name)
    apply_lora(model, r=8, alpha=16, targets=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    _randomise_b(model)
    ids = _ids()
    adapted = model(ids).logits
    merge_lora(model)
    assert not lora_modules(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "fc")))
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    torch.testing.assert_close(model(ids).logits, adapted, atol=ATOL, rtol=0)
    # the merged state dict has exactly the base model's keys: it loads as a plain checkpoint
    assert set(model.state_dict()) == set(_model(name).state_dict())


def test_training_changes_only_adapters(bpe_tokenizer, tmp_path):
    """A real `fit` run with weight decay on: every frozen tensor stays bit-identical, the adapters move."""
    from llmkit.train.finetune.sft import SFTTask, encode_chat
    from llmkit.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    cfg = preset("gpt2-tiny", vocab_size=bpe_tokenizer.vocab_size, block_size=64, n_layer=2)
    model = build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, r=4, alpha=8, targets=["attn.qkv", "mlp.fc"], dropout=0.1)
    msgs = [[{"role": "user", "content": f"Who is {w}?"}, {"role": "assistant", "content": f"{w} is a name."}]
            for w in ("Adam", "Noah", "Moses", "Aaron")]
    rows = [encode_chat(bpe_tokenizer, m) for m in msgs]
    task = SFTTask(rows, rows, batch_size=2, grad_accum=1, seed=0, pad_id=bpe_tokenizer.pad_id)
    tcfg = TrainConfig(max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.1, eval_every=0,
                       log_every=1)
    fit(model, task, tcfg, tmp_path, lambda kind, state: None, progress=False)
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen tensor {n} changed"
    assert all(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())


def test_adapter_folder_holds_adapters_only(tmp_path):
    model = _model()
    names = apply_lora(model, r=4, alpha=8, targets=["attn.qkv"])
    _randomise_b(model)
    save_adapter(tmp_path / "ad", model, {"base": "somewhere"})
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    with safe_open(str(tmp_path / "ad" / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["alpha"], cfg["targets"], cfg["base"]) == (4, 8, ["attn.qkv"], "somewhere")
    # round trip onto a fresh base reproduces the adapted outputs exactly
    fresh = _model()
    assert load_adapter(fresh, tmp_path / "ad") == names
    ids = _ids()
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert set(lora_state_dict(fresh)) == keys


def test_train_also_modules_are_trained_and_saved(tmp_path):
    model = _model("gpt2-tiny")
    apply_lora(model, r=2, alpha=4, targets=["attn.proj"], train_also=["final_norm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"final_norm.weight", "final_norm.bias"} <= trainable
    assert {"final_norm.weight", "final_norm.bias"} <= set(lora_state_dict(model))


def test_bad_targets_and_bases():
    model = _model()
    with pytest.raises(LlmkitError) as e:
        apply_lora(model, r=4, alpha=8, targets=["attn.c_attn"])
    msg = str(e.value)
    assert "attn.c_attn" in msg and "blocks.{i}.attn.qkv" in msg and "blocks.{i}.mlp.gate" in msg
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    with pytest.raises(LlmkitError, match="tied"):
        apply_lora(_model("gpt2-tiny"), r=4, alpha=8, targets=["lm_head"])
    with pytest.raises(LlmkitError, match="rank"):
        apply_lora(_model(), r=0, alpha=8, targets=["attn.qkv"])


def test_adapter_on_wrong_base_is_refused(tmp_path):
    model = _model()
    apply_lora(model, r=4, alpha=8, targets=["attn.qkv"])
    save_adapter(tmp_path / "ad", model)
    other = _model(d_model=64)  # same module names, other shapes
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(LlmkitError, match="another base model"):
        load_adapter(other, tmp_path / "ad")
    assert not lora_modules(other)  # rolled back, not half-adapted
    assert all(torch.equal(p, before[n]) for n, p in other.state_dict().items())


def test_merge_command(tmp_path, bpe_tokenizer, capsys):
    """`llmkit lora merge BASE ADAPTER OUT` writes a plain checkpoint equal to base + adapter."""
    cfg = preset("llama-tiny", vocab_size=bpe_tokenizer.vocab_size, block_size=64)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", build_model(cfg), cfg, bpe_tokenizer)
    model, _ = load_model(tmp_path / "base")
    apply_lora(model, r=4, alpha=8, targets=["attn.qkv", "mlp.fc"])
    _randomise_b(model)
    save_adapter(tmp_path / "ad", model)
    ids = _ids(T=16) % bpe_tokenizer.vocab_size
    expected = model(ids).logits
    assert main(["lora", "merge", str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "merged")]) == 0
    merged, meta = load_model(tmp_path / "merged")
    torch.testing.assert_close(merged(ids).logits, expected, atol=ATOL, rtol=0)
    assert meta["lora_merged"]["r"] == 4 and (tmp_path / "merged" / "tokenizer.json").exists()
    # a folder that is not an adapter: one line, exit 2
    assert main(["lora", "merge", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
