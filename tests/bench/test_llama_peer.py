"""The llama.cpp peer in the decode bench: llama-bench's JSON read into tokens/s, and llmkit's ratios to it."""

import json
import stat

import pytest

from llmkit.bench.decode import llama_bench, llama_ratios


def _fake_llama_bench(tmp_path, rows):
    """A stand-in `llama-bench` that prints the JSON rows the real one prints for -p 512 -n N -o json."""
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/bin/sh\ncat <<'EOF'\n" + json.dumps(rows) + "\nEOF\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_llama_bench_rows_become_prefill_and_decode(tmp_path, monkeypatch):
    rows = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 1500.5}, {"n_prompt": 0, "n_gen": 128, "avg_ts": 200.25}]
    monkeypatch.setenv("LLMKIT_LLAMA_BENCH", _fake_llama_bench(tmp_path, rows))
    assert llama_bench("model.gguf", 2, 128) == {"llama_cpp_prefill512_tokens_per_s": 1500.5,
                                                  "llama_cpp_decode_tokens_per_s": 200.25}


def test_llama_bench_absent_or_failing(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMKIT_LLAMA_BENCH", raising=False)
    assert llama_bench("model.gguf", 2, 128) == {}
    monkeypatch.setenv("LLMKIT_LLAMA_BENCH", str(tmp_path / "missing"))
    assert "llama_cpp_error" in llama_bench("model.gguf", 2, 128)


def test_ratios_pair_each_format_with_its_peer():
    r = {"int8_tokens_per_s": 300.0, "int8_native_prefill512_tokens_per_s": 1600.0, "int8_prefill512_tokens_per_s": 1.0,
         "gguf_q4_1_tokens_per_s": 250.0, "gguf_q4_1_native_prefill512_tokens_per_s": None,
         "gguf_q4_1_prefill512_tokens_per_s": 1400.0, "fp32_tokens_per_s": 50.0,
         "llama_cpp_decode_tokens_per_s": 275.0, "llama_cpp_prefill512_tokens_per_s": 1400.0,
         "llama_cpp_q8_0_decode_tokens_per_s": 200.0, "llama_cpp_q8_0_prefill512_tokens_per_s": 1500.0}
    llama_ratios(r)
    assert r["int8_ratio_to_llama_cpp"] == pytest.approx(1.5)
    assert r["int8_prefill512_ratio_to_llama_cpp"] == pytest.approx(1600 / 1500)  # the native prefill, as generate
    assert r["gguf_q4_1_ratio_to_llama_cpp"] == pytest.approx(250 / 275)
    assert r["gguf_q4_1_prefill512_ratio_to_llama_cpp"] == pytest.approx(1.0)  # no native: the forward's
    assert "fp32_ratio_to_llama_cpp" not in r  # no llama.cpp f32 run
