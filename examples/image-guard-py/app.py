"""image-guard in Python: refuses VMs whose images carry a forbidden file.

It only looks: it fetches the VMs' images and checks paths in them by
hash, so it needs images and hashing, nothing that changes the node.

Input: {"vms": [{"name": ..., "image": ...}], "forbidden": [path, ...]}
"""

import provd
from provd import hashing, images, log


class ImageGuard(provd.Plugin):
    def provision(self, request: provd.Request) -> provd.Report:
        params = request.params()
        unknown = set(params) - {"vms", "forbidden"}
        if unknown:
            raise provd.InvalidInput(f"unknown field {sorted(unknown)[0]!r}")
        forbidden = params.get("forbidden") or []
        if not forbidden:
            raise provd.InvalidInput("forbidden: list at least one path")
        findings = []
        for vm in params.get("vms", []):
            image = images.fetch(vm["image"])
            found = []
            for path in forbidden:
                try:
                    found.append([path, hashing.hash_file(image.reference, path)])
                except provd.NotFound:
                    pass
            log.info("checked", vm=vm["name"], found=len(found))
            findings.append({"vm": vm["name"], "image": image.reference, "found": found})
        refused = [f"{f['vm']}: {p}" for f in findings for p, _ in f["found"]]
        if refused:
            raise provd.Denied("forbidden files in images: " + ", ".join(refused))
        return provd.Report(
            f"{len(findings)} VM(s) checked, no forbidden file",
            fields={"vms": len(findings)},
            output=findings,
        )


WitWorld = provd.export(ImageGuard)
