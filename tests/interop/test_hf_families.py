"""Qwen2/2.5, Qwen3, Mistral, Phi-3, Gemma 2, Gemma 3 (and Llama 3 RoPE): random tiny configs built with
transformers' own config classes. After `convert from-hf`, llmkit's fp32 logits equal transformers' (eager
attention) within 1e-4, 32 greedy tokens with the KV cache are identical (prompt + generation run past
the sliding window), and `convert to-hf` writes back bit-identical tensors that transformers loads into
the same function."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.cli import main  # noqa: E402
from llmkit.inference.generate import generate_ids  # noqa: E402
from llmkit.inference.sampling import SamplingParams  # noqa: E402
from llmkit.interop.commands import from_hf, to_hf  # noqa: E402
from llmkit.models.load import load_model  # noqa: E402

ATOL = 1e-4  # fp32 logits, llmkit vs transformers on the same weights and tokens
VOCAB, WINDOW = 128, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# name -> (transformers config class, its arguments): each switches on what its family adds to Llama
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=True)),  # q/k/v biases, tied
    "qwen2-sliding": ("Qwen2Config", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                          max_window_layers=1)),  # layers >= 1 local
    "qwen3-yarn": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=16, rope_parameters={  # qk-norm, hd != d/nh
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, head_dim=8, sliding_window=WINDOW)),
    "llama3-rope": ("LlamaConfig", dict(num_hidden_layers=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0})),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, sliding_window=WINDOW)),  # fused qkv_proj / gate_up_proj
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,  # 5:1 local
                                        sliding_window=WINDOW, rope_parameters={
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e6}})),
}


def hf_reference(name: str, folder: Path, seed: int = 0) -> Any:
    """A random transformers model of family `name` with non-trivial norms and biases, saved to `folder`."""
    cls, kw = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**COMMON, **kw})
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # Gemma norms scale by (1 + w): w around 0; others around 1
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5) if name.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.uniform_(-0.2, 0.2)
    ref.save_pretrained(folder)
    return ref


def _greedy_hf(ref: Any, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy_ours(model: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_ids(model, prompts, SamplingParams(max_new_tokens=n, temperature=0), eos_id=None):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_parity_generation_and_round_trip(tmp_path, name):
    ref = hf_reference(name, tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = load_model(tmp_path / "ours")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)  # 20 > WINDOW: local layers really slide
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= ATOL
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
    assert (got - want)[mask.bool()].abs().max().item() <= ATOL
    # 32 greedy tokens with the KV cache (bounded ring buffers on local layers), 12 + 32 positions > WINDOW
    prompt = ids[1, :12].tolist()
    assert _greedy_ours(ours, [prompt], 32)[0] == _greedy_hf(ref, prompt, 32)
    # to-hf: the same tensors bit for bit, and a config transformers turns into the same function
    to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_sliding_window_cache_is_bounded_and_batched_generation_matches(tmp_path, name):
    """Local layers keep WINDOW - 1 cached positions (+ the current token = the window); batched, left-padded
    generation 4x longer than the window equals transformers' one-prompt-at-a-time output."""
    ref = hf_reference(name, tmp_path / "hf", seed=2)
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = load_model(tmp_path / "ours")
    cache = ours.new_cache(2, 100)
    for kind, k, v in zip(ours.cfg.layer_kinds, cache.k, cache.v):
        assert k.shape[2] == v.shape[2] == (WINDOW - 1 if kind == "local" else 100)
    prompts = [[5, 9, 17, 33, 65, 3], [7, 11, 13, 19, 23, 29, 31, 37, 41, 43, 47]]
    got = _greedy_ours(ours, prompts, 32)
    assert got == [_greedy_hf(ref, p, 32) for p in prompts]


