"""Capability ``dedup``: what the VMs' images share, and a layer plan."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import call, capability


@dataclass
class Policy:
    """How a plan chooses layers (the WIT ``policy`` record)."""

    min_layer_bytes: int = 0
    max_layers_per_vm: int = 8
    share_across_paths: bool = False
    node_layers: bool = True
    layer_unique_files: bool = True


def _vms(vms: dict[str, str]):
    wit = capability("dedup")
    return [wit.VmImage(vm=name, image=image) for name, image in vms.items()]


def analyse(vms: dict[str, str]):
    """What the images of ``{vm: image reference}`` share."""
    return call(capability("dedup").analyse, _vms(vms))


def plan(vms: dict[str, str], policy: Policy | None = None):
    """A layer plan for ``{vm: image reference}``; ``.plan`` names it for
    the partitions capability."""
    wit = capability("dedup")
    p = policy or Policy()
    return call(
        wit.plan,
        _vms(vms),
        wit.Policy(
            min_layer_bytes=p.min_layer_bytes,
            max_layers_per_vm=p.max_layers_per_vm,
            share_across_paths=p.share_across_paths,
            node_layers=p.node_layers,
            layer_unique_files=p.layer_unique_files,
        ),
    )


def layer_entries(layer: str, offset: int = 0, limit: int = 1000) -> list:
    return call(capability("dedup").layer_entries, layer, offset, limit)
