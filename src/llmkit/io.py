"""All-or-nothing outputs: build a folder beside its target, then swap it in with renames.

A crash mid-write leaves either the old folder or the new one (the old one survives as `.NAME.old`
between the two renames, and loaders fall back to it), never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
