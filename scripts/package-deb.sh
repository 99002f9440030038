#!/usr/bin/env bash
# Builds the Debian package of provd and provctl from release binaries:
#
#   scripts/package-deb.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds `provd` and `provctl` (default: the release target folder,
# built first when missing); OUT_DIR gets provd_<version>_<arch>.deb
# (default: target/debian). The package installs /usr/bin/provd and
# /usr/bin/provctl, provd.service (runtime/daemon/debian), the conffile
# /etc/provd/provd.toml, and creates /var/lib/provd 0700. provd runs
# e2fsprogs' debugfs (cloud-init seeds, repacks), and where a request asks
# for them mkfs.erofs (compressed shared partitions) and qemu-img (qcow2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target="${CARGO_TARGET_DIR:-$root/target}"
bin=${1:-$target/release}
out=${2:-$target/debian}
if [ -z "${1:-}" ] && { [ ! -x "$bin/provd" ] || [ ! -x "$bin/provctl" ]; }; then
  cargo build -q --release -p provd-daemon -p provctl
fi
for b in provd provctl; do
  [ -x "$bin/$b" ] || { echo "package-deb: no $bin/$b" >&2; exit 1; }
done
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
src=runtime/daemon/debian
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/provd"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
  "$pkg/etc/provd" "$pkg/usr/share/doc/provd"
install -m 0755 -s "$bin/provd" "$bin/provctl" "$pkg/usr/bin/"
install -m 0644 "$src/provd.service" "$pkg/lib/systemd/system/"
# Readable by root alone: it names the node's key files and policy.
install -m 0600 "$src/provd.toml" "$pkg/etc/provd/provd.toml"
install -m 0644 "$src/conffiles" "$pkg/DEBIAN/conffiles"
install -m 0755 "$src/postinst" "$src/prerm" "$src/postrm" "$pkg/DEBIAN/"
install -m 0644 README.md docs/api.md docs/security.md docs/method.md "$pkg/usr/share/doc/provd/"
printf 'provd\nLicense: Apache-2.0\n' >"$pkg/usr/share/doc/provd/copyright"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: provd
Version: $version
Architecture: $arch
Maintainer: provd developers <provd@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.36), libgcc-s1, libvirt0 (>= 9.0), e2fsprogs
Recommends: libvirt-daemon-system, erofs-utils, qemu-utils
Section: admin
Priority: optional
Description: node-side VM provisioning runtime (WebAssembly plugin host)
 provd runs on each hardware node, or in its management VM, as a sandboxed
 WebAssembly plugin host. A remote manager sends it signed plugin bundles
 and VM configurations; plugins provision VMs through capability-limited
 host calls: image fetch, hashing and de-duplication, shared and private
 partitions, VM configuration for libvirt. provctl is the manager's and
 the operator's command.
CONTROL
mkdir -p "$out"
deb="$out/provd_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$deb" >/dev/null
echo "$deb"
