"""Capability ``log``: structured records in the node's log, under the
plugin's byte budget (records past it are dropped and counted)."""

from __future__ import annotations

from typing import Any

from .errors import capability


def _write(level: str, message: str, fields: dict[str, Any]) -> None:
    wit = capability("log")
    types = capability("types")
    wit.write(
        getattr(wit.Level, level),
        message,
        [types.Field(key=str(k), value=str(v)) for k, v in fields.items()],
    )


def trace(message: str, **fields: Any) -> None:
    _write("TRACE", message, fields)


def debug(message: str, **fields: Any) -> None:
    _write("DEBUG", message, fields)


def info(message: str, **fields: Any) -> None:
    _write("INFO", message, fields)


def warn(message: str, **fields: Any) -> None:
    _write("WARN", message, fields)


def error(message: str, **fields: Any) -> None:
    _write("ERROR", message, fields)
