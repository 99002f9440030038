#!/usr/bin/env bash
# Prepares a node directory to try provd on one machine:
#   a CA, the node's certificate (127.0.0.1, localhost), a manager
#   certificate signed by the same CA, a bundle-signing key pair, and
#   provd.toml listening on 127.0.0.1:${PORT:-7443}; with LIBVIRT_URI and
#   VM_DIR, VMs are handed to that libvirtd (docs/api.md, [hypervisor]).
# Real nodes get their certificates from the operator's PKI; this is for trying.
#
#   scripts/dev-node.sh DIR
set -euo pipefail
dir=${1:?usage: scripts/dev-node.sh DIR}
port=${PORT:-7443}
provctl=${PROVCTL:-provctl}
mkdir -p "$dir/pki"
cd "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key pki/ca.key
openssl req -x509 -new -key pki/ca.key -days 365 -subj "/CN=provd dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out pki/ca.pem 2>/dev/null

issue() { # name cn extensions
  key "pki/$1.key"
  openssl req -new -key "pki/$1.key" -subj "/CN=$2" -out "pki/$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "pki/$1.ext"
  openssl x509 -req -in "pki/$1.csr" -CA pki/ca.pem -CAkey pki/ca.key -CAcreateserial \
    -days 365 -extfile "pki/$1.ext" -out "pki/$1.pem" 2>/dev/null
  rm -f "pki/$1.csr" "pki/$1.ext"
}
issue node "provd node" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
issue manager "admin" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"

"$provctl" keygen signer --dir . >/dev/null

# KVM where this machine has it (the device and the CPU's extensions: a
# nested VM may offer the one without the other), emulation otherwise;
# the same domains run under both.
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
  domain_type=kvm
else
  domain_type=qemu
fi

cat > provd.toml <<TOML
# provd serve --config provd.toml (docs/api.md lists every key)
data-dir = "data"
listen = "127.0.0.1:$port"
admin-socket = "admin.sock"
trusted-keys = ["signer.pub"]

[tls]
cert = "pki/node.pem"
key = "pki/node.key"
client-ca = "pki/ca.pem"

# Manager certificates by common name (or group:O) and what they may do:
# admins everything, operators operations and VMs, readers GET only.
[access]
admins = ["admin"]

[policy]
image-sources = ["dir:$(pwd)/images/**"]
# The host networks and boot files VMs may use; none unless listed.
vm-bridges = ["br0"]
vm-taps = ["tap-*"]
vm-boot-files = ["vmlinuz", "provd-initrd.img"]
vm-cmdlines = ["console=ttyS0 *"]

# The provider's public catalogue: VMs of every tenant share its layers.
# Any other image is its VM's tenant's own.
[sharing]
public-images = ["dir:$(pwd)/images/web", "dir:$(pwd)/images/api", "dir:$(pwd)/images/db"]
# One provider's demo node: the catalogue's partitions are persistent memory
# that every guest maps with DAX, one copy in host memory. A node of many
# customers leaves this false (the default): host pages two tenants' guests
# read are a timing side channel between them (docs/security.md).
share-public-memory = true

[capacity]
vcpus = 8
memory-mib = 16384
disk-bytes = 107374182400

# How QEMU runs the VMs' CPUs: "kvm" or "qemu" (emulation).
[hypervisor]
domain-type = "$domain_type"
TOML

# With LIBVIRT_URI (and VM_DIR), the node hands its VMs to that libvirtd,
# whose QEMU runs as Debian's libvirt-qemu and reaches the VMs' files
# through VM_DIR, on the data directory's filesystem.
if [ -n "${LIBVIRT_URI:-}" ]; then
  cat >> provd.toml <<TOML
libvirt-uri = "$LIBVIRT_URI"
user = "libvirt-qemu"
group = "libvirt-qemu"
vm-dir = "${VM_DIR:?VM_DIR: the folder VMs are handed over in}"
TOML
fi

cat > manager.env <<ENV
export PROVCTL_CA=$(pwd)/pki/ca.pem
export PROVCTL_CERT=$(pwd)/pki/manager.pem
export PROVCTL_KEY=$(pwd)/pki/manager.key
ENV
echo "node directory ready: $(pwd)"
echo "  start the node:  provd serve --config $(pwd)/provd.toml"
echo "  as the manager:  source $(pwd)/manager.env; provctl health --node https://127.0.0.1:$port"
