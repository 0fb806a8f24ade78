"""The layer contract (pyproject.toml [tool.importlinter]) holds: a module never imports a higher layer and
no package's modules import in a circle, function-level imports included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: `pip install -e '.[test]'` installs import-linter")
    return found


def test_layer_and_cycle_contracts_hold() -> None:
    r = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_broken_layer_is_reported(tmp_path: Path) -> None:
    """The contract can fail: a config whose layers are upside down is reported broken."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    start = text.index("[tool.importlinter]")
    body = text[start:]
    # errors moved from the bottom layer to the top: every module that raises LlmkitError now reaches up
    flipped = body.replace('  "errors",\n]', ']').replace('layers = [\n  "cli",', 'layers = [\n  "errors",\n  "cli",')
    assert flipped != body
    cfg = tmp_path / "importlinter.toml"
    cfg.write_text(flipped, encoding="utf-8")
    r = subprocess.run([_lint_imports(), "--no-cache", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "is not allowed to import llmkit.errors" in r.stdout
