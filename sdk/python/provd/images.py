"""Capability ``images``: fetch the VMs' images (within the plugin's
granted sources and the node's) and read them."""

from __future__ import annotations

from .errors import call, capability


def fetch(reference: str):
    """Fetches (or finds in the node's store) an image; returns its record
    (``reference``, ``digest``, ``entries``, ``files``, ``bytes``...)."""
    return call(capability("images").fetch, reference)


def entries(reference: str, offset: int = 0, limit: int = 1000) -> list:
    """A page of an image's entries, in path order."""
    return call(capability("images").entries, reference, offset, limit)


def read_file(reference: str, path: str) -> bytes:
    """A small file of a fetched image (at most the plugin's read limit)."""
    return bytes(call(capability("images").read_file, reference, path))
