"""Attention maps: recomputed probabilities reproduce the model's SDPA output, and a copy head is found."""

from __future__ import annotations

import pytest
import torch

from llmkit.cli import main
from llmkit.explain.attention import attention_maps
from llmkit.models.build import build_model
from llmkit.models.config import preset


def _check_reproduces(model, idx, attention_mask=None, token_type_ids=None) -> None:
    """proj(probs @ V) from our maps must equal each attention module's real output (SDPA)."""
    outs = {}
    handles = [b.attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
               for i, b in enumerate(model.blocks)]
    try:
        probs, values = attention_maps(model, idx, attention_mask, token_type_ids, return_values=True)
    finally:
        for h in handles:
            h.remove()
    B, T = idx.shape
    for i, (p, v) in enumerate(zip(probs, values)):
        assert p.shape == (B, model.cfg.n_head, T, T)
        torch.testing.assert_close(p.sum(-1), torch.ones(B, model.cfg.n_head, T), atol=1e-5, rtol=0)
        y = (p @ v.float()).transpose(1, 2).reshape(B, T, -1)
        mine = model.blocks[i].attn.proj(y)
        if attention_mask is not None:  # padded query rows are garbage by design; compare real tokens
            keep = attention_mask.bool()
            mine, ref = mine[keep], outs[i][keep]
        else:
            ref = outs[i]
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)


# Gemma-style switches on llama-tiny: qk-norm, (1 + w) norms, query scale, soft-capping, a local layer (window 4)
GEMMA_LIKE = dict(qk_norm=True, norm_unit_offset=True, post_norms=True, embed_scale=True, attn_scale=0.3,
                  attn_softcap=5.0, sliding_window=4, layer_types=["local", "global"], rope_local_theta=100.0)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "gemma-like"])
def test_probs_reproduce_sdpa_output(name: str) -> None:
    torch.manual_seed(0)
    if name == "gemma-like":
        cfg = preset("llama-tiny", vocab_size=97, block_size=32, n_layer=2, **GEMMA_LIKE)
    else:
        cfg = preset(name, vocab_size=97, block_size=32, n_layer=2)
    model = build_model(cfg).eval()
    with torch.no_grad():  # random init is almost uniform attention; sharpen it so the check means something
        for b in model.blocks:
            b.attn.qkv.weight.mul_(8.0)
    idx = torch.randint(0, 97, (2, 11))
    _check_reproduces(model, idx)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding (decoder) / padding (encoder): no probability on padded keys
    _check_reproduces(model, idx, attention_mask=mask)
    probs = attention_maps(model, idx, mask)
    for p in probs:
        assert float(p[1, :, 4:, :4].abs().max()) == 0.0
        if cfg.causal:
            assert float(p[0].triu(1).abs().max()) == 0.0  # nothing attends to the future


N, V, SEP = 8, 24, 0  # copy task: a_0..a_7 SEP a_0..a_7, tokens 1..23


def _copy_batch(g: torch.Generator, B: int) -> torch.Tensor:
    a = torch.randint(1, V, (B, N), generator=g)
    return torch.cat([a, torch.full((B, 1), SEP), a], 1)  # (B, 2N+1)


@pytest.fixture(scope="module")
def copy_model():
    """A 1-layer decoder trained 150 steps to copy the first half after SEP (~2 s on one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only fight over the shared cores
    try:
        torch.manual_seed(0)
        cfg = preset("gpt2-tiny", vocab_size=V, block_size=32, n_layer=1, n_head=2, d_model=64)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(150):
            seq = _copy_batch(g, 32)
            tgt = seq[:, 1:].clone()
            tgt[:, : N - 1] = -100  # the first half is random: loss only where copying is possible
            loss = model(seq[:, :-1], tgt).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_copy_head_attends_to_the_token_it_copies(copy_model) -> None:
    g = torch.Generator().manual_seed(123)
    seq = _copy_batch(g, 256)
    with torch.no_grad():
        pred = copy_model(seq[:, :-1]).logits.argmax(-1)[:, N:]  # predictions of a_0..a_7
    acc = float((pred == seq[:, N + 1:]).float().mean())
    assert acc > 0.95, f"copy model did not learn the task (accuracy {acc:.3f})"
    probs = attention_maps(copy_model, seq[:, :-1])
    # the query at position N+i predicts a_i, which sits at key position i = query - N
    q = torch.arange(N, 2 * N)
    best = 0.0
    where = None
    for li, p in enumerate(probs):
        on_source = p[:, :, q, q - N].mean(dim=(0, 2))  # (nh,) mean probability on the copied token
        h = int(on_source.argmax())
        if float(on_source[h]) > best:
            best, where = float(on_source[h]), (li, h)
    assert best > 0.5, f"no head attends to the copied token (best mean probability {best:.3f} at {where})"
    # and that head's single most-attended key is the copied token for most queries
    p = probs[where[0]][:, where[1]]  # (B, T, T)
    hit = float((p[:, q].argmax(-1) == (q - N)).float().mean())
    assert hit > 0.9, f"copy head {where} argmax hits the source only {hit:.2f} of the time"


def test_cli_writes_png_and_html(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "attn"
    rc = main(["explain", "attention", str(tiny_ckpt), "--text", "In the beginning God created",
               "--layer", "1", "--head", "2", "--out", str(out)])
    assert rc == 0
    png = (out / "attention_L1_H2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "attention.html").read_text(encoding="utf-8")
    assert page.count("<img") == 4 and "layer 3, all heads" in page  # gpt2-tiny: one row image per layer
    assert sorted(p.name for p in out.iterdir()) == ["attention.html", "attention_L1_H2.png"]  # no temp files left


@pytest.mark.parametrize("args,msg", [(["--layer", "9"], "layer 9 does not exist"),
                                      (["--head", "-1"], "head -1 does not exist"),
                                      (["--text", "  "], "text is empty")])
def test_cli_bad_input_is_one_line(tiny_ckpt, tmp_path, capsys, args, msg) -> None:
    base = ["explain", "attention", str(tiny_ckpt), "--text", "In the beginning", "--out", str(tmp_path / "a")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
