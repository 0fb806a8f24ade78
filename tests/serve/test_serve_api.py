"""The OpenAI-compatible HTTP API, driven by the official `openai` client and raw HTTP (httpx)."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.errors import LlmkitError
from llmkit.inference.generate import generate, generate_text
from llmkit.inference.sampling import SamplingParams
from llmkit.models.load import load
from llmkit.serve.app import BackgroundServer, Limits, create_app

KEY = "test-key"
PROMPT = "In the beginning God created"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    app = create_app(str(tiny_ckpt), api_key=KEY, max_batch=4,
                     limits=Limits(max_body_bytes=20_000, max_tokens=100, max_concurrent=12,
                                 max_prompt_tokens=90))
    with BackgroundServer(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_tok(tiny_ckpt):
    return load(tiny_ckpt)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**headers, "Content-Type": "application/json"}, **kw)


def sse_lines(r: httpx.Response) -> list[str]:
    return [line for line in r.text.split("\n") if line.startswith("data: ")]


# ----------------------------------------------------------------------------------------------- happy paths


def test_models(client, tiny_ckpt):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_ckpt.name]
    assert client.models.retrieve(tiny_ckpt.name).id == tiny_ckpt.name


def test_greedy_completion_equals_llmkit_generate(client, tiny_ckpt, model_tok, capsys):
    """The server's greedy text is what `llmkit generate --temperature 0` prints; usage counts are exact."""
    _, tok = model_tok
    r = client.completions.create(model=tiny_ckpt.name, prompt=PROMPT, max_tokens=24, temperature=0)
    cli = generate(str(tiny_ckpt), prompt=[PROMPT], max_new_tokens=24, temperature=0, top_k=None)[0]
    capsys.readouterr()
    assert PROMPT + r.choices[0].text == cli
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_prompt_list_n_and_seed(client, model_tok):
    _, tok = model_tok
    prompts = ["Jesus wept", "The LORD said"]
    r = client.completions.create(model=None, prompt=prompts, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    again = client.completions.create(model=None, prompt=prompts, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible


def test_stop_strings(client, model_tok):
    model, tok = model_tok
    full = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    r = client.completions.create(model=None, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    ref = generate_text(model, tok, [PROMPT], SamplingParams(30, temperature=0, stop=[stop, "zzzz"]))[0]
    assert r.choices[0].text == ref.text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_match_a_full_forward(client, model_tok):
    """Greedy tokens and their log-probabilities equal a plain loop of full forwards (no cache, no batch)."""
    model, tok = model_tok
    r = client.completions.create(model=None, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok.encode(PROMPT)
    tokens, logps, tops = [], [], []
    with torch.no_grad():
        for _ in range(6):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(logp.argmax())
            tokens.append(tok.decode([t], skip_special_tokens=False))
            logps.append(float(logp[t]))
            tops.append(sorted(logp.topk(3).values.tolist(), reverse=True))
            ids.append(t)
    assert lp.tokens == tokens
    assert lp.token_logprobs == pytest.approx(logps, abs=1e-4)
    assert [sorted(d.values(), reverse=True) for d in lp.top_logprobs] == [pytest.approx(x, abs=1e-4) for x in tops]
    assert lp.text_offset == [sum(len(x) for x in tokens[:i]) for i in range(6)]


def test_chat_and_streaming_chat_agree(client, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the light?"}]
    whole = client.chat.completions.create(model=None, messages=msgs, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=None, messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    raw = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert sse_lines(raw)[-1] == "data: [DONE]"


def test_embeddings(client, model_tok):
    model, tok = model_tok
    texts = ["In the beginning", "Jesus wept and the people saw it"]
    r = client.embeddings.create(model=None, input=texts)
    got = torch.tensor([d.embedding for d in r.data])
    with torch.no_grad():  # mean pooling + L2, computed directly per text
        ref = torch.stack([model.hidden(torch.tensor([tok.encode(t)]))[0].mean(0) for t in texts])
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    b64 = client.embeddings.create(model=None, input=texts[0], encoding_format="base64").data[0].embedding
    floats = struct.unpack(f"<{len(base64.b64decode(b64)) // 4}f", base64.b64decode(b64))  # little-endian float32
    assert floats == pytest.approx(got[0].tolist(), abs=1e-6)


def test_auth(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health and the page need no key
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "llmkit playground" in page.text


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 101}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "word " * 200}, 400, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 30_000}, 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {}, 400, "input"),
    ("/v1/nowhere", {}, 404, None),
])
def test_bad_input_gets_openai_error_shape(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert (err["param"] or "").startswith(param)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_prompt_over_context_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=None, prompt="word " * 200, max_tokens=5)
    assert e.value.code == "context_length_exceeded"


def test_prompt_token_limit(server):
    ok = post(server, "/v1/completions", {"prompt": [65] * 90, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 90
    r = post(server, "/v1/completions", {"prompt": [65] * 91, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "90" in r.json()["error"]["message"]


def test_too_many_concurrent_sequences_is_429(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "n": 13, "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)
_fields = {"/v1/completions": ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                               "logprobs", "model", "echo", "top_k", "repetition_penalty"],
           "/v1/chat/completions": ["messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream",
                                    "stream_options", "logprobs", "top_logprobs", "model"],
           "/v1/embeddings": ["input", "model", "encoding_format", "dimensions"]}
_small_ints = st.integers(-2, 4)
_values = st.one_of(_json, _small_ints, st.just("In the beginning"), st.just([{"role": "user", "content": "hi"}]),
                    st.floats(-1, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.sampled_from(sorted(_fields)), data=st.data())
def test_fuzz_no_5xx(server, path, data):
    """Random bodies built from the real field names and odd values: never a 5xx, never a dead server."""
    keys = data.draw(st.lists(st.sampled_from(_fields[path]), max_size=5, unique=True))
    body = {k: data.draw(_values) for k in keys}
    if isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool):
        body["max_tokens"] = min(body["max_tokens"], 4)  # keep each example fast
    else:
        body["max_tokens"] = 3
    r = post(server, path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------------------------- load, cancel, metrics


def test_load_and_disconnect_free_slots(server):
    """8 streaming clients for 3 s: every stream completes with [DONE]; a dropped stream frees its slot."""
    engine = server.app.state.server.engine
    aborted_before = engine.stats["aborted"]
    errors: list[str] = []
    done = [0]
    end = time.monotonic() + 3

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < end:
                body = {"prompt": f"Verse {k}", "max_tokens": 12, "stream": True, "temperature": 0.7}
                r = http.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
                if r.status_code != 200 or sse_lines(r)[-1] != "data: [DONE]":
                    errors.append(f"{r.status_code} {r.text[:200]}")
                done[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and done[0] >= 8
    # a client that disconnects mid-stream: its sequence is cancelled, not generated to the end
    with httpx.Client(timeout=60) as http:
        body = {"prompt": "In", "max_tokens": 100, "stream": True, "temperature": 0}
        with http.stream("POST", server.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            next(r.iter_lines())
    deadline = time.monotonic() + 20
    while engine.stats["aborted"] == aborted_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats["aborted"] > aborted_before
    # a non-streaming client that gives up (read timeout) is cancelled too
    aborted_before = engine.stats["aborted"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "In", "max_tokens": 100, "temperature": 0},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(60, read=0.05))
    deadline = time.monotonic() + 20
    while engine.stats["aborted"] == aborted_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats["aborted"] > aborted_before
    while engine.n_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.n_running == 0 and httpx.get(server.url + "/health").status_code == 200


def test_metrics(server):
    post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['llmkit_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["llmkit_generation_tokens_total"] >= 3
    assert samples["llmkit_prompt_tokens_total"] >= 1
    assert samples["llmkit_time_to_first_token_seconds_count"] >= 1
    assert samples['llmkit_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        samples["llmkit_time_to_first_token_seconds_count"]
    assert "llmkit_queue_depth" in samples and "llmkit_tokens_per_second" in samples


def test_embeddings_token_ids_equal_text(client, model_tok):
    _, tok = model_tok
    text = "Jesus wept"
    by_text = client.embeddings.create(model=None, input=text).data[0].embedding
    by_ids = client.embeddings.create(model=None, input=[tok.encode(text)]).data[0].embedding
    assert by_ids == pytest.approx(by_text, abs=1e-5)


def test_encoder_checkpoint_serves_embeddings_only(bible_sample):
    """A BERT-style encoder: embeddings work (unit vectors, [CLS]/[SEP] added), generation is a clear 400."""
    from fastapi.testclient import TestClient

    from llmkit.models.build import build_model
    from llmkit.models.config import preset
    from llmkit.tokenizer import train_from_iterator

    tok = train_from_iterator(bible_sample[:500], "wordpiece", vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = build_model(preset("bert-tiny", vocab_size=tok.vocab_size)).eval()
    with TestClient(create_app((model, tok), model_name="bert")) as http:
        r = http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_cannot_generate"
        r = http.post("/v1/embeddings", json={"input": ["In the beginning", "God"], "model": "bert"})
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    ids = tok.encode("In the beginning", add_special_tokens=True)
    assert tok.decode(ids[:1], skip_special_tokens=False) == "[CLS]"
    with torch.no_grad():
        ref = model.hidden(torch.tensor([ids]))[0].mean(0)
    torch.testing.assert_close(got[0], ref / ref.norm(), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, model.cfg.d_model)


def test_max_context_bounds_cache_and_requests(model_tok):
    """--max_context serves a shorter context than the model's: smaller slot cache, limits follow it."""
    from fastapi.testclient import TestClient

    model, tok = model_tok
    app = create_app((model, tok), max_batch=2, max_context=32, stream_interval=0, prefill_chunk=8)
    engine = app.state.server.engine
    assert engine.cache.max_len == 32 + 16 and engine.cache.k[0].shape[0] == 2
    assert engine.prefill_chunk == 8 and engine._chunk_len(2) == 8  # --prefill_chunk fixes the chunk size
    with pytest.raises(LlmkitError, match="prefill_chunk must be at least 1"):
        create_app((model, tok), prefill_chunk=0)
    with TestClient(app) as http:
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 32
        r = http.post("/v1/completions", json={"prompt": [65] * 32})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = http.post("/v1/completions", json={"prompt": [65] * 30, "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200
        used, reason = r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]
        assert (used == 2 and reason == "length") or (used <= 2 and reason == "stop")  # 30 + 2 = the context
