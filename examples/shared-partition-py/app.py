"""The shared-partition flow in Python (see plugins/shared-partition for
the full plugin in Rust): images fetched once each, one plan, one shared
partition for the layers the node lacks, a private partition per VM built
side by side by the host, every VM configured.

Input: {"vms": [<VM spec>, ...], "min-layer-bytes": 0}
"""

import json

import provd
from provd import dedup, hashing, images, log, partitions, progress, vm


class SharedPartition(provd.Plugin):
    def provision(self, request: provd.Request) -> provd.Report:
        params = request.params()
        specs = params.get("vms") or []
        if not specs:
            raise provd.InvalidInput("vms: at least one VM spec is needed")
        names = [s["name"] for s in specs]

        distinct = sorted({s["image"] for s in specs})
        progress.report("fetch-images", 0, len(distinct))
        for i, reference in enumerate(distinct):
            image = images.fetch(reference)
            log.info("image fetched", reference=image.reference, bytes=image.bytes)
            progress.report("fetch-images", i + 1, len(distinct))

        progress.report("plan", 0, 1)
        policy = dedup.Policy(min_layer_bytes=int(params.get("min-layer-bytes", 1 << 20)))
        plan = dedup.plan({s["name"]: s["image"] for s in specs}, policy)
        progress.report("plan", 1, 1)

        shared = None
        if any(layer.partition is None for layer in plan.layers):
            shared = partitions.create_shared(plan.plan, "erofs")
        privates = partitions.create_privates(
            plan.plan, names, shared.id if shared else None, "ext4", 0
        )
        progress.report("configure-vms", 0, len(specs))
        configured = vm.configure_all(
            [(json.dumps(s), p.id) for s, p in zip(specs, privates)]
        )
        progress.report("configure-vms", len(specs), len(specs))
        # The manifest each private partition carries, hashed by the host.
        digest = hashing.blake3(plan.plan.encode())
        return provd.Report(
            f"{len(specs)} VM(s) on {'a new' if shared else 'no new'} shared partition",
            fields={"stored-bytes": plan.stored_bytes, "naive-bytes": plan.naive_bytes},
            output={
                "plan-digest": digest,
                "shared": shared.id if shared else None,
                "vms": [
                    {"name": c.name, "private": p.id, "config": c.config_file}
                    for c, p in zip(configured, privates)
                ],
            },
        )


WitWorld = provd.export(SharedPartition)
