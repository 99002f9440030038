#!/usr/bin/env bash
# An independent check of `provctl dedup scan`, with find, sort, sha256sum
# and awk only. Prints: shared contents, bytes once, bytes as copies.
# Usage: scripts/shared-contents-sha256.sh DIR DIR...
#
# Independent computation: per tree, distinct (size, sha256) of regular non-empty files
# (hard links once per tree); shared = contents in >= 2 trees.
set -euo pipefail
i=0
for root in "$@"; do
  (cd "$root" && find . -type f -size +0 -printf '%i %s %p\0' | sort -z -u -k1,1n -t' ' | \
    while IFS=' ' read -r -d '' ino size path; do printf '%s %s\n' "$size" "$(sha256sum "$path" | cut -d' ' -f1)"; done | sort -u | sed "s/^/$i /")
  i=$((i+1))
done | awk '{k=$2" "$3; n[k]++; s[k]=$2} END {c=0; once=0; copies=0; for (k in n) if (n[k]>=2) {c++; once+=s[k]; copies+=s[k]*n[k]} print c, once, copies}'
