#!/usr/bin/env bash
# The management VM of US 10,365,935: provd runs inside a VM on the node,
# installed from its Debian package, and writes VMs' partitions where the
# host's hypervisor reads them.
#
#   scripts/node-vm.sh build OUT    # the VM's image in OUT: root.img, vmlinuz, initrd.img
#   scripts/node-vm.sh run [WORK]   # builds it if needed, boots it, runs the flow
#   scripts/node-vm.sh bench [WORK] # the same requests on the host and in the VM
#
# build: a minimal Debian bookworm root (debootstrap from Debian's packages:
#   systemd, Debian's cloud kernel and its initramfs, libvirt's client
#   library) with the provd package (scripts/package-deb.sh) installed and
#   enabled, written as an ext4 disk image with mke2fs. Kept in OUT while the
#   package and this script are unchanged. BIN_DIR names the folder holding
#   provd and provctl to package (default: a release build); MIRROR the
#   Debian mirror.
#
# run: the node's VM storage, STORE (default /var/lib/provd-node), is a host
#   folder the management VM mounts over virtio-fs (virtiofsd) at the same
#   path: provd inside writes partitions, seeds and domain XML there, and
#   the host's libvirtd reads them under the same names (docs/method.md
#   says why). provd's configuration and the images come on read-only disks.
#   The VM boots under qemu (KVM where it works, emulation otherwise) with
#   user-mode networking restricted to two forwards: the manager on the host
#   reaches provd's API at 127.0.0.1:PORT (mutual TLS), and provd reaches
#   the host's libvirtd at 10.0.2.100:16509, a connection qemu hands to
#   libvirt's unix socket (socat). Nothing leaves the machine. The manager
#   deploys the shared-partition plugin, provisions web-1 and web-boot, then
#   api-1 in the formats provd builds with external tools (erofs-lz4, qcow2),
#   shuts the management VM down and verifies every partition it wrote with
#   `provctl partition verify` on the host, boots the VM again, starts
#   web-boot on the host through provd and reads its console.
#   WORK (default: a new folder under /tmp) gets the node's certificates,
#   images, console logs and reports. PORT (default 7543) is the forwarded
#   port; IMAGE_DIR (default WORK/image) the built image.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target="${CARGO_TARGET_DIR:-$root/target}"

# Numbers printed with a decimal point whatever the caller's locale.
export LC_ALL=C
say() { echo "node-vm: $*"; }
die() { echo "node-vm: $*" >&2; exit 1; }
# debootstrap, the VM's owners and modes, qemu and virtiofsd serving the
# node's storage: all need root.
[ "$(id -u)" -eq 0 ] || die "run as root"

# The folder holding provd and provctl: BIN_DIR, or a release build.
binaries() {
  if [ -n "${BIN_DIR:-}" ]; then
    (cd "$BIN_DIR" && pwd)
  else
    cargo build -q --release -p provd-daemon -p provctl
    echo "$target/release"
  fi
}

# Debian's user and group libvirt's QEMU runs as on this host: provd inside
# hands VMs' files to their numbers, so the VM names the same numbers.
qemu_ids() {
  local uid gid
  uid=$(id -u libvirt-qemu 2>/dev/null || echo 64055)
  gid=$(getent group libvirt-qemu | cut -d: -f3) || true
  echo "$uid ${gid:-64055}"
}

