"""`make fuzz`: schemathesis against a live `llmkit serve` (tiny random-weight checkpoint, API key set):
every check (`--checks all`) on cases generated from the server's own /openapi.json; prints the number of
cases and failures and exits non-zero on any failure. Not part of `make test` (minutes of CPU).

Two rules no OpenAPI spec can state are kept out of the generated valid cases, so that every other 400 on
a valid case counts as the failure it is: prompts longer than the context (the checkpoint here has a
context longer than any text the fuzzer writes) and a named tool_choice outside the request's tools
(bench/fuzz_hooks.py). The server answers both 400, as OpenAI does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from llmkit.bench.serve import tiny_checkpoint
from llmkit.serve.app import BackgroundServer, Limits, create_app

KEY = "fuzz-key"
CONTEXT = 8192


def run(max_examples: int = 60, seed: int = 0, extra: list[str] | None = None) -> tuple[int, int, str]:
    """(test cases generated, failures, schemathesis' report text)."""
    with tempfile.TemporaryDirectory() as tmp:
        # a context longer than any text the fuzzer writes: a too long prompt is a 400 the spec cannot state
        # (JSON Schema counts characters, not tokens), so a schema-valid case must never reach it
        ckpt = tiny_checkpoint(Path(tmp) / "tiny", block_size=CONTEXT)
        app = create_app(str(ckpt), api_key=KEY, max_batch=4, max_context=CONTEXT,
                         limits=Limits(max_tokens=16, max_concurrent=64, max_body_bytes=200_000))
        with BackgroundServer(app) as s:
            exe = Path(sys.executable).with_name("schemathesis")
            cmd = [str(exe), "run", f"{s.url}/openapi.json", "--checks", "all", "-n", str(max_examples),
                   "--header", f"Authorization: Bearer {KEY}", "--generation-deterministic",
                   "--seed", str(seed), "--no-color", *(extra or [])]
            env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "SCHEMATHESIS_HOOKS": "llmkit.bench.fuzz_hooks",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    text = out.stdout + out.stderr
    cases = sum(int(x) for x in re.findall(r"(\d+) generated", text)) or \
        sum(int(x) for x in re.findall(r"Test cases:\s*(\d+)", text))
    failures = 0 if out.returncode == 0 else max(1, len(re.findall(r"^\s*\d+\. ", text, re.M)))
    return cases, failures, text


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    cases, failures, text = run(n)
    print(text[-6000:])
    print(f"schemathesis: {cases} test cases, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
