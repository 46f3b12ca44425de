#!/usr/bin/env bash
# Builds coturn from source for the benchmarks: COTURN_SRC (a source directory) if set, else
# the release tarball at ../shared/anchors/coturn-*.tar.gz (or COTURN_TARBALL). Prints the path
# of the turnserver binary it built (under target/coturn/), or nothing and exit 1 when neither
# source is there (the benchmarks then use Debian's coturn package).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tarball=${COTURN_TARBALL:-$(ls ../shared/anchors/coturn-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)}
src=${COTURN_SRC:-}
if [ -z "$src" ]; then
  [ -n "$tarball" ] && [ -f "$tarball" ] || exit 1
  name=$(basename "$tarball" .tar.gz)
  src=$root/target/coturn/$name
  if [ ! -d "$src" ]; then
    mkdir -p "$root/target/coturn"
    tar -xzf "$tarball" -C "$root/target/coturn"
  fi
fi
build=$root/target/coturn/build-$(basename "$src")
bin=$build/bin/turnserver
if [ ! -x "$bin" ]; then
  need=()
  for p in cmake libevent-dev libssl-dev libmicrohttpd-dev pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  mkdir -p "$build"
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release >&2
  cmake --build "$build" -j "$(nproc)" --target turnserver >&2
fi
echo "$bin"
