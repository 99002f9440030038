#!/usr/bin/env bash
# Partitions benchmark: bytes on disk and end-to-end build time for the VMs
# of one node, provd's shared + private partitions against
#   naive  - one full ext4 image per VM from its tree (mke2fs -d), and
#   qcow2  - a qcow2 base per image plus a qcow2 overlay per VM (how Nova
#            shares a base between VMs of the same image; nothing is shared
#            across different images).
# Each VM runs a different image (one per tree given). Times are medians of
# RUNS warm runs; provd's time runs from images in the store to published
# partitions (plan included); the peers' from the tree to their images.
#
#   scripts/bench-partitions.sh [TREE...]   (default: /var/tmp/rootfs-{a,b,c})
#   RUNS=5 PROVCTL=target/release/provctl scripts/bench-partitions.sh
set -euo pipefail

RUNS=${RUNS:-3}
PROVCTL=${PROVCTL:-${CARGO_TARGET_DIR:-target}/release/provctl}
# `dir` refuses images with device nodes or setuid files (Debian roots have both).
FORMATS=${FORMATS:-"erofs erofs-lz4 erofs-lz4hc ext4"}
if [ "$#" -eq 0 ]; then set -- /var/tmp/rootfs-a /var/tmp/rootfs-b /var/tmp/rootfs-c; fi
[ -x "$PROVCTL" ] || { echo "build provctl first: cargo build --release -p provctl" >&2; exit 1; }

work=$(mktemp -d /var/tmp/provd-bench-partitions.XXXXXX)
trap 'rm -rf "$work"' EXIT
export PROVD_DATA_DIR="$work/data"

vms=()
i=0
for tree in "$@"; do
  "$PROVCTL" image import "dir:$tree" >/dev/null
  vms+=(--vm "vm$i=dir:$tree")
  i=$((i + 1))
done

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
alloc() { du -B1 -s "$@" | awk '{s+=$1} END {print s}'; }

# naive and qcow2 backing files
naive_t=(); qcow_t=()
for run in $(seq "$RUNS"); do
  rm -rf "$work/naive" "$work/qcow"; mkdir -p "$work/naive" "$work/qcow"
  start=$(now)
  i=0
  for tree in "$@"; do
    size=$(( $(du -B1 -s "$tree" | cut -f1) * 13 / 10 + (64 << 20) ))
    mke2fs -q -F -t ext4 -d "$tree" "$work/naive/vm$i.ext4" "$((size / 1024))k"
    i=$((i + 1))
  done
  mid=$(now)
  i=0
  for _ in "$@"; do
    qemu-img convert -f raw -O qcow2 "$work/naive/vm$i.ext4" "$work/qcow/base$i.qcow2"
    qemu-img create -q -f qcow2 -b "$work/qcow/base$i.qcow2" -F qcow2 "$work/qcow/vm$i.qcow2"
    i=$((i + 1))
  done
  end=$(now)
  naive_t+=("$(echo "$mid - $start" | bc)")
  qcow_t+=("$(echo "$end - $start" | bc)")
done
naive_bytes=$(alloc "$work"/naive/*.ext4)
qcow_bytes=$(alloc "$work"/qcow/*.qcow2)
naive_med=$(printf '%s\n' "${naive_t[@]}" | median)
qcow_med=$(printf '%s\n' "${qcow_t[@]}" | median)

row() { # name seconds bytes
  awk -v n="$1" -v t="$2" -v b="$3" -v nt="$naive_med" -v nb="$naive_bytes" \
    'BEGIN {printf "%-22s %8.2f s %6.2fx   %9.1f MiB %6.3fx\n", n, t, t/nt, b/1048576, b/nb}'
}

echo "trees: $*  (runs: $RUNS, warm page cache, $(nproc) CPUs)"
printf '%-22s %10s %7s   %13s %7s\n' layout time "/naive" "on disk" "/naive"
row "naive ext4 per VM" "$naive_med" "$naive_bytes"
row "qcow2 base+overlay" "$qcow_med" "$qcow_bytes"
for fmt in $FORMATS; do
  times=(); bytes=0; peak=0
  for run in $(seq "$RUNS"); do
    out=$("$PROVCTL" partition build "${vms[@]}" --shared-format "$fmt" --json)
    times+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["build_seconds"])')")
    bytes=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_on_disk"])')
    for ((j = 0; j < i; j++)); do "$PROVCTL" partition rm --vm "vm$j" >/dev/null; done
  done
  row "provd $fmt+ext4" "$(printf '%s\n' "${times[@]}" | median)" "$bytes"
done
