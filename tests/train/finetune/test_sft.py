"""Instruction SFT: prompt tokens masked exactly where the template puts the prompt, packing keeps every
response target, chat data readers (JSONL errors with line numbers, chatterbot-corpus), an end-to-end run
whose validation loss falls (full and LoRA), and `llmkit chat` driven through stdin."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from llmkit.cli import main
from llmkit.data.chat_data import chatterbot_examples, load_chat_data, read_chat_jsonl, write_chat_jsonl
from llmkit.errors import LlmkitError
from llmkit.inference.chat_template import CHATML_TEMPLATE, render_chat
from llmkit.tokenizer import Tokenizer, train_from_iterator
from llmkit.train.finetune.sft import collate, encode_chat, encode_examples, pack_examples

CONVS = [
    [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "The study of thinking machines."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who made you?"},
     {"role": "assistant", "content": "People who write code."}],
    [{"role": "user", "content": "你好吗?"}, {"role": "assistant", "content": "很好，谢谢."}],
]


@pytest.fixture(scope="module")
def chatml_tok(bible_sample) -> Tokenizer:
    """A BPE tokenizer whose ChatML markers are single special tokens, as in SmolLM2."""
    tok = train_from_iterator(bible_sample[:1500] + ["你好吗 很好 谢谢"], "bpe", vocab_size=400,
                              special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _assistant_spans(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Character spans of each assistant answer + its end marker, found by plain string search."""
    spans, at = [], 0
    for m in messages:
        if m["role"] == "assistant":
            head = "<|im_start|>assistant\n"
            start = text.index(head + m["content"] + "<|im_end|>", at) + len(head)
            end = start + len(m["content"]) + len("<|im_end|>\n")
            spans.append((start, end))
            at = end
    return spans


@pytest.mark.parametrize("conv", CONVS, ids=["single", "multi-turn+system", "chinese"])
def test_prompt_tokens_masked_exactly(chatml_tok, conv):
    ids, labels = encode_chat(chatml_tok, conv)
    full = render_chat(chatml_tok, conv, add_generation_prompt=False)
    enc = chatml_tok.tok.encode(full)  # the whole text at once, with character offsets
    assert ids == enc.ids  # segment-wise encoding = whole-text encoding for ChatML with special markers
    spans = _assistant_spans(full, conv)
    for i, (tid, (start, _)) in enumerate(zip(ids, enc.offsets)):
        in_answer = any(a <= start < b for a, b in spans)
        assert labels[i] == (tid if in_answer else -100), f"token {i} {chatml_tok.tok.id_to_token(tid)!r}"
    # the learned text is exactly the answers and their end markers
    learned = chatml_tok.decode([t for t, lab in zip(ids, labels) if lab != -100], skip_special_tokens=False)
    assert learned == "".join(m["content"] + "<|im_end|>\n" for m in conv if m["role"] == "assistant")


def test_masking_with_byte_level_markers(bpe_tokenizer):
    """A tokenizer without ChatML specials spells the markers in bytes; masks still follow the template."""
    ids, labels = encode_chat(bpe_tokenizer, CONVS[1])
    full = render_chat(bpe_tokenizer, CONVS[1], add_generation_prompt=False)
    assert bpe_tokenizer.decode(ids) == full
    prompt_text = bpe_tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "Answer briefly." in prompt_text and "Who made you?" in prompt_text
    assert "Hello!" not in prompt_text and "People who write code." not in prompt_text


def test_collate_shifts_and_pads():
    rows = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10], [-100, 10])]
    b = collate(rows, pad_id=0)
    assert b["x"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert b["y"].tolist() == [[-100, 7, 8], [10, -100, -100]]


def test_packing_keeps_every_response_target(chatml_tok):
    examples, _ = encode_examples(chatml_tok, CONVS * 7, max_len=10_000)
    block = 32
    rows = pack_examples(examples, block)
    assert all(len(r[0]) == block + 1 for r in rows[:-1]) and len(rows[-1][0]) <= block + 1
    stream = [lab for e in examples for lab in e[1]]
    want = sum(lab != -100 for lab in stream[1:])  # every label except the very first token's is a target
    got = sum(int((collate([r], 0)["y"] != -100).sum()) for r in rows)
    assert got == want
    # rows are the stream's windows [k*block, k*block + block + 1) (neighbours share one token: the target of
    # one is the input of the next), minus windows with no response target at all
    flat = [t for e in examples for t in e[0]]
    windows = [(flat[k : k + block + 1], stream[k : k + block + 1]) for k in range(0, len(flat) - 1, block)]
    assert rows == [w for w in windows if any(lab != -100 for lab in w[1][1:])]
    assert len(rows) < len(windows)  # this data does have prompt-only windows, which are skipped


def test_truncation_drops_examples_without_answer(chatml_tok):
    kept, truncated = encode_examples(chatml_tok, CONVS, max_len=8)  # too short to reach any answer
    assert truncated == 3 and kept == []


# ----------------------------------------------------------------------------------------------- data


def test_jsonl_formats_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "response": "4", "system": "Be exact."}) + "\n\n"
                    + json.dumps({"messages": CONVS[1] + [{"role": "user", "content": "dangling"}]}) + "\n",
                    encoding="utf-8")
    ex = read_chat_jsonl(good)
    assert ex[0] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]
    assert ex[1] == CONVS[1]  # the trailing unanswered user turn is dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "a", \n',
                   encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"bad\.jsonl:3: malformed JSON"):
        read_chat_jsonl(bad)
    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"question": "a", "answer": "b"}\n', encoding="utf-8")
    with pytest.raises(LlmkitError, match=r"keys\.jsonl:1: missing keys.*answer"):
        read_chat_jsonl(keys)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(LlmkitError, match="empty"):
        read_chat_jsonl(tmp_path / "empty.jsonl")


