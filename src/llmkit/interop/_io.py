"""Write an output folder all-or-nothing: build it beside the target, then swap it in with renames."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmkit.errors import LlmkitError


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `out`, on any error it is removed and `out` is untouched."""
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
        for f in tmp.rglob("*"):  # safetensors writes 0600 files
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
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
