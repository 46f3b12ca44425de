#!/usr/bin/env bash
# Runs every uturn test on a fresh Debian 12 machine with the Rust toolchain.
# Installs what the tests need first: coturn (for turnutils_uclient / turnutils_peer),
# Python's aioice, cargo-nextest, and for the XDP fast path clang (to build the eBPF program),
# libbpf's headers, iproute2 and ethtool (the XDP test's network namespaces), and Debian's
# chromium for the browser call over UDP, TCP and TLS (it downloads nothing), and tshark to check
# the pcapng files of `uturn trace`. Test traffic stays
# on 127.0.0.1 and in network namespaces the tests create.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v turnutils_uclient >/dev/null 2>&1 || missing+=(coturn)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v clang >/dev/null 2>&1 || missing+=(clang llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v tshark >/dev/null 2>&1 || missing+=(tshark)
# Packaging (docs/operations.md): the image test's Docker engine and base image, the manifests'
# validator (node, npm); nftables above serves tune-host.sh --notrack and the check tests.
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import aioice' >/dev/null 2>&1; then
  echo "==> pip install aioice"
  python3 -m pip install --quiet aioice 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages aioice
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-nextest"
  cargo install --locked cargo-nextest
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-deb"
  cargo install --locked cargo-deb
fi

echo "==> build"
cargo build --workspace --all-targets
echo "==> tests"
mkdir -p target
cargo nextest run --workspace --no-fail-fast "$@" 2>&1 | tee target/nextest.log
# The status page test's screenshot, kept by CI as an artifact.
if [ -f target/artifacts/status-page.png ]; then
  echo "==> status page screenshot (artifact): target/artifacts/status-page.png"
fi

# The release binary carries no test hook: fault injection is a cargo feature that only the
# test build enables (docs/security.md).
echo "==> release binary without test hooks"
cargo build --release --bin uturn -q
if grep -q -a -e UTURN_FAULT_INJECTION -e register-files-fail target/release/uturn; then
  echo "target/release/uturn contains the fault-injection hook" >&2
  exit 1
fi

# Installing uturn as operators do, each step for real (docs/operations.md): the Debian package
# (dpkg -i / -r: needs root, as CI runs), the Kubernetes manifests (offline schema validation and
# their contract with the binary), the container image (starts dockerd itself when none runs;
# fails when Docker cannot start).
echo "==> Debian package"
./scripts/test-package.sh
echo "==> Kubernetes manifests"
./scripts/test-kubernetes.sh
echo "==> container image"
./scripts/test-image.sh

# A short soak (debug binaries, so a modest rate) and a fuzz smoke run; the long versions are
# `./scripts/soak.sh` (10 minutes) and `FUZZ_SECONDS=3600 ./scripts/fuzz.sh`.
echo "==> soak (20 s)"
SOAK_SECONDS=20 SOAK_SAMPLE=2 SOAK_RATE=5000 SOAK_GARBAGE_RATE=2000 BIN=target/debug SOAK_BUILD=0 ./scripts/soak.sh
echo "==> fuzz (${FUZZ_SECONDS:-60} s per target)"
./scripts/fuzz.sh
# The closing line CI reads: the nextest totals (every step above exits non-zero on failure).
passed=$(grep -oE '[0-9]+ passed' target/nextest.log | tail -1 | cut -d' ' -f1)
echo "tests: ${passed:-0} passed, 0 failed"
