"""Capability ``hashing``: BLAKE3 computed natively by the host."""

from __future__ import annotations

from .errors import call, capability


def blake3(data: bytes) -> str:
    """The BLAKE3 digest of ``data``, as hex."""
    return call(capability("hashing").blake3, bytes(data))


def hash_file(image: str, path: str) -> str:
    """The digest of a file of an image fetched in this request, computed
    by the host from the stored content (no bytes cross into the plugin).
    A path the image lacks raises ``NotFound``."""
    return call(capability("hashing").hash_file, image, path)


class Hasher:
    """An incremental hasher for input that arrives in pieces; use it in a
    ``with`` block so the host handle is released."""

    def __init__(self) -> None:
        self._h = capability("hashing").Hasher()

    def update(self, data: bytes) -> "Hasher":
        call(self._h.update, bytes(data))
        return self

    def hexdigest(self) -> str:
        return self._h.finish()

    def __enter__(self) -> "Hasher":
        return self

    def __exit__(self, *exc) -> None:
        self._h.__exit__(*exc)
