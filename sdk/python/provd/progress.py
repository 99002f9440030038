"""Capability ``progress``: how far the request has come, for the
manager following the operation."""

from __future__ import annotations

from typing import Optional

from .errors import call, capability


def report(phase: str, done: int, total: Optional[int] = None) -> None:
    """``done`` units of ``total`` of ``phase`` are complete (``total``
    unknown: None). A phase is 1 to 64 characters of a-z, 0-9, '-', '_',
    '.'; ``done`` may not exceed ``total``."""
    call(capability("progress").report, phase, done, total)
