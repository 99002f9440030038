#!/usr/bin/env bash
# provd's main job on one machine, from a fresh Debian install:
#   1. installs what provd needs (scripts/setup.sh) and builds provd and provctl;
#   2. makes a node directory: certificates, a bundle-signing key, provd.toml
#      (scripts/dev-node.sh), and three small root filesystems from the
#      machine's Debian packages (scripts/demo-images.sh);
#   3. starts the node (`provd serve`, mutual TLS on 127.0.0.1);
#   4. builds, signs and deploys the shared-partition plugin;
#   5. provisions three VMs with it and prints its report, then a fourth VM
#      alone, which stores none of its image's files again, then a VM of
#      another tenant, whose image is web plus its own files: it shares the
#      public catalogue's layers and nothing of the first tenant's;
#   6. stops the node and verifies the result: each VM's private partition
#      on its shared layers equals its image, each domain XML is valid;
#   7. with PROVD_QUICKSTART_BOOT=1 (which also prints whether the guest maps
#      its shared partition with DAX), hands the node's VMs to the machine's
#      libvirtd (started here if no service manager runs it), provisions
#      web-boot, a VM of the web image set up to boot Debian's cloud kernel
#      with provd's initramfs, and after the verification starts it through
#      provd (`provctl start`) and shows what the guest reports on its
#      console; without a libvirtd, it boots under plain qemu.
# Building partitions needs root (ownership, device numbers): run as root or
# with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# Empty as root, else sudo: a prefix rather than a function, so that `$!` of
# a background command is provd's (or sudo's, which passes signals on).
root_prefix=()
[ "$(id -u)" -eq 0 ] || root_prefix=(sudo)

bash scripts/setup.sh
echo "quickstart: building provd and provctl"
cargo build -q --release -p provd-daemon -p provctl
bin="${CARGO_TARGET_DIR:-$root/target}/release"
provctl() { "$bin/provctl" "$@"; }

work="${PROVD_QUICKSTART_DIR:-$(mktemp -d -t provd-quickstart-XXXXXX)}"
node="$work/node"
echo "quickstart: node directory $node"
boot="${PROVD_QUICKSTART_BOOT:-0}"

