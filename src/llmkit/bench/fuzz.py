"""`make fuzz`: schemathesis against a live `llmkit serve` (tiny random-weight checkpoint, API key set):
every check (`--checks all`) on cases generated from the server's own /openapi.json; prints the number of
cases and failures and exits non-zero on any failure. Not part of `make test` (minutes of CPU).
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


def run(max_examples: int = 60, seed: int = 0, extra: list[str] | None = None) -> tuple[int, int, str]:
    """(test cases generated, failures, schemathesis' report text)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp) / "tiny")
        app = create_app(str(ckpt), api_key=KEY, max_batch=4,
                         limits=Limits(max_tokens=16, max_concurrent=64, max_body_bytes=200_000))
        with BackgroundServer(app) as s:
            exe = Path(sys.executable).with_name("schemathesis")
            cmd = [str(exe), "run", f"{s.url}/openapi.json", "--checks", "all", "-n", str(max_examples),
                   "--header", f"Authorization: Bearer {KEY}", "--generation-deterministic",
                   "--seed", str(seed), "--no-color", *(extra or [])]
            env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false"}
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