def test_chatterbot_corpus():
    pytest.importorskip("yaml")
    en, zh = chatterbot_examples("chatterbot-en"), chatterbot_examples("chatterbot-zh")
    # 2,026 English entries, one of which is a bare string rather than a list of turns; 467 Chinese
    assert (len(en), len(zh)) == (2025, 467)
    assert en[0] == [{"role": "user", "content": "What is AI?"},
                     {"role": "assistant", "content": "Artificial Intelligence is the branch of engineering and "
                      "science devoted to constructing machines that think."}]
    assert zh[0][0] == {"role": "user", "content": "什么是ai"}
    for ex in en + zh:
        assert ex[-1]["role"] == "assistant"
        assert [m["role"] for m in ex] == ["user", "assistant"] * (len(ex) // 2)
    assert len(chatterbot_examples("chatterbot", system="Be kind.")) == 2025 + 467
    with pytest.raises(LlmkitError, match="chatterbot-en"):
        load_chat_data("chatterbot-xx")


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """12 short chatterbot Q/A pairs: small enough to memorise in a few dozen steps."""
    ex = [m for m in chatterbot_examples("chatterbot-en") if len(m) == 2 and len(m[1]["content"]) < 40][:12]
    return write_chat_jsonl(ex, tmp_path_factory.mktemp("sft") / "qa.jsonl")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, bpe_tokenizer):
    """A 2-layer, 64-wide GPT (vocab 512): big enough to memorise a dozen answers, small enough for CI."""
    from llmkit.models.build import build_model
    from llmkit.models.checkpoint import save_checkpoint
    from llmkit.models.config import preset

    torch.manual_seed(0)
    cfg = preset("gpt2-tiny", vocab_size=bpe_tokenizer.vocab_size, n_layer=2, n_head=2, d_model=64, block_size=192)
    return save_checkpoint(tmp_path_factory.mktemp("small") / "gpt", build_model(cfg), cfg, bpe_tokenizer)


def _run(args: list[str]) -> int:
    return main(["finetune", "sft", *args, "--log_every", "100", "--eval_every", "0", "--batch_size", "6"])


def test_sft_full_finetune_learns(small_ckpt, qa_file, tmp_path):
    out = tmp_path / "full"
    assert _run([str(small_ckpt), "--data", str(qa_file), "--val_data", str(qa_file), "--out", str(out),
                 "--max_steps", "25", "--lr", "3e-3", "--warmup_steps", "0"]) == 0
    s = json.loads((out / "sft_summary.json").read_text())
    assert s["val_after"]["val_loss"] < 0.65 * s["val_before"]["val_loss"], s  # measured 6.24 -> 3.61 in 20 steps
    assert (out / "model.safetensors").exists() and json.loads((out / "config.json").read_text())["task"] == "sft"


