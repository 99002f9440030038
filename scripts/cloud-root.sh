#!/usr/bin/env bash
# Makes a Debian bookworm root filesystem tree with cloud-init (debootstrap
# minbase plus cloud-init), without apt's caches, documentation or
# message translations, in DIR. A DIR that is already complete is kept.
#
#   scripts/cloud-root.sh DIR [MIRROR]
#
# Needs root and the Debian mirror (deb.debian.org by default).
set -euo pipefail
out=${1:?usage: scripts/cloud-root.sh DIR [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
[ -f "$out.complete" ] && [ -d "$out" ] && exit 0
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
as_root rm -rf "$out.new"
# debootstrap's resolver skips virtual packages: python3-cryptography needs
# the cffi backend named.
as_root debootstrap --variant=minbase --include=cloud-init,python3-cffi-backend \
  bookworm "$out.new" "$mirror" >"$out.log" 2>&1 \
  || { tail -n 20 "$out.log" >&2; exit 1; }
as_root rm -rf "$out.new"/var/cache/apt/* "$out.new"/var/lib/apt/lists/* \
  "$out.new"/usr/share/doc "$out.new"/usr/share/man "$out.new"/usr/share/info \
  "$out.new"/debootstrap
# Message translations go; locale.alias beside them stays for locale-gen.
as_root find "$out.new/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
# cloud-init sets the locale to en_US.UTF-8 by default and has Debian's
# update-locale check it; Debian's cloud images ship it generated.
as_root sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$out.new/etc/locale.gen"
as_root chroot "$out.new" locale-gen >/dev/null
printf 'cloud\n' | as_root tee "$out.new/etc/hostname" >/dev/null
as_root rm -f "$out.complete"
as_root rm -rf "$out"
as_root mv "$out.new" "$out"
as_root touch "$out.complete"
echo "cloud-root: $out ($(du -sh "$out" | cut -f1))"
