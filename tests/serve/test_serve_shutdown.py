"""`llmkit serve` as a real process: binds 127.0.0.1 by default, and SIGTERM lets a running stream finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port: int) -> set[str] | None:
    """IPv4 addresses with a socket listening on `port`, from /proc/net/tcp (None where that file is absent)."""
    path = "/proc/net/tcp"
    if not os.path.exists(path):
        return None
    out = set()
    with open(path) as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # 0A = LISTEN
                out.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]))
    return out


@pytest.fixture
def served(tiny_ckpt):
    port = _free_port()
    code = "import sys; from llmkit.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(tiny_ckpt), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LLMKIT_API_KEY": "k"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield proc, url, port
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_sigterm_finishes_running_stream_then_exits(served):
    proc, url, port = served
    listening = _listen_addresses(port)
    if listening is not None:  # the default --host binds the loopback interface only
        assert listening == {"127.0.0.1"}
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "In the beginning", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer k"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    rc = proc.wait(60)
    out = proc.stdout.read()
    assert rc == 0, out
    assert lines[-1] == "data: [DONE]"  # the in-flight request was allowed to finish
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "Traceback" not in out and f"Uvicorn running on http://127.0.0.1:{port}" in out
    with pytest.raises(httpx.HTTPError):  # and nothing listens any more
        httpx.get(url + "/health", timeout=2)