# With PROVD_QUICKSTART_BOOT=1 the node hands its VMs to the machine's
# libvirtd, as a provider's node does: the one that runs, or one started
# here from Debian's package (stopped again at the end) where no service
# manager runs it. Without a libvirtd, web-boot boots under plain qemu.
libvirt=0
started_daemons=()
stop_daemons() {
  for daemon in "${started_daemons[@]}"; do
    "${root_prefix[@]}" pkill -TERM -x "$daemon" 2>/dev/null || true
  done
}
virsh_system() { "${root_prefix[@]}" virsh -c qemu:///system "$@"; }
if [ "$boot" = 1 ]; then
  if ! virsh_system version >/dev/null 2>&1 && [ -x /usr/sbin/libvirtd ]; then
    echo "quickstart: starting libvirtd (Debian's libvirt-daemon-system, stock configuration)"
    for daemon in virtlogd libvirtd; do
      pgrep -x "$daemon" >/dev/null || { "${root_prefix[@]}" "/usr/sbin/$daemon" -d && started_daemons+=("$daemon"); }
    done
    for _ in $(seq 100); do virsh_system version >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if virsh_system version >/dev/null 2>&1 && id libvirt-qemu >/dev/null 2>&1; then
    libvirt=1
    # libvirt runs QEMU as libvirt-qemu, which reaches the VMs' files
    # through the folder provd hands them over in (vm-dir), beside the
    # node's closed data directory, on its filesystem: every folder above
    # it root's alone (provd refuses it otherwise), and passable.
    handed="$work.libvirt"
    "${root_prefix[@]}" rm -rf "$handed"
    "${root_prefix[@]}" mkdir -m 0711 "$handed"
  else
    echo "quickstart: libvirtd is not reachable at qemu:///system; web-boot will boot under plain qemu"
  fi
fi
trap stop_daemons EXIT

if [ "$libvirt" = 1 ]; then
  PORT=0 PROVCTL="$bin/provctl" LIBVIRT_URI=qemu:///system VM_DIR="$handed/vms" \
    bash scripts/dev-node.sh "$node" >/dev/null
else
  PORT=0 PROVCTL="$bin/provctl" bash scripts/dev-node.sh "$node" >/dev/null
fi
bash scripts/demo-images.sh "$node/images"

pid=""
url=""
stop_node() {
  [ -n "$pid" ] || return 0
  "${root_prefix[@]}" kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}
start_node() {
  : >"$node/provd.out"
  "${root_prefix[@]}" "$bin/provd" serve --config "$node/provd.toml" >"$node/provd.out" 2>>"$node/provd.log" &
  pid=$!
  url=""
  for _ in $(seq 300); do
    url=$(sed -n 's/^provd listening on //p' "$node/provd.out")
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$node/provd.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$url" ] || { echo "quickstart: provd did not start; see $node/provd.log" >&2; exit 1; }
  echo "quickstart: node listening on $url"
}
trap 'stop_node; stop_daemons' EXIT
start_node
# shellcheck disable=SC1091
source "$node/manager.env"

echo "quickstart: building, signing and deploying the shared-partition plugin"
provctl bundle build plugins/shared-partition -o "$work/shared-partition.provd" >/dev/null
provctl bundle sign "$work/shared-partition.provd" --key "$node/signer.key"
provctl deploy "$work/shared-partition.provd" --node "$url"

mkdir -p "$work/vms"
vms=()
# write_spec NAME IMAGE [TENANT]: a VM spec file for VM NAME of image IMAGE,
# of TENANT (the default tenant when not given).
write_spec() {
  local tenant=""
  [ -z "${3:-}" ] || tenant="
  \"tenant\": \"$3\","
  cat >"$work/vms/$1.json" <<JSON
{
  "name": "$1",$tenant
  "hypervisor": "libvirt",
  "vcpus": 1,
  "memory-mib": 1024,
  "image": "dir:$node/images/$2",
  "boot": { "firmware": "uefi" },
  "nics": [ { "bridge": "br0", "dhcp4": true } ],
  "cloud-init": { "hostname": "$1.example" }
}
JSON
}
for image in web api db; do
  write_spec "$image-1" "$image"
  vms+=(--vm "$work/vms/$image-1.json")
done

echo "quickstart: provisioning web-1, api-1 and db-1"
provctl provision --plugin shared-partition "${vms[@]}" \
  --params '{"shared-format": "erofs", "private-format": "ext4"}' \
  --idempotency-key quickstart --node "$url" | tee "$work/report.txt"
id=$(head -n1 "$work/report.txt" | cut -d' ' -f1)
provctl status "$id" --node "$url" --json >"$work/report.json"
provctl audit --operation "$id" --node "$url" >"$work/audit.txt"

# Customers order VMs one at a time: web-2 arrives alone and takes every
# file of its image from the layers the node already holds.
echo "quickstart: provisioning web-2 alone"
write_spec web-2 web
provctl provision --plugin shared-partition --vm "$work/vms/web-2.json" \
  --params '{"shared-format": "erofs", "private-format": "ext4"}' \
  --idempotency-key quickstart-web-2 --node "$url" | tee "$work/report-web-2.txt"

# Another tenant's VM: acme's shop image is the public web image plus
# acme's own files. It takes web's files from the public layers; acme's own
# go to a layer of acme's, which no other tenant's VM may stack.
echo "quickstart: provisioning shop-1 alone, of tenant acme (web plus 1 MiB of its own)"
cp -a "$node/images/web" "$node/images/acme-shop"
mkdir -p "$node/images/acme-shop/srv/shop"
head -c 1048576 /dev/urandom >"$node/images/acme-shop/srv/shop/catalogue.db"
echo "acme-shop" >"$node/images/acme-shop/etc/hostname"
write_spec shop-1 acme-shop acme
provctl provision --plugin shared-partition --vm "$work/vms/shop-1.json" \
  --params '{"shared-format": "erofs", "private-format": "ext4"}' \
  --idempotency-key quickstart-shop-1 --node "$url" | tee "$work/report-shop-1.txt"

if [ "$boot" = 1 ]; then
  # The guest's kernel: Debian's cloud kernel, unpacked (not installed);
  # the initramfs from its modules. Both go into the node's boot/ folder,
  # which specs name boot files in.
  echo "quickstart: preparing the guest kernel and provd's initramfs"
  bash scripts/guest-kernel.sh "$work/kernel"
  # In the data directory, which is the node's alone (0700, checked at start).
  "${root_prefix[@]}" mkdir -p -m 0700 "$node/data/boot"
  "${root_prefix[@]}" cp "$work/kernel/vmlinuz" "$node/data/boot/vmlinuz"
  "${root_prefix[@]}" "$bin/provctl" boot initramfs --modules-dir "$work/kernel/modules" \
    -o "$node/data/boot/provd-initrd.img"
  cat >"$work/vms/web-boot.json" <<JSON
{
  "name": "web-boot",
  "hypervisor": "libvirt",
  "vcpus": 1,
  "memory-mib": 512,
  "image": "dir:$node/images/web",
  "boot": { "kernel": "vmlinuz", "initrd": "provd-initrd.img",
            "cmdline": "console=ttyS0 panic=-1 init=/usr/sbin/provd-check" },
  "cloud-init": { "hostname": "web-boot.example" }
}
JSON
  echo "quickstart: provisioning web-boot alone (kernel boot)"
  provctl provision --plugin shared-partition --vm "$work/vms/web-boot.json" \
    --params '{"shared-format": "erofs", "private-format": "ext4"}' \
    --idempotency-key quickstart-web-boot --node "$url" | tee "$work/report-web-boot.txt"
fi

if [ "$libvirt" = 1 ]; then
  echo "quickstart: the node's VMs in libvirt (defined by provd, not started)"
  provctl vms --node "$url"
fi

stop_node
echo "quickstart: verifying every VM against its image (node stopped)"
"${root_prefix[@]}" "$bin/provctl" partition verify --data-dir "$node/data"
for xml in "$node"/data/vms/*/domain.xml; do
  virt-xml-validate "$xml" domain >/dev/null
done
echo "quickstart: every domain XML is valid libvirt"
if [ "$boot" = 1 ]; then
  # After the verification: the guest writes to its private partition.
  console="$work/console-web-boot.txt"
  if [ "$libvirt" = 1 ]; then
    start_node
    echo "quickstart: starting web-boot through provd and libvirtd (its console follows)"
    provctl start web-boot --node "$url"
    # virtlogd writes the guest's serial console into the VM's folder.
    log="$node/data/vms/web-boot/serial.log"
    ended=0
    for _ in $(seq 600); do
      if "${root_prefix[@]}" grep -q '^provd-check: end' "$log" 2>/dev/null; then ended=1; break; fi
      sleep 0.5
    done
    "${root_prefix[@]}" cat "$log" | tr -d '\r' >"$console" 2>/dev/null || true
    # The guest's check ends its boot; libvirt would boot it again.
    provctl stop web-boot --force --node "$url" >/dev/null
    grep '^provd-check:' "$console" || true
    [ "$ended" = 1 ] || { echo "quickstart: web-boot did not end its check in 300 s; see $console" >&2; exit 1; }
    provctl vms --node "$url"
    stop_node
  else
    echo "quickstart: booting web-boot under qemu (its console follows)"
    "${root_prefix[@]}" "$bin/provctl" boot run "$node/data/vms/web-boot/domain.xml" --timeout 300 \
      | tee "$console" | grep --line-buffered '^provd-check:'
  fi
  grep -q '^provd-check: root overlay' "$console" \
    || { echo "quickstart: web-boot did not report an overlay root; see $console" >&2; exit 1; }
  echo "quickstart: web-boot booted from its partitions; full console in $console"
  # Its shared partition is persistent memory, which the guest maps with DAX
  # where its kernel allows: say which.
  dax=$(sed -n 's/^provd-overlay-root: shared partition \([0-9]*\) on \([a-z0-9]*\): dax \(.*\)/shared partition \1 on \2: DAX \3/p' "$console")
  if [ -n "$dax" ]; then
    echo "quickstart: web-boot's $dax"
  else
    echo "quickstart: web-boot's shared partitions are block devices (no persistent memory)"
  fi
fi
cat <<EOF2

quickstart: done. Outputs:
  report           $work/report.json (and report.txt, report-web-2.txt, report-shop-1.txt)
  audit trail      $work/audit.txt
  VM configs       $node/data/vms/<name>/  (domain.xml, seed.iso)
  partitions       $node/data/partitions/
  node log         $node/provd.log
  start it again   $bin/provd serve --config $node/provd.toml
EOF2
if [ "$libvirt" = 1 ]; then
  cat <<EOF2
  libvirt          the VMs are defined in qemu:///system (virsh list --all), their files
                   handed to libvirt-qemu in $handed/vms/<name>/; with the node
                   started, provctl start|stop NAME runs one, provctl vms --delete NAME removes it
EOF2
fi
