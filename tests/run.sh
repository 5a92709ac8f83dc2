#!/usr/bin/env bash
# Runs every Shoal test on a fresh Debian 12 machine, as root: installs the real servers the tests
# use (docker-registry, containerd, runc, umoci, skopeo, ...) when missing, builds, then tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: the end-to-end tests start containerd and mount filesystems; run as root" >&2
    exit 1
fi

# command -> Debian package that provides it
declare -A packages=(
    [docker-registry]=docker-registry
    [containerd]=containerd
    [runc]=runc
    [umoci]=umoci
    [skopeo]=skopeo
    [busybox]=busybox-static
    [htpasswd]=apache2-utils
    [nginx]=nginx-light
    [curl]=curl
    [ip]=iproute2
    [tc]=iproute2
    [openssl]=openssl
    [aria2c]=aria2
    [opentracker]=opentracker
    [transmission-create]=transmission-cli
    [fusermount3]=fuse3
    [debootstrap]=debootstrap
)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
# The benchmark's plots are labelled with this font.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Kubernetes schema check for deploy/ (offline, bundled schemas).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    python3 -m pip install -q kubernetes-validate==1.37.0
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi

cargo build --release --locked --workspace --bins
cargo test --release --locked --workspace "$@"
