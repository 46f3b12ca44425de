#!/usr/bin/env bash
# Tests the container image for real. Needs root (it starts dockerd and runs debootstrap).
#  1. Docker: uses the running daemon, or starts `dockerd` (Debian's docker.io) itself with
#     host networking only (--bridge=none --iptables=false) and the vfs storage driver, which
#     work where the overlay driver and iptables do not; FAILS when no daemon can start.
#  2. The base: no registry can be reached, so debian:bookworm-slim is made from Debian's
#     packages (`debootstrap --variant=minbase bookworm`, then `docker import`), its tarball
#     cached under target/docker/ for reruns.
#  3. Builds the Dockerfile at the repository root as it stands (`docker build .`, which takes
#     target/release/uturn), with `--network host` so its apt-get reaches Debian (this daemon
#     has no bridge network).
#  4. Runs it with --network host, configured by UTURN_* variables, listening on a port below
#     1024 as the non-root user (CAP_NET_BIND_SERVICE), waits for the HEALTHCHECK to say
#     healthy, relays a turnutils_uclient session through it, and stops it with SIGTERM.
# Prints the image size. Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-install.sh
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "test-image.sh needs root (dockerd, debootstrap)"
[ -x target/release/uturn ] || fail "target/release/uturn missing: cargo build --release --bin uturn"
work=target/docker
mkdir -p "$work"
export DOCKER_BUILDKIT=0 # the classic builder: no buildx plugin is needed
started_dockerd=""
container=""
cleanup() {
  [ -n "$container" ] && docker rm -f "$container" >/dev/null 2>&1 || true
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.1; done
  fi
}
trap cleanup EXIT

echo "==> docker daemon"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || fail "dockerd missing: apt-get install docker.io"
  dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
    --pidfile "$PWD/$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not start"; }
  echo "    started dockerd (pid $started_dockerd, vfs storage, host networking only)"
fi
echo "    server $(docker version -f '{{.Server.Version}}'), storage $(docker info -f '{{.Driver}}')"

echo "==> base image debian:bookworm-slim from debootstrap --variant=minbase"
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  tarball=$work/bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || fail "debootstrap missing: apt-get install debootstrap"
    rootfs=$(mktemp -d /tmp/uturn-rootfs.XXXXXX)
    chmod 0755 "$rootfs" # mktemp made it 0700: it becomes the image's /
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; rm -rf "$rootfs"; fail "debootstrap"; }
    # As the real slim image: no package cache, no lists, no docs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . >"$tarball.tmp" && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  docker import "$tarball" debian:bookworm-slim >/dev/null
fi
echo "    $(docker image inspect -f '{{.Size}}' debian:bookworm-slim | awk '{printf "%.1f MB", $1/1e6}')"

echo "==> docker build"
docker build --network host -t uturn:test . >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; fail "docker build"; }
size=$(docker image inspect -f '{{.Size}}' uturn:test)
echo "    image uturn:test: $(awk -v s="$size" 'BEGIN{printf "%.1f MB", s/1e6}') ($size bytes)"
[ "$(docker image inspect -f '{{.Config.User}}' uturn:test)" = "uturn:uturn" ] || fail "image does not run as uturn"
docker image inspect -f '{{json .Config.Healthcheck.Test}}' uturn:test | grep -q '/health' || fail "no HEALTHCHECK on /health"

echo "==> check-config in the image"
docker run --rm --network host uturn:test check-config | sed 's/^/    /'

echo "==> run it: --network host, UTURN_* variables, a port below 1024 as a non-root user"
low=""
for p in $(shuf -i 900-1023 -n 60); do
  if python3 -c "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('127.0.0.1',$p))" 2>/dev/null; then
    low=$p && break
  fi
done
[ -n "$low" ] || fail "no free UDP port below 1024"
admin=$(free_port)
lo=$((50000 + RANDOM % 10000))
container=$(docker run -d --network host -e "UTURN_LISTEN=127.0.0.1:$low" -e "UTURN_ADMIN_LISTEN=127.0.0.1:$admin" \
  -e "UTURN_PORT_RANGE=$lo-$((lo + 199))" uturn:test --rfc5766-channels --workers 2)
for _ in $(seq 60); do
  state=$(docker inspect -f '{{.State.Health.Status}}' "$container")
  [ "$state" = healthy ] && break
  [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] || break
  sleep 0.5
done
[ "$state" = healthy ] || { docker logs "$container" >&2; fail "container not healthy ($state)"; }
pid=$(docker inspect -f '{{.State.Pid}}' "$container")
[ "$(stat -c %u "/proc/$pid")" = 10001 ] || fail "the relay does not run as uid 10001"
capeff=$(awk '/^CapEff/ {print $2}' "/proc/$pid/status")
echo "    healthy; pid $pid runs as uid 10001 with CapEff $capeff on udp 127.0.0.1:$low"
[ "$capeff" = 0000000000000400 ] || fail "CapEff $capeff is not CAP_NET_BIND_SERVICE alone"
uclient_session "$low" | sed 's/^/    /' || { docker logs "$container" >&2; fail "no session through the container"; }

echo "==> docker stop"
docker stop -t 10 "$container" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { docker logs "$container" >&2; fail "the relay exited $code on SIGTERM"; }
docker rm "$container" >/dev/null
container=""
# vfs copies every layer whole: keep only the base image (and its cached tarball) for the next run.
docker rmi uturn:test >/dev/null
docker image prune -f >/dev/null
echo "image: 1 passed"