def test_sft_lora_packed_then_merge_and_chat(small_ckpt, qa_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"
    assert _run([str(small_ckpt), "--data", str(qa_file), "--val_data", str(qa_file), "--out", str(out),
                 "--lora_r", "8", "--lora_alpha", "16", "--lora_targets", "[attn.qkv,attn.proj,mlp.fc]",
                 "--pack", "true", "--max_steps", "20", "--lr", "1e-2", "--warmup_steps", "0",
                 "--merge", "true"]) == 0
    s = json.loads((out / "sft_summary.json").read_text())
    # adapters on a random base (frozen, tied output layer) learn slowly: measured 6.24 -> 5.73 in 20 steps
    assert s["val_after"]["val_loss"] < s["val_before"]["val_loss"] - 0.25, s
    assert s["trainable_params"] < 0.1 * s["all_params"]
    assert not (out / "model.safetensors").exists()  # the adapter alone
    # base + adapter (what `llmkit chat ADAPTER` loads) == the merged checkpoint
    from llmkit.apps.chat import load_chat_model
    from llmkit.models.load import load_model

    via_adapter, tok, meta = load_chat_model(str(out))
    merged, _ = load_model(out / "merged")
    ids = torch.tensor([tok.encode(render_chat(tok, [{"role": "user", "content": "What is AI?"}]))])
    torch.testing.assert_close(via_adapter(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)
    # and chat through stdin, greedy: each reply equals generating from the rendered history directly
    from llmkit.apps.chat import chat
    from llmkit.inference.generate import generate_text
    from llmkit.inference.sampling import SamplingParams

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is AI?\n/reset\nHello\nHow are you?\n/exit\nignored\n"))
    capsys.readouterr()
    history = chat(str(out), temperature=0, max_new_tokens=8, repetition_penalty=1.0)
    printed = capsys.readouterr().out
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hello", "How are you?"]
    assert "(history cleared)" in printed and "ignored" not in printed
    from llmkit.inference.chat_template import chat_stop_strings

    params = SamplingParams(8, 0.0, None, None, 1.0, chat_stop_strings(tok))
    replies = []
    for msgs in ([{"role": "user", "content": "What is AI?"}], history[:1], history[:3]):
        replies.append(generate_text(merged, tok, [render_chat(tok, msgs)], params)[0].text.strip())
    assert [m["content"] for m in history if m["role"] == "assistant"] == replies[1:]
    assert printed.split("(history cleared)")[0].strip() == replies[0]


@pytest.mark.parametrize("args,expect", [
    (["--data", "{bad}", "--lora_r", "4", "--lora_targets", "[attn.c_attn]"], "unknown LoRA target 'attn.c_attn'"),
    (["--data", "chatterbot-xx"], "unknown chat data set"),
])
def test_sft_bad_input_exit_2(tiny_ckpt, qa_file, tmp_path, capsys, args, expect):
    args = [a.replace("{bad}", str(qa_file)) for a in args]
    assert _run([str(tiny_ckpt), *args, "--out", str(tmp_path / "o"), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sft_malformed_line_cli(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n', encoding="utf-8")
    assert _run([str(tiny_ckpt), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_chat_history_drops_oldest_turns(bpe_tokenizer):
    from llmkit.apps.chat import fit_history

    msgs = [{"role": "system", "content": "Be kind."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last question"})
    n_all = len(bpe_tokenizer.encode(render_chat(bpe_tokenizer, msgs)))
    prompt, kept = fit_history(bpe_tokenizer, msgs, n_all)
    assert kept == msgs
    prompt, kept = fit_history(bpe_tokenizer, msgs, n_all - 1)  # one token too many: drop the oldest pair
    assert kept == msgs[:1] + msgs[3:]
    assert len(bpe_tokenizer.encode(prompt)) <= n_all - 1 and prompt == render_chat(bpe_tokenizer, kept)
    n_min = len(bpe_tokenizer.encode(render_chat(bpe_tokenizer, [msgs[0], msgs[-1]])))
    _, kept = fit_history(bpe_tokenizer, msgs, n_min)
    assert kept == [msgs[0], msgs[-1]]  # the system prompt and the new message always stay
    with pytest.raises(LlmkitError, match="shorter message"):
        fit_history(bpe_tokenizer, msgs, n_min - 1)


def test_sft_lora_resume_is_exact(small_ckpt, qa_file, tmp_path):
    """3 steps + resume for 3 more == 6 uninterrupted steps: the same adapter, bit for bit."""
    from safetensors.torch import load_file

    common = [str(small_ckpt), "--data", str(qa_file), "--max_steps", "6", "--lr", "1e-2", "--batch_size", "4",
              "--eval_every", "0", "--val_fraction", "0", "--warmup_steps", "2", "--lora_r", "4"]
    assert main(["finetune", "sft", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["finetune", "sft", *common, "--out", str(tmp_path / "b"), "--stop_at", "3"]) == 0
    assert main(["finetune", "sft", *common, "--out", str(tmp_path / "b"), "--resume", "true"]) == 0
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))  # trained, not the zero init


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's template: adds a default system prompt when there is none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("conv", [CONVS[0], [{"role": "assistant", "content": "How can I help?"}, *CONVS[0]]],
                         ids=["user-first", "assistant-first"])
def test_masking_with_default_system_template(chatml_tok, conv):
    tok = Tokenizer(chatml_tok.tok, chatml_tok.specials, SMOLLM2_TEMPLATE)
    ids, labels = encode_chat(tok, conv)
    full = render_chat(tok, conv, add_generation_prompt=False)
    assert full.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    enc = tok.tok.encode(full)
    assert ids == enc.ids
    spans = _assistant_spans(full, conv)
    expected = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(enc.ids, enc.offsets)]
    assert labels == expected
