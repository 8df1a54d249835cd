"""The base of the project's own errors (kept in models/, which imports torch only)."""

from __future__ import annotations


class QkvError(ValueError):
    """Bad input or an unusable setting: the commands report it as ``qkv: error: ...``
    with status 2 and no traceback. Anything else is a bug and keeps its traceback."""