build() {
  local out=${1:?usage: scripts/node-vm.sh build OUT}
  local mirror=${MIRROR:-http://deb.debian.org/debian}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  local bin deb
  bin=$(binaries)
  # The image is made again when what the package holds, this script or
  # the host's libvirt-qemu numbers change.
  local key
  key=$( { sha256sum "$bin/provd" "$bin/provctl" runtime/daemon/debian/* scripts/package-deb.sh \
    scripts/node-vm.sh \
    | cut -d' ' -f1; qemu_ids; } | sha256sum | cut -d' ' -f1)
  if [ -f "$out/root.img" ] && [ "$(cat "$out/image.key" 2>/dev/null)" = "$key" ]; then
    say "image in $out is current"
    return 0
  fi
  rm -rf "$out/deb"
  deb=$(bash scripts/package-deb.sh "$bin" "$out/deb")
  local base="$out/base"
  # What the root holds: systemd, the cloud kernel and its initramfs,
  # libvirt's client library, and the tools provd runs for some formats
  # (mkfs.erofs for compressed partitions, qemu-img for qcow2).
  local packages=systemd-sysv,udev,dbus,linux-image-cloud-amd64,libvirt0,iproute2,erofs-utils,qemu-utils
  if [ "$(cat "$base.complete" 2>/dev/null)" != "$packages" ]; then
    say "debootstrap: Debian bookworm with $packages (a few minutes)"
    rm -rf "$base.new"
    debootstrap --variant=minbase \
      --include="$packages" \
      bookworm "$base.new" "$mirror" >"$out/debootstrap.log" 2>&1 \
      || { tail -n 20 "$out/debootstrap.log" >&2; exit 1; }
    rm -rf "$base.new"/var/cache/apt/* "$base.new"/var/lib/apt/lists/* \
      "$base.new"/usr/share/doc "$base.new"/usr/share/man "$base.new"/usr/share/info \
      "$base.new"/debootstrap
    rm -rf "$base"
    mv "$base.new" "$base"
    echo "$packages" | tee "$base.complete" >/dev/null
  fi
  say "installing $(basename "$deb") into the image"
  local tree="$out/root.new"
  rm -rf "$tree"
  cp -a "$base" "$tree"
  cp "$deb" "$tree/tmp/provd.deb"
  chroot "$tree" dpkg -i /tmp/provd.deb >"$out/dpkg.log" 2>&1 \
    || { cat "$out/dpkg.log" >&2; exit 1; }
  rm -f "$tree/tmp/provd.deb"
  read -r uid gid < <(qemu_ids)
  chroot "$tree" groupadd -g "$gid" libvirt-qemu
  chroot "$tree" useradd -r -u "$uid" -g "$gid" -d /nonexistent -s /usr/sbin/nologin libvirt-qemu
  printf 'provd-node\n' | tee "$tree/etc/hostname" >/dev/null
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' | tee "$tree/etc/fstab" >/dev/null
  # The user-mode network's DHCP gives the VM its address.
  tee "$tree/etc/systemd/network/50-provd-node.network" >/dev/null <<'NET'
[Match]
Name=en*

[Network]
DHCP=ipv4
NET
  chroot "$tree" systemctl enable systemd-networkd.service >/dev/null 2>&1
  # The node's VM storage, shared by the host over virtio-fs (Debian's
  # cloud kernel has virtiofs and no 9p): provd.store=TAG:PATH on the
  # kernel's command line becomes a mount at PATH that provd.service needs
  # and may write.
  install -D -m 0755 /dev/stdin "$tree/usr/lib/systemd/system-generators/provd-node-store" <<'GEN'
#!/bin/sh
# provd.store=TAG:PATH on the kernel command line: the host's folder shared
# under TAG (virtio-fs), or the ext4 disk labelled L for TAG=LABEL=L, is
# mounted at PATH before provd starts.
set -eu
out=$1
for arg in $(cat /proc/cmdline); do
  case $arg in provd.store=*) ;; *) continue ;; esac
  spec=${arg#provd.store=}
  tag=${spec%%:*}
  path=${spec#*:}
  unit=$(systemd-escape -p --suffix=mount "$path")
  # LABEL=name: an ext4 disk instead (block storage, as measured).
  case $tag in
    LABEL=*) what=/dev/disk/by-label/${tag#LABEL=}; type=ext4 ;;
    *) what=$tag; type=virtiofs ;;
  esac
  cat >"$out/$unit" <<UNIT
[Unit]
Description=the node's VM storage ($tag) at $path
After=systemd-modules-load.service
Before=provd.service

[Mount]
What=$what
Where=$path
Type=$type
Options=rw,nodev,nosuid
UNIT
  mkdir -p "$out/provd.service.d"
  printf '[Unit]\nRequiresMountsFor=%s\n[Service]\nReadWritePaths=%s\n' "$path" "$path" \
    >"$out/provd.service.d/50-store.conf"
done
GEN
  printf 'virtiofs\n' | tee "$tree/etc/modules-load.d/provd-node.conf" >/dev/null
  # provd's configuration and the images it may read come on read-only
  # disks the host writes (qemu enforces read-only; the VM cannot change
  # them).
  tee -a "$tree/etc/fstab" >/dev/null <<'FSTAB'
LABEL=provd-etc /etc/provd ext4 ro,nodev,nosuid,noexec,nofail,x-systemd.device-timeout=30s 0 0
LABEL=provd-images /srv/provd-images ext4 ro,nodev,nosuid,noexec,nofail,x-systemd.device-timeout=30s 0 0
FSTAB
  install -d -m 0755 "$tree/srv/provd-images"
  install -D -m 0644 /dev/stdin "$tree/etc/systemd/system/provd.service.d/45-disks.conf" <<'DROP'
[Unit]
RequiresMountsFor=/etc/provd /srv/provd-images
DROP
  # The console shows provd's log and when it is up, for whoever watches it.
  install -D -m 0644 /dev/stdin "$tree/etc/systemd/system/provd.service.d/40-console.conf" <<'DROP'
[Service]
StandardOutput=journal+console
StandardError=journal+console
ExecStartPost=/bin/echo "provd-node: provd.service started"
# What the unit confines provd to, as the kernel applies it (checked by
# runtime/daemon/tests/node_vm.rs).
ExecStartPost=/bin/sh -c 'grep -E "^(CapBnd|NoNewPrivs):" /proc/self/status | sed "s/^/provd-node: /"'
DROP
  # The unit and its drop-ins as systemd inside will read them: a unit that
  # does not verify fails the build.
  systemd-analyze verify --root="$tree" provd.service
  cp "$tree"/boot/vmlinuz-*-cloud-amd64 "$out/vmlinuz.new"
  cp "$tree"/boot/initrd.img-*-cloud-amd64 "$out/initrd.img.new"
  # An ext4 image of the tree with room for the VM's logs and journal.
  local size
  size=$(( $(du -sm "$tree" | cut -f1) + 512 ))
  rm -f "$out/root.img.new"
  mke2fs -q -t ext4 -L provd-node -d "$tree" "$out/root.img.new" "${size}M"
  rm -rf "$tree"
  mv "$out/vmlinuz.new" "$out/vmlinuz"
  mv "$out/initrd.img.new" "$out/initrd.img"
  mv "$out/root.img.new" "$out/root.img"
  echo "$key" >"$out/image.key"
  say "image: $out/root.img ($size MiB), $out/vmlinuz, $out/initrd.img"
}

run() {
  local work=${1:-$(mktemp -d -t provd-node-vm-XXXXXX)}
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
  local store=${STORE:-/var/lib/provd-node}
  local port=${PORT:-7543}
  local image=${IMAGE_DIR:-$work/image}
  command -v socat >/dev/null || die "socat is missing (scripts/setup.sh installs it)"
  local bin
  bin=$(binaries)
  BIN_DIR=$bin build "$image"
  provctl() { "$bin/provctl" "$@"; }

  # The host's libvirtd, as for the quick start: the one that runs, or
  # Debian's, started here and stopped at the end.
  started=() qemu="" vfs="" mounted="" booted=""
  # Whatever way the flow ends: the VM, virtiofsd, web-boot if it was
  # started, the storage's mount, the daemons started here.
  # shellcheck disable=SC2317
  cleanup() {
    if [ -n "$qemu" ] && kill -0 "$qemu" 2>/dev/null; then kill "$qemu" 2>/dev/null || true; fi
    if [ -n "$vfs" ] && kill -0 "$vfs" 2>/dev/null; then kill "$vfs" 2>/dev/null || true; fi
    if [ -n "$booted" ]; then virsh -c qemu:///system destroy web-boot >/dev/null 2>&1 || true; fi
    if [ -n "$mounted" ]; then
      umount "$mounted" 2>/dev/null || umount -l "$mounted" 2>/dev/null || true
    fi
    for daemon in "${started[@]}"; do pkill -TERM -x "$daemon" 2>/dev/null || true; done
  }
  trap cleanup EXIT
  if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    for daemon in virtlogd libvirtd; do
      pgrep -x "$daemon" >/dev/null || { "/usr/sbin/$daemon" -d && started+=("$daemon"); }
    done
    for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  local sock=/run/libvirt/libvirt-sock
  [ -S "$sock" ] || die "no libvirtd socket at $sock"

  # The VM storage: every folder above it root's and not writable by
  # others (provd refuses it otherwise); the folders provd hands VMs'
  # files over in are passable by libvirt-qemu.
  say "VM storage $store (shared with the management VM over virtio-fs)"
  # A node's storage holds customers' disks: the flow starts only on a
  # new folder, and never removes one.
  if [ -e "$store" ] && [ -n "$(ls -A "$store")" ]; then
    die "$store exists and is not empty: remove it, or name a new folder with STORE="
  fi
  install -d -m 0711 "$store"
  # The VM can create set-id files in its storage: mounted nosuid (and
  # nodev) on the host, none of them runs set-id here.
  mount --bind "$store" "$store" && mount -o remount,bind,nosuid,nodev "$store" \
    || die "could not mount $store onto itself nosuid,nodev"
  mounted=$store
  install -d -m 0700 "$store/data"

  # The node's certificates and signing key (scripts/dev-node.sh), the
  # manager's beside them, and provd.toml for inside the VM: its /etc/provd,
  # shared read-only.
  local node="$work/node" etc="$work/etc"
  rm -rf "$node" "$etc"
  PORT=$port PROVCTL="$bin/provctl" bash scripts/dev-node.sh "$node" >/dev/null
  install -d -m 0700 "$etc" "$etc/tls"
  install -m 0600 "$node/pki/node.pem" "$node/pki/node.key" "$etc/tls/"
  install -m 0600 "$node/pki/ca.pem" "$etc/tls/managers-ca.pem"
  install -m 0600 "$node/signer.pub" "$etc/signer.pub"
  local domain_type
  domain_type=$(sed -n 's/^domain-type = "\(.*\)"/\1/p' "$node/provd.toml")
  cat >"$etc/provd.toml" <<TOML
# provd inside the management VM (scripts/node-vm.sh run).
data-dir = "$store/data"
listen = "0.0.0.0:7443"
admin-socket = "/run/provd/admin.sock"
trusted-keys = ["/etc/provd/signer.pub"]

[tls]
cert = "/etc/provd/tls/node.pem"
key = "/etc/provd/tls/node.key"
client-ca = "/etc/provd/tls/managers-ca.pem"

[access]
admins = ["admin"]

[policy]
image-sources = ["dir:/srv/provd-images/**"]
vm-bridges = ["br0"]
vm-boot-files = ["vmlinuz", "provd-initrd.img"]
vm-cmdlines = ["console=ttyS0 *"]

[capacity]
vcpus = 8
memory-mib = 16384
disk-bytes = 107374182400

# The host's libvirtd, through the forward qemu makes to its unix socket.
[hypervisor]
domain-type = "$domain_type"
libvirt-uri = "qemu+tcp://10.0.2.100:16509/system"
user = "libvirt-qemu"
group = "libvirt-qemu"
vm-dir = "$store/vms"
TOML
  chmod 0600 "$etc/provd.toml"

  say "demo images and the guest kernel"
  local images="$work/images"
  bash scripts/demo-images.sh "$images"
  local kernel=${KERNEL_DIR:-$work/kernel}
  bash scripts/guest-kernel.sh "$kernel"
  install -d -m 0700 "$store/data/boot"
  cp "$kernel/vmlinuz" "$store/data/boot/vmlinuz"
  "$bin/provctl" boot initramfs --modules-dir "$kernel/modules" \
    -o "$store/data/boot/provd-initrd.img" >/dev/null

  # Read-only disks for the VM: its /etc/provd and the images.
  rm -f "$work/etc.img" "$work/images.img"
  mke2fs -q -t ext4 -L provd-etc -d "$etc" "$work/etc.img" 16M
  mke2fs -q -t ext4 -L provd-images -d "$images" "$work/images.img" \
    "$(( $(du -sm "$images" | cut -f1) * 2 + 64 ))M"

  # The management VM's first boot: provd deploys, provisions and stops.
  local url="https://127.0.0.1:$port"
  # shellcheck disable=SC1091
  source "$node/manager.env"
  start_vm "$image" "$store" "$work" "$port" "$sock" first
  provctl bundle build plugins/shared-partition -o "$work/shared-partition.provd" >/dev/null
  provctl bundle sign "$work/shared-partition.provd" --key "$node/signer.key"
  provctl deploy "$work/shared-partition.provd" --node "$url"
  mkdir -p "$work/vms"
  cat >"$work/vms/web-1.json" <<JSON
{ "name": "web-1", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
  "image": "dir:/srv/provd-images/web", "boot": { "firmware": "uefi" },
  "cloud-init": { "hostname": "web-1.example" } }
JSON
  cat >"$work/vms/web-boot.json" <<JSON
{ "name": "web-boot", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
  "image": "dir:/srv/provd-images/web",
  "boot": { "kernel": "vmlinuz", "initrd": "provd-initrd.img",
            "cmdline": "console=ttyS0 panic=-1 init=/usr/sbin/provd-check" },
  "cloud-init": { "hostname": "web-boot.example" } }
JSON
  say "provisioning web-1 and web-boot inside the management VM"
  local t1=$SECONDS
  provctl provision --plugin shared-partition --vm "$work/vms/web-1.json" --vm "$work/vms/web-boot.json" \
    --params '{"shared-format": "erofs", "private-format": "ext4"}' \
    --idempotency-key node-vm --node "$url" | tee "$work/report.txt"
  say "provisioned in $((SECONDS - t1)) s"
  # The formats provd builds with external tools, under the unit's
  # confinement: api's own files in a compressed layer (mkfs.erofs), its
  # private partition as qcow2 (qemu-img).
  cat >"$work/vms/api-1.json" <<JSON
{ "name": "api-1", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
  "image": "dir:/srv/provd-images/api", "boot": { "firmware": "uefi" } }
JSON
  say "provisioning api-1 inside the management VM (erofs-lz4, qcow2)"
  provctl provision --plugin shared-partition --vm "$work/vms/api-1.json" \
    --params '{"shared-format": "erofs-lz4", "private-format": "qcow2"}' \
    --idempotency-key node-vm-api --node "$url" | tee "$work/report-api.txt"
  provctl vms --node "$url"
  stop_vm

  # Before any guest writes to its private partition: everything the
  # management VM wrote, checked on the host against the images.
  say "verifying on the host what the management VM wrote"
  "$bin/provctl" partition verify --data-dir "$store/data"
  for xml in "$store"/data/vms/*/domain.xml; do
    virt-xml-validate "$xml" domain >/dev/null
  done
  say "every partition exact, every domain XML valid libvirt"

  # Its second boot: the VM keeps no state of its own (its root disk is
  # a snapshot); the node's is on the host's storage.
  start_vm "$image" "$store" "$work" "$port" "$sock" second
  say "starting web-boot on the host through provd (its console follows)"
  booted=1
  provctl start web-boot --node "$url"
  local log="$store/data/vms/web-boot/serial.log" ended=0
  for _ in $(seq 600); do
    if grep -q '^provd-check: end' "$log" 2>/dev/null; then ended=1; break; fi
    sleep 0.5
  done
  cat "$log" 2>/dev/null | tr -d '\r' >"$work/console-web-boot.txt" || true
  provctl stop web-boot --force --node "$url" >/dev/null
  grep '^provd-check:' "$work/console-web-boot.txt" || true
  [ "$ended" = 1 ] || die "web-boot did not end its check in 300 s; see $work/console-web-boot.txt"
  grep -q '^provd-check: root overlay' "$work/console-web-boot.txt" \
    || die "web-boot did not report an overlay root; see $work/console-web-boot.txt"
  provctl vms --node "$url"
  stop_vm
  say "done: web-1, web-boot and api-1 provisioned inside the management VM, web-boot booted by the host"
}

# start_vm IMAGE STORE WORK PORT LIBVIRT_SOCK NAME: boots the management VM
# with STORE as its storage and waits until provd answers. STORE is a host
# folder (virtio-fs) or, for the benchmark, a disk image file (block).
start_vm() {
  local image=$1 store=$2 work=$3 port=$4 sock=$5 name=$6
  local mib=${NODE_VM_MIB:-1536} storage=() spec
  if [ -f "$store" ]; then
    storage=(-drive "file=$store,if=virtio,format=raw,cache=none,aio=native")
    spec=LABEL=provd-store:${STORE_PATH:-/var/lib/provd-node}
  else
    # virtiofsd serves the storage as root, so that provd inside sets
    # owners and modes the host's libvirt-qemu sees; without CAP_MKNOD, so
    # that the VM cannot put a device node on the host, nor a file
    # capability (CAP_SETFCAP). Extended attributes are on: mkfs.erofs and
    # mke2fs list them in their staging trees; without CAP_SYS_ADMIN the VM
    # cannot set trusted.* ones.
    local vfs_sock="$work/store.sock"
    rm -f "$vfs_sock"
    # VIRTIOFSD_OPTS (unquoted: several options) for the benchmark's variants.
    # shellcheck disable=SC2086
    /usr/lib/qemu/virtiofsd --socket-path="$vfs_sock" -o source="$store" \
      -o sandbox=chroot -o modcaps=-mknod:-setfcap -o xattr -o log_level=warn \
      ${VIRTIOFSD_OPTS:--o cache=auto} \
      >>"$work/virtiofsd.log" 2>&1 &
    vfs=$!
    for _ in $(seq 50); do [ -S "$vfs_sock" ] && break; sleep 0.1; done
    [ -S "$vfs_sock" ] || { cat "$work/virtiofsd.log" >&2; die "virtiofsd did not start"; }
    storage=(-chardev "socket,id=store,path=$vfs_sock" -device vhost-user-fs-pci,chardev=store,tag=store)
    spec=store:$store
  fi
  local accel=tcg,thread=multi
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; fi
  console="$work/node-vm-$name.console"
  qmp="$work/qmp.sock"
  rm -f "$console" "$qmp"
  say "booting the management VM ($accel, $name boot); console in $console"
  # vhost-user needs the VM's memory shared with virtiofsd.
  qemu-system-x86_64 -name provd-node -machine q35,memory-backend=mem -accel "$accel" \
    -cpu max -smp 2 -m "$mib" -object "memory-backend-memfd,id=mem,size=${mib}M,share=on" \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 quiet provd.store=$spec" \
    -drive "file=$image/root.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$work/etc.img,if=virtio,format=raw,readonly=on" \
    -drive "file=$work/images.img,if=virtio,format=raw,readonly=on" \
    "${storage[@]}" \
    -netdev "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:7443,guestfwd=tcp:10.0.2.100:16509-cmd:socat STDIO UNIX-CONNECT:$sock" \
    -device virtio-net-pci,netdev=net0 \
    -display none -serial "file:$console" -qmp "unix:$qmp,server=on,wait=off" &
  qemu=$!
  local up=0 t0=$SECONDS
  for _ in $(seq "${BOOT_WAIT:-600}"); do
    kill -0 "$qemu" 2>/dev/null || { tail -n 30 "$console" >&2; die "the management VM stopped"; }
    if provctl health --node "https://127.0.0.1:$port" >/dev/null 2>&1; then up=1; break; fi
    sleep 1
  done
  [ "$up" = 1 ] || { tail -n 30 "$console" >&2; die "provd did not answer at 127.0.0.1:$port"; }
  say "provd answers at https://127.0.0.1:$port from inside the management VM ($((SECONDS - t0)) s after boot)"
}

# Powers the management VM off (ACPI: systemd stops provd, which ends its
# operations) and waits for it and virtiofsd to end.
stop_vm() {
  say "shutting the management VM down"
  # Held open a moment: qemu drops the commands it has not run yet when
  # the monitor's connection closes.
  { printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"system_powerdown"}'; sleep 2; } \
    | socat - "UNIX-CONNECT:$qmp" >/dev/null
  for _ in $(seq 120); do kill -0 "$qemu" 2>/dev/null || break; sleep 1; done
  if kill -0 "$qemu" 2>/dev/null; then die "the management VM did not power off in 120 s"; fi
  wait "$qemu" || true
  if [ -n "$vfs" ]; then
    for _ in $(seq 50); do kill -0 "$vfs" 2>/dev/null || break; sleep 0.1; done
    kill "$vfs" 2>/dev/null || true
    wait "$vfs" 2>/dev/null || true
  fi
  qemu="" vfs=""
  grep -E 'provd-node:|Stopped provd' "$console" || true
}

# provision_set URL IMAGES NAME: the benchmark's requests against the node
# at URL, images under IMAGES (as that node names them): web-1, api-1 and
# db-1 in one request, then web-2, web-3, api-2 and db-2 one at a time, as
# customers order them. Prints one line of wall-clock seconds.
provision_set() {
  local url=$1 images=$2 name=$3 times=() spec t0 t1
  local dir="$BENCH_WORK/vms-$name"
  mkdir -p "$dir"
  for vm in web-1 api-1 db-1 web-2 web-3 api-2 db-2; do
    cat >"$dir/$vm.json" <<JSON
{ "name": "$vm", "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
  "image": "dir:$images/${vm%-*}", "boot": { "firmware": "uefi" } }
JSON
  done
  for request in "web-1 api-1 db-1" web-2 web-3 api-2 db-2; do
    spec=()
    for vm in $request; do spec+=(--vm "$dir/$vm.json"); done
    t0=$(date +%s.%N)
    provctl provision --plugin shared-partition "${spec[@]}" \
      --params '{"shared-format": "erofs", "private-format": "ext4"}' --node "$url" >>"$dir/reports.txt"
    t1=$(date +%s.%N)
    times+=("$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")")
  done
  printf '%-28s first (3 VMs) %6.2f s   then one VM each: %s s\n' "$name" "${times[0]}" "${times[*]:1}" \
    | tee -a "$BENCH_WORK/results.txt"
}

# The benchmark: the same requests to provd on the host, in the management
# VM with its storage over virtio-fs, and in the management VM with its
# storage on a block device (an ext4 disk, as a logical volume would be).
bench() {
  local work=${1:-$(mktemp -d -t provd-node-vm-bench-XXXXXX)}
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
  BENCH_WORK=$work
  local port=${PORT:-7543} image=${IMAGE_DIR:-$work/image} bin host_bytes=""
  local path=${STORE:-/var/lib/provd-node-bench}
  if [ -e "$path" ] && [ -n "$(ls -A "$path")" ]; then
    die "$path exists and is not empty: remove it, or name a new folder with STORE="
  fi
  bin=$(binaries)
  BIN_DIR=$bin build "$image"
  provctl() { "$bin/provctl" "$@"; }
  rm -f "$work/results.txt"
  local node="$work/node" etc="$work/etc"
  rm -rf "$node" "$etc"
  PORT=$port PROVCTL="$bin/provctl" bash scripts/dev-node.sh "$node" >/dev/null
  bash scripts/demo-images.sh "$work/images"
  provctl bundle build plugins/shared-partition -o "$work/shared-partition.provd" >/dev/null
  provctl bundle sign "$work/shared-partition.provd" --key "$node/signer.key" >/dev/null
  # shellcheck disable=SC1091
  source "$node/manager.env"
  local url="https://127.0.0.1:$port"
  # One configuration for the three: no hypervisor connection, so that
  # what is measured is the provisioning (images, plan, partitions, VM
  # configuration) and where it writes.
  config() { # DATA IMAGES LISTEN PKI
    cat <<TOML
data-dir = "$1"
listen = "$3"
trusted-keys = ["$4/signer.pub"]
[tls]
cert = "$4/tls/node.pem"
key = "$4/tls/node.key"
client-ca = "$4/tls/managers-ca.pem"
[access]
admins = ["admin"]
[policy]
image-sources = ["dir:$2/**"]
[capacity]
vcpus = 64
memory-mib = 262144
disk-bytes = 1099511627776
TOML
  }
  install -d -m 0700 "$etc" "$etc/tls"
  install -m 0600 "$node/pki/node.pem" "$node/pki/node.key" "$etc/tls/"
  install -m 0600 "$node/pki/ca.pem" "$etc/tls/managers-ca.pem"
  install -m 0600 "$node/signer.pub" "$etc/signer.pub"
  config "$path/data" /srv/provd-images 0.0.0.0:7443 /etc/provd >"$etc/provd.toml"
  rm -f "$work/etc.img" "$work/images.img"
  mke2fs -q -t ext4 -L provd-etc -d "$etc" "$work/etc.img" 16M
  mke2fs -q -t ext4 -L provd-images -d "$work/images" "$work/images.img" \
    "$(( $(du -sm "$work/images" | cut -f1) * 2 + 64 ))M"

  qemu="" vfs="" hostpid=""
  # shellcheck disable=SC2317
  cleanup() {
    if [ -n "$qemu" ] && kill -0 "$qemu" 2>/dev/null; then kill "$qemu" 2>/dev/null || true; fi
    if [ -n "$vfs" ] && kill -0 "$vfs" 2>/dev/null; then kill "$vfs" 2>/dev/null || true; fi
    if [ -n "$hostpid" ] && kill -0 "$hostpid" 2>/dev/null; then kill "$hostpid" 2>/dev/null || true; fi
  }
  trap cleanup EXIT
  fresh_store() {
    rm -rf "$path"
    install -d -m 0711 "$path"
    install -d -m 0700 "$path/data"
  }

  local candidates=" ${CANDIDATES:-host virtiofs block} "
  if [[ $candidates == *" host "* ]]; then
  say "host: provd serve on this machine"
  fresh_store
  install -d -m 0700 "$work/host"
  cp -a "$etc/tls" "$etc/signer.pub" "$work/host/"
  config "$path/data" "$work/images" "127.0.0.1:$port" "$work/host" >"$work/host/provd.toml"
  "$bin/provd" serve --config "$work/host/provd.toml" >"$work/host/provd.out" 2>"$work/host/provd.log" &
  hostpid=$!
  for _ in $(seq 100); do provctl health --node "$url" >/dev/null 2>&1 && break; sleep 0.2; done
  provctl deploy "$work/shared-partition.provd" --node "$url" >/dev/null
  provision_set "$url" "$work/images" "host"
  kill "$hostpid"; wait "$hostpid" 2>/dev/null || true; hostpid=""
  host_bytes=$(du -sm "$path/data" | cut -f1)
  fi

  if [[ $candidates == *" virtiofs "* ]]; then
  say "management VM, storage over virtio-fs"
  fresh_store
  start_vm "$image" "$path" "$work" "$port" /dev/null bench-virtiofs
  provctl deploy "$work/shared-partition.provd" --node "$url" >/dev/null
  provision_set "$url" /srv/provd-images "management VM, virtio-fs${VIRTIOFSD_OPTS:+ $VIRTIOFSD_OPTS}"
  stop_vm
  fi

  if [[ $candidates == *" block "* ]]; then
  say "management VM, storage on a block device (ext4 on a raw disk, cache=none)"
  local disk="$work/store.img"
  rm -rf "$work/store-tree" "$disk"
  install -d -m 0711 "$work/store-tree"
  install -d -m 0700 "$work/store-tree/data"
  mke2fs -q -t ext4 -L provd-store -d "$work/store-tree" "$disk" 8G
  STORE_PATH=$path start_vm "$image" "$disk" "$work" "$port" /dev/null bench-block
  provctl deploy "$work/shared-partition.provd" --node "$url" >/dev/null
  provision_set "$url" /srv/provd-images "management VM, block"
  stop_vm
  fi
  rm -rf "$path"
  say "results (wall-clock seconds per request; host data $host_bytes MiB):"
  cat "$work/results.txt"
}

case ${1:-} in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  bench) shift; bench "$@" ;;
  *) echo "usage: scripts/node-vm.sh build OUT | run [WORK] | bench [WORK]" >&2; exit 2 ;;
esac
