"""Capability ``vm``: configure VMs on their private partitions."""

from __future__ import annotations

from .errors import call, capability


def configure(spec: str, private: str):
    """Configures the VM of ``spec`` (its JSON or TOML text) on the private
    partition ``private``; returns what was written."""
    return call(capability("vm").configure, spec, private)


def configure_all(vms: list[tuple[str, str]]) -> list:
    return call(capability("vm").configure_all, vms)


def customize(spec: str) -> str:
    """Rewrites a configured VM's cloud-init seed; returns its instance id."""
    return call(capability("vm").customize, spec)
