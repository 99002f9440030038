"""Capability ``partitions``: the shared and private partitions of a
plan, built by the host."""

from __future__ import annotations

from typing import Optional

from .errors import call, capability


def create_shared(plan: str, format: str = "erofs"):
    return call(capability("partitions").create_shared, plan, format)


def create_private(plan: str, vm: str, shared: Optional[str] = None, format: str = "ext4", size_bytes: int = 0):
    return call(capability("partitions").create_private, plan, vm, shared, format, size_bytes)


def create_privates(plan: str, vms: list[str], shared: Optional[str] = None, format: str = "ext4", size_bytes: int = 0) -> list:
    return call(capability("partitions").create_privates, plan, vms, shared, format, size_bytes)


def add_file(partition: str, path: str, content: bytes, mode: int = 0o644) -> None:
    call(capability("partitions").add_file, partition, path, bytes(content), mode)
