#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (30 by
# default), with cargo fuzz (libFuzzer, no sanitizer: the code is safe
# Rust, and this mode builds with the stable toolchain), from a seed corpus
# it makes first: the project's own manifests, specs and domain XML, small
# ext4 and EROFS images (mke2fs, mkfs.erofs), tar archives plain, gzip and
# zstd with a whiteout, a bundle signed with the targets' pinned key, and
# the committed seeds under fuzz/seeds. Prints each target's runs and
# speed; a crash stops the run (exit 1) and leaves its input under
# fuzz/artifacts/<target>/ for fuzz/regressions/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# PROVD_FUZZ_TARGET_DIR (default /var/tmp/provd-fuzz-target) keeps the
# instrumented build between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-30}
shift || true
# provctl (for the seed bundle) comes from the project's own build.
main_target="${CARGO_TARGET_DIR:-$root/target}"
export CARGO_TARGET_DIR="${PROVD_FUZZ_TARGET_DIR:-/var/tmp/provd-fuzz-target}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --locked

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(manifest bundle vm_spec reference archive oci_manifest ext4 erofs api_operation domain_xml)
fi

corpus=fuzz/corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do mkdir -p "$corpus/$t"; done
seed() { # seed TARGET FILE...
  local t=$1; shift
  [ -d "$corpus/$t" ] || return 0
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$corpus/$t/seed-$(basename "$(dirname "$f")")-$(basename "$f")"; done
  return 0
}
for t in fuzz/seeds/*/; do
  t=$(basename "$t")
  seed "$t" fuzz/seeds/"$t"/*
done
seed manifest plugins/*/plugin.toml examples/*/plugin.toml
seed vm_spec examples/vms/*.toml examples/vms/*.json
seed domain_xml runtime/vm/tests/golden/*.xml

# A small tree with every kind of entry an image has.
tree="$work/tree"
mkdir -p "$tree/etc/apt" "$tree/usr/bin" "$tree/var/empty"
printf 'ID=fuzz\n' >"$tree/etc/os-release"
head -c 5000 /dev/urandom >"$tree/usr/bin/tool"
ln -s tool "$tree/usr/bin/alias"
ln "$tree/usr/bin/tool" "$tree/usr/bin/hardlink"
chmod 4755 "$tree/usr/bin/tool"
if [ -d "$corpus/ext4" ]; then
  mke2fs -q -F -t ext4 -b 1024 -d "$tree" "$corpus/ext4/seed.ext4" 1M 2>/dev/null
fi
if [ -d "$corpus/erofs" ]; then
  mkfs.erofs --quiet "$corpus/erofs/seed.erofs" "$tree" >/dev/null
  mkfs.erofs --quiet -zlz4hc "$corpus/erofs/seed-lz4.erofs" "$tree" >/dev/null
fi
if [ -d "$corpus/archive" ]; then
  tar -C "$tree" -cf "$corpus/archive/seed.tar" .
  gzip -c "$corpus/archive/seed.tar" >"$corpus/archive/seed.tar.gz"
  zstd -q -c "$corpus/archive/seed.tar" >"$corpus/archive/seed.tar.zst"
  mkdir -p "$work/layer/etc" "$work/layer/var"
  : >"$work/layer/etc/.wh.os-release"
  : >"$work/layer/var/.wh..wh..opq"
  tar -C "$work/layer" -cf "$corpus/archive/seed-whiteouts.tar" .
fi
if [ -d "$corpus/bundle" ]; then
  # The targets' pinned key (BUNDLE_KEY_SEED, 32 bytes of 7) as PKCS#8 PEM.
  key="$work/signer.key"
  { echo "-----BEGIN PRIVATE KEY-----"
    { printf '\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20'
      head -c 32 /dev/zero | tr '\0' '\7'; } | base64
    echo "-----END PRIVATE KEY-----"; } >"$key"
  chmod 600 "$key"
  provctl=(env CARGO_TARGET_DIR="$main_target" cargo run -q -p provctl --)
  "${provctl[@]}" bundle build examples/hello -o "$work/hello.provd" >"$work/bundle.log" 2>&1 \
    || { cat "$work/bundle.log" >&2; exit 1; }
  cp "$work/hello.provd" "$corpus/bundle/seed-unsigned.provd"
  "${provctl[@]}" bundle sign "$work/hello.provd" --key "$key" >/dev/null
  cp "$work/hello.provd" "$corpus/bundle/seed-signed.provd"
fi

cd fuzz
cargo fuzz build -O --sanitizer none
printf '%-14s %12s %10s %8s\n' target runs "execs/s" corpus
status=0
for t in "${targets[@]}"; do
  log="$work/$t.log"
  if ! cargo fuzz run -O --sanitizer none "$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=1100000 \
      -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t found a crash:" >&2
    tail -n 40 "$log" >&2
    status=1
    continue
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  printf '%-14s %12s %10s %8s\n' "$t" "${runs:-?}" "${speed:-?}" "$(ls "corpus/$t" | wc -l)"
done
cd "$root"
exit "$status"
