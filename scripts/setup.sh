#!/usr/bin/env bash
# Installs what provd needs on a Debian machine, idempotently:
# - a WebAssembly guest toolchain for plugins. rustup's wasm32-wasip2 target
#   is used when it can be installed; otherwise Debian's Rust with wasi-libc
#   (the route that works where rustup cannot download targets).
# - the real peers the tests start: docker-registry (an OCI registry) and
#   skopeo (pushes images to it).
# - qemu-system-x86, busybox-static, kmod and debootstrap for the boot tests:
#   guests boot under qemu with Debian's cloud kernel (unpacked, not
#   installed, by scripts/guest-kernel.sh) and an initramfs provd builds.
# - libvirt-daemon-system: the boot test also starts a guest through the
#   node's libvirtd, as providers run VMs.
# - socat and systemd for the management VM (scripts/node-vm.sh).
# - prometheus, which the metrics test starts to scrape provd.
# - rustfmt and clippy for the checks.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

updated=no
# Installs the Debian packages among "$@" that are missing.
install_missing() {
  local needed=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || needed+=("$pkg")
  done
  [ "${#needed[@]}" -gt 0 ] || return 0
  echo "setup: installing ${needed[*]}"
  if [ "$updated" = no ]; then
    as_root apt-get update -q
    updated=yes
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${needed[@]}"
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi

if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: guest toolchain: rustup wasm32-wasip2"
elif rustup target add wasm32-wasip2 >/dev/null 2>&1; then
  echo "setup: guest toolchain: rustup wasm32-wasip2 (just installed)"
else
  install_missing rustc-web cargo-web rust-web-src lld-19 wasi-libc
  echo "setup: guest toolchain: Debian rustc, wasm32-wasip1 + build-std + reactor adapter"
fi

install_missing docker-registry skopeo tar gzip zstd
# cargo fuzz (scripts/fuzz.sh) compiles libFuzzer, which is C++.
install_missing g++
# Boot tests. Without recommends: qemu's would pull a desktop stack. Its
# packages may replace a newer qemu-utils with bookworm's, so qemu-utils
# is checked after it.
if ! dpkg -s qemu-system-x86 busybox-static kmod debootstrap >/dev/null 2>&1; then
  [ "$updated" = yes ] || { as_root apt-get update -q; updated=yes; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    qemu-system-x86 busybox-static kmod debootstrap
fi
# Partition builders and readers: mkfs.erofs/fsck.erofs, mke2fs, qemu-img.
install_missing erofs-utils e2fsprogs qemu-utils
# The management VM (scripts/node-vm.sh): socat hands provd's connections
# to libvirt's socket, systemd-analyze checks the package's unit.
install_missing socat systemd
# Fleet monitoring: the metrics test starts Debian's Prometheus, which
# scrapes provd over mutual TLS (its recommended node exporter is not
# needed).
if ! dpkg -s prometheus >/dev/null 2>&1; then
  if [ "$updated" = no ]; then
    as_root apt-get update -q
    updated=yes
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
  # The package starts its own service on :9090; the tests start theirs.
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
# VM configuration: virt-xml-validate (libvirt-clients; it runs xmllint from
# libxml2-utils, which libvirt-clients does not depend on), and xorriso,
# with which the tests read NoCloud seeds back (provd writes them itself).
install_missing libvirt-clients libxml2-utils xorriso
# libvirt as providers run it: Debian's libvirtd with its stock qemu.conf,
# which the boot test starts when none runs (QEMU as libvirt-qemu).
install_missing libvirt-daemon-system
# provd drives libvirtd through libvirt's API: the virt crate links
# libvirt.so, found with pkg-config.
install_missing libvirt-dev pkg-config
# The daemon's allocator, jemalloc, is built from its C sources.
install_missing make gcc

# Python plugins are built with componentize-py (PyPI), kept in the
# repository's ignored .cache/py, where provd's build finds it.
install_missing python3-venv
py="$(cd "$(dirname "$0")/.." && pwd)/.cache/py"
componentize_py_version=0.25.1
if ! "$py/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $componentize_py_version"; then
  python3 -m venv "$py"
  "$py/bin/pip" install -q "componentize-py==$componentize_py_version"
fi
echo "setup: $("$py/bin/componentize-py" --version) in $py"

rustup component add rustfmt clippy >/dev/null 2>&1 || true