def test_gemma3_vision_language_checkpoint_imports_its_language_model(tmp_path):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration: the text path of that model = the imported one."""
    cls, kw = FAMILIES["gemma3"]
    torch.manual_seed(5)
    text = {**COMMON, **kw}
    cfg = transformers.Gemma3Config(text_config=text, mm_tokens_per_image=4, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)
    ref.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = load_model(tmp_path / "ours")
    assert ours.cfg.qk_norm and ours.cfg.layer_kinds.count("global") == 1
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= ATOL


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                          "long_factor": [1.0] * 4}}, "'longrope'"),
    ({"layer_types": ["chunked_attention", "sliding_attention", "full_attention"]}, "'chunked_attention'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
])
def test_unsupported_variants_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, change, needle):
    hf_reference("qwen2-sliding", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    err = _cli_error(capsys, ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert needle in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ GGUF path

# family -> (GGUF arch, config overrides): llama.cpp files Mistral as `llama` (+ its sliding window) and
# scales Gemma queries by 1/sqrt(head_dim), so the Gemma 2 model here has query_pre_attn_scalar = head_dim
GGUF_FAMILIES = {"qwen2": ("qwen2", {}), "qwen3-yarn": ("qwen3", {}), "mistral": ("llama", {}), "phi3": ("phi3", {}),
                 "llama3-rope": ("llama", {}),
                 "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}), "gemma3": ("gemma3", {})}


def _llama3_divisors(rope: dict[str, Any], dim: int) -> Any:
    """llama.cpp's rope_freqs for Llama 3 scaling: 1 for short wavelengths, `factor` for long, smooth between."""
    import math

    import numpy as np

    old, lo, hi, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                           rope["high_freq_factor"], rope["factor"])
    out = []
    for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(ref: Any, arch: str, path: Path) -> None:
    """An F32 GGUF of `ref` the way llama.cpp's convert_hf_to_gguf.py lays it out, with gguf-py's own name map."""
    gguf = pytest.importorskip("gguf")
    c = ref.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if getattr(c, "head_dim", None):  # convert_hf_to_gguf writes key/value_length only when the config has head_dim
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "llama3":  # convert_hf_to_gguf writes per-frequency divisors, not the parameters
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_tensor("rope_freqs.weight", _llama3_divisors(rope, c.head_dim))
    elif rope["rope_type"] != "default":
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "yarn":
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if getattr(c, "sliding_window", None) is not None:
        w.add_sliding_window(c.sliding_window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            getattr(w, f"add_{key}")(getattr(c, key))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.detach().float().numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's LlamaModel.permute
            h = n_head if "q_proj" in name else n_kv
            data = data.reshape(h, 2, data.shape[0] // h // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's (1 + w)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(GGUF_FAMILIES))
def test_gguf_import_equals_hf_import(tmp_path, name):
    arch, overrides = GGUF_FAMILIES[name]
    cls, kw = FAMILIES[name]
    FAMILIES[f"{name}-gguf"] = (cls, {**kw, **overrides})
    try:
        ref = hf_reference(f"{name}-gguf", tmp_path / "hf")
    finally:
        del FAMILIES[f"{name}-gguf"]
    write_gguf(ref, arch, tmp_path / "m.gguf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "via-hf"))
    from_hf(str(tmp_path / "m.gguf"), str(tmp_path / "via-gguf"))
    a, _ = load_model(tmp_path / "via-hf")
    b, _ = load_model(tmp_path / "via-gguf")
    strip = ("extra", "pad_token_id")
    assert {k: v for k, v in a.cfg.to_dict().items() if k not in strip} == \
        {k: v for k, v in b.cfg.to_dict().items() if k not in strip}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # exact, except Gemma norms: (w + 1) - 1 rounds in fp32
        assert torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6 if name.startswith("gemma") else 0), k
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= ATOL


# ------------------------------------------------------------------------------------------ end to end

E2E = ["qwen2", "gemma3"]
PROMPT = "And God said, Let there be light"


@pytest.fixture(scope="module", params=E2E)
def family_ckpt(request, tmp_path_factory, bpe_tokenizer):
    """(name, transformers model, llmkit checkpoint imported with the tokenizer) of a tiny Qwen2 / Gemma-3."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    cls, kw = FAMILIES[name]
    FAMILIES[f"{name}-e2e"] = (cls, {**kw, "vocab_size": bpe_tokenizer.vocab_size})
    try:
        ref = hf_reference(f"{name}-e2e", folder / "hf")
    finally:
        del FAMILIES[f"{name}-e2e"]
    bpe_tokenizer.save(folder / "hf")  # tokenizer.json beside the weights, as in a downloaded folder
    return name, ref, from_hf(str(folder / "hf"), str(folder / "ckpt"))


def test_family_sft_lora_runs_and_adapter_loads(family_ckpt, tmp_path):
    _, _, ckpt = family_ckpt
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Who said verse {i}?"},
                          {"role": "assistant", "content": f"God said verse {i}."}]} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lora"
    assert main(["finetune", "sft", str(ckpt), "--data", str(data), "--out", str(out), "--lora_r", "4",
                 "--lora_targets", "[attn.qkv,mlp.gate]", "--max_steps", "4", "--batch_size", "4",
                 "--eval_every", "2", "--eval_batches", "1", "--merge", "true"]) == 0
    merged, _ = load_model(out / "merged")
    base, _ = load_model(ckpt)
    assert merged.cfg.layer_kinds == base.cfg.layer_kinds and merged.cfg.qk_norm == base.cfg.qk_norm
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed and all(".attn.qkv." in k or ".mlp.gate." in k for k in changed)


def test_family_serve_greedy_equals_generate(family_ckpt):
    """The server's slot cache keeps full-length buffers (it shifts rows); generate uses the bounded ring:
    the same greedy text either way, 24 tokens past an 8-token window."""
    import openai

    from llmkit.inference.generate import generate
    from llmkit.serve.app import BackgroundServer, create_app

    _, _, ckpt = family_ckpt
    with BackgroundServer(create_app(str(ckpt), max_batch=2)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.completions.create(model=ckpt.name, prompt=PROMPT, max_tokens=24, temperature=0)
    cli = generate(str(ckpt), prompt=[PROMPT], max_new_tokens=24, temperature=0, top_k=None)[0]
    assert r.usage.completion_tokens == 24
    assert PROMPT + r.choices[0].text == cli


def test_family_evaluate_perplexity_equals_transformers(family_ckpt, tmp_path, bpe_tokenizer, bible_sample):
    _, ref, ckpt = family_ckpt
    text = " ".join(bible_sample[:3])
    ids = bpe_tokenizer.encode(text)[:100]  # one window: fewer tokens than block_size
    (tmp_path / "t.txt").write_text(bpe_tokenizer.decode(ids))
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    x = torch.tensor([bpe_tokenizer.encode((tmp_path / "t.txt").read_text())])
    assert got["n_tokens"] == x.size(1) - 1  # every token but the first is predicted
    with torch.no_grad():
        want = torch.exp(ref(x, labels=x).loss).item()
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)


def test_family_onnx_export_matches_pytorch(family_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from llmkit.interop.commands import onnx

    _, _, ckpt = family_ckpt
    path = onnx(str(ckpt), str(tmp_path / "onnx"))
    model, _ = load_model(ckpt)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for T in (5, 30):  # shorter and longer than the sliding window
        ids = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        mask = torch.ones(2, T, dtype=torch.long)
        mask[0, :3] = 0
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert abs(got[mask.bool().numpy()] - want[mask.bool()].numpy()).max() <= ATOL, T
