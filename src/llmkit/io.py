"""All-or-nothing outputs, the only place that writes them: a file or folder is built beside its target, then
swapped in with a rename.

A crash mid-write leaves either the old folder or the new one (the old one survives as `.NAME.old`
between the two renames, and loaders fall back to it), never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError


@contextmanager
def atomic_folder(out: str | Path, carry_over: bool = False, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `out`, on any error it is removed and `out` is untouched.

    carry_over: copy files of the existing `out` that the new folder does not write (e.g. metrics.jsonl
    and loss.png beside a checkpoint), except the names in `skip`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"{out} is a file; give a folder path for the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should read like any folder the user makes
    try:
        yield tmp
        if carry_over and out.exists():
            written = {p.name for p in tmp.iterdir()}
            for p in out.iterdir():
                if p.is_file() and p.name not in written and p.name not in skip:
                    shutil.copy2(p, tmp / p.name)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)  # safetensors writes 0600 files
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_folder(folder: str | Path) -> Path:
    """`folder`, or its `.NAME.old` twin if a save was interrupted between its two renames."""
    folder = Path(folder)
    if not folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            return old
    return folder


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, so writers that infer the format from it work); on success
    it is fsync'd and renamed over `path`, on any error it is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise LlmkitError(f"{path} is a folder; give a file path for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any file the user makes
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text all-or-nothing."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes all-or-nothing."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: object, indent: int | None = 2) -> Path:
    """Write JSON (UTF-8, non-ASCII kept readable, trailing newline) all-or-nothing."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_lines(path: str | Path, rows: Iterable[object]) -> Path:
    """Write one JSON object per line (JSONL) all-or-nothing."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning invalid JSON into one clear error naming `what` is corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LlmkitError(f"{path} is not valid JSON ({e.msg}); {what} is corrupt") from e
