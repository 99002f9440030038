#!/usr/bin/env bash
# Makes three small root filesystem trees from the Debian packages installed
# on this machine (their files as `dpkg -L` lists them, with their modes and
# owners), with different package sets over a common base:
#   web: base + perl-base gzip tar
#   api: base + perl-base findutils diffutils
#   db:  base + util-linux ncurses-bin ncurses-base
# base: base-files libc6 bash coreutils dash sed grep
# Each also carries /usr/sbin/provd-check (scripts/provd-check), the first
# process of a guest booted to check its layout.
#
#   scripts/demo-images.sh DIR      # writes DIR/web, DIR/api, DIR/db
set -euo pipefail
out=${1:?usage: scripts/demo-images.sh DIR}
base="base-files libc6 bash coreutils dash sed grep"
declare -A extra=(
  [web]="perl-base gzip tar"
  [api]="perl-base findutils diffutils"
  [db]="util-linux ncurses-bin ncurses-base"
)
mkdir -p "$out"
for image in web api db; do
  tree="$out/$image"
  rm -rf "$tree"
  mkdir -p "$tree"
  list=$(mktemp)
  # Directories are listed too and copied without recursion, so they keep
  # their modes and only the packages' own files come along.
  # On a merged-/usr system /bin, /lib... are symlinks into /usr, while
  # dpkg lists the files under their old paths: each path's directory is
  # resolved, so every file lands where it really is.
  declare -A real=()
  # shellcheck disable=SC2086
  dpkg -L $base ${extra[$image]} | grep '^/' | grep -v '^/\.$' | sort -u | while read -r path; do
    dir=${path%/*}
    [ -n "$dir" ] || dir=/
    if [ -z "${real[$dir]+x}" ]; then real[$dir]=$(readlink -f "$dir" || true); fi
    resolved="${real[$dir]%/}/${path##*/}"
    if [ -e "$resolved" ] || [ -L "$resolved" ]; then printf '%s\n' "$resolved"; fi
  done | sed "s|^/||" | sort -u > "$list"
  tar -C / -cf - --no-recursion -T "$list" | tar -xf - -C "$tree"
  rm -f "$list"
  mkdir -p "$tree/etc"
  printf '%s\n' "$image" > "$tree/etc/hostname"
  install -D -m 0755 "$(dirname "$0")/provd-check" "$tree/usr/sbin/provd-check"
  mkdir -p "$tree/var/lib/provd-check"
  echo "provd-check counts this guest's boots here" >"$tree/var/lib/provd-check/README"
  echo "demo-images: $tree ($(du -sh "$tree" | cut -f1))"
done
