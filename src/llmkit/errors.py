"""One exception type for every user-facing mistake, so the CLI can print one clear line and exit 2."""

from __future__ import annotations


class LlmkitError(Exception):
    """A problem with the user's input (path, config, data, checkpoint) that names the problem and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise `LlmkitError(message)` unless `condition` holds."""
    if not condition:
        raise LlmkitError(message)
