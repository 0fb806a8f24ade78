"""Server hardening: the API key guards /metrics and the docs too, 405 answers carry Allow, every response
has a request id and a crash is logged with its traceback under it (the client sees none), embeddings count
against --max_concurrent, and the OpenAPI spec documents the error answers the server really gives."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from llmkit.inference.tools import prepare_messages
from llmkit.serve.app import BackgroundServer, Limits, create_app

KEY = "k"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    app = create_app(str(tiny_ckpt), api_key=KEY, max_batch=2, limits=Limits(max_concurrent=2))
    with BackgroundServer(app) as s:
        s.app = app
        yield s


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/openapi.json"])
def test_pages_need_the_key_unless_opened(server, tiny_ckpt, path):
    assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_open_pages_flag(tiny_ckpt):
    with BackgroundServer(create_app(str(tiny_ckpt), api_key=KEY, open_pages=True)) as s:
        assert httpx.get(s.url + "/openapi.json").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401


def test_405_has_allow_and_every_answer_a_request_id(server):
    r = httpx.get(server.url + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    assert r.headers["x-request-id"].startswith("req-")
    r = httpx.get(server.url + "/health", headers={"x-request-id": "mine-42"})
    assert r.headers["x-request-id"] == "mine-42"


def test_crash_is_logged_with_traceback_under_the_request_id(server, caplog, monkeypatch):
    def boom(_body):
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(server.app.state.server, "check_request", boom)
    with caplog.at_level(logging.ERROR, logger="llmkit.serve"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=AUTH)
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and rid in r.json()["error"]["message"]
    assert "Traceback" not in r.text and "secret detail" not in r.text
    rec = [x for x in caplog.records if rid in x.getMessage()]
    assert rec and rec[0].exc_info is not None and rec[0].exc_info[0] is ZeroDivisionError


def test_embeddings_count_against_max_concurrent(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["a", "b", "c"]}, headers=AUTH)
    assert r.status_code == 429
    assert httpx.post(server.url + "/v1/embeddings", json={"input": ["a", "b"]}, headers=AUTH).status_code == 200


def test_openapi_documents_the_real_errors(server):
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize"):
        codes = set(spec["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "429"} <= codes and "422" not in codes, path


def test_spec_states_what_the_server_checks(server):
    """The rules schemathesis found the spec silent on: each is in the spec and enforced as it says."""
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    srv = server.app.state.server
    V = srv.model.cfg.vocab_size
    schemas = spec["components"]["schemas"]
    bias = next(a for a in schemas["ChatCompletionRequest"]["properties"]["logit_bias"]["anyOf"] if "patternProperties" in a)
    pattern = next(iter(bias["patternProperties"]))
    assert bias["additionalProperties"] is False
    assert re.fullmatch(pattern, str(V - 1)) and not re.fullmatch(pattern, str(V)) and not re.fullmatch(pattern, "07")
    assert schemas["ChatCompletionRequest"]["then"]["required"] == ["tools"]
    model_id = spec["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["schema"]
    assert model_id["enum"] == [srv.name]

    def chat(**kw):
        return httpx.post(server.url + "/v1/chat/completions", headers=AUTH,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw})

    for bad in ("07", str(V), "x"):
        assert chat(logit_bias={bad: 1}).json()["error"]["param"].startswith("logit_bias")
    assert chat(logit_bias={str(V - 1): 1}).status_code == 200
    r = chat(max_tokens=10**6, max_completion_tokens=1)  # the unused one is still bounded
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert chat(tool_choice="auto").status_code == 400  # nothing to choose from
    assert chat(tool_choice="none").status_code == 200
    # a model's broken call sent back (arguments not JSON) is rendered as the text it is, as OpenAI accepts it
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    msgs, _ = prepare_messages(srv.tok, [{"role": "assistant", "content": "", "tool_calls": [call]}], None)
    assert json.loads(msgs[0]["content"].split("\n")[1]) == {"name": "f", "arguments": "{not json"}


def _fail_after(monkeypatch, engine, good_steps: int) -> None:
    """The engine's decode step raises after `good_steps` steps (a bug hit mid-generation)."""
    real, calls = type(engine)._step.__get__(engine), [0]

    def step():
        calls[0] += 1
        if calls[0] > good_steps:
            raise RuntimeError("secret detail")
        real()

    monkeypatch.setattr(engine, "_step", step)


def test_error_after_the_stream_started_is_an_error_event(server, caplog, monkeypatch):
    """200 and chunks are out when the engine fails: the client gets `data: {"error": {..., request_id}}` then
    [DONE] (the official client raises it), and the log has the traceback under that request id."""
    import openai

    srv = server.app.state.server
    eos = {str(srv.tok.eos_id): -100} if srv.tok.eos_id is not None else {}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    _fail_after(monkeypatch, srv.engine, 3)
    got = []
    with caplog.at_level(logging.INFO, logger="llmkit.serve"), pytest.raises(openai.APIError) as err:
        for chunk in client.completions.create(model=srv.name, prompt="In the beginning", max_tokens=20,
                                               temperature=0, stream=True, extra_body={"logit_bias": eos}):
            got.append(chunk.choices[0].text)
    assert got and "".join(got)  # text was streamed before the failure
    body = err.value.body
    rid = body["request_id"]
    assert body["type"] == "server_error" and rid in body["message"]
    assert "Traceback" not in str(body) and "secret detail" not in str(body)
    rec = [x for x in caplog.records if rid in x.getMessage() and x.exc_info]  # the engine's own traceback
    assert rec and rec[0].exc_info[0] is RuntimeError and str(rec[0].exc_info[1]) == "secret detail"

    _fail_after(monkeypatch, srv.engine, 2)  # chat, read raw: chunks, the error event, [DONE], in that order
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True,
                            "logit_bias": eos}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "choices" in json.loads(events[0])
    err = json.loads(events[-2])["error"]
    assert err["request_id"] == r.headers["x-request-id"] and err["type"] == "server_error"
    assert "secret detail" not in "".join(events)
    monkeypatch.undo()
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      headers=AUTH).status_code == 200  # the server goes on
