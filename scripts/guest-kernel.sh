#!/usr/bin/env bash
# Unpacks Debian's kernel for virtual machines (linux-image-cloud-amd64:
# virtio, ext4, EROFS, overlayfs, no SATA or sound) into DIR, without
# installing it on this machine: a guest's kernel is not the node's.
#
#   scripts/guest-kernel.sh DIR
#
# Writes DIR/vmlinuz, DIR/modules (the kernel's /lib/modules/<version>) and
# DIR/version. A DIR that already holds them is kept.
set -euo pipefail
out=${1:?usage: scripts/guest-kernel.sh DIR}
if [ -s "$out/version" ] && [ -f "$out/vmlinuz" ] && [ -d "$out/modules" ]; then
  exit 0
fi
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
# The metapackage names the versioned package of the current kernel.
image=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
if [ -z "$image" ]; then
  as_root apt-get update -q >/dev/null
  image=$(apt-cache depends linux-image-cloud-amd64 \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
fi
[ -n "$image" ] || { echo "guest-kernel: no linux-image-cloud-amd64 in the package lists" >&2; exit 1; }
version=${image#linux-image-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The download lands in a private temporary directory the _apt user cannot
# enter, so apt's sandbox user is not used for it.
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$image" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/root"
# The package leaves modules.dep to its install script: depmod writes it.
/sbin/depmod -b "$work/root" "$version"
rm -rf "$out.new"
mkdir -p "$out.new"
cp "$work/root/boot/vmlinuz-$version" "$out.new/vmlinuz"
cp -a "$work/root/lib/modules/$version" "$out.new/modules"
printf '%s\n' "$version" >"$out.new/version"
rm -rf "$out"
mv "$out.new" "$out"
echo "guest-kernel: $version in $out"
