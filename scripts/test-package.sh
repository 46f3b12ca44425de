#!/usr/bin/env bash
# Tests the Debian package for real: builds it with cargo-deb from target/release/uturn (run
# `cargo build --release --bin uturn` first; scripts/test.sh does), installs it with `dpkg -i`
# on this machine, checks the system user, the conffile's owner and mode, runs the installed
# /usr/bin/uturn (--version, check-config as the uturn user, then the relay itself as that
# user on loopback with a turnutils_uclient session through it and the admin API's probes),
# verifies the systemd unit with `systemd-analyze verify`, removes the package with `dpkg -r`
# and checks that only the conffile is left, then purges it.
#
# Needs root (dpkg, adduser, runuser, setpriv): we are root here and so is CI. Leaves the machine as it
# found it: a uturn package installed before is refused, not replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-install.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "test-package.sh needs root (dpkg -i / -r); run it as root or with sudo" >&2
  exit 1
fi
if dpkg-query -W -f='${Status}' uturn 2>/dev/null | grep -q installed; then
  echo "a uturn package is installed on this machine already; remove it first (dpkg --purge uturn)" >&2
  exit 1
fi
[ -x target/release/uturn ] || { echo "target/release/uturn missing: cargo build --release --bin uturn" >&2; exit 1; }
want_version=$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)

echo "==> cargo deb (from target/release/uturn, stripped)"
rm -f target/debian/uturn_*.deb
cargo deb -p uturn-controlplane --no-build --strip -q >/dev/null
deb=$(ls target/debian/uturn_*_amd64.deb)
echo "    $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb -c "$deb" | awk '{print "    " $1, $2, $3, $6}'
dpkg-deb -c "$deb" | awk '{print $6}' | sed 's#^\./#/#' | grep -v '/$' > target/debian/files.txt

relay_pid=""
cleanup() {
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
  if dpkg-query -W -f='${Status}' uturn 2>/dev/null | grep -qv 'not-installed'; then
    dpkg --purge uturn >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

echo "==> dpkg -i"
dpkg -i "$deb" >/dev/null
fail() { echo "FAIL: $*" >&2; exit 1; }
id uturn >/dev/null || fail "no uturn user after install"
[ "$(getent passwd uturn | cut -d: -f7)" = /usr/sbin/nologin ] || fail "uturn user has a login shell"
[ "$(stat -c '%U:%G %a' /etc/uturn/uturn.toml)" = "root:uturn 640" ] \
  || fail "/etc/uturn/uturn.toml is $(stat -c '%U:%G %a' /etc/uturn/uturn.toml), not root:uturn 640"
[ "$(stat -c '%U:%G' /var/lib/uturn)" = "uturn:uturn" ] || fail "/var/lib/uturn not owned by uturn"
grep -qx /etc/uturn/uturn.toml /var/lib/dpkg/info/uturn.conffiles || fail "uturn.toml is not a conffile"
cmp -s /etc/uturn/uturn.toml docs/uturn.example.toml || fail "/etc/uturn/uturn.toml differs from docs/uturn.example.toml"
file /usr/bin/uturn | grep -q 'stripped' && ! file /usr/bin/uturn | grep -q 'not stripped' || fail "/usr/bin/uturn is not stripped"

echo "==> installed binary"
got=$(/usr/bin/uturn --version)
[ "$got" = "uturn $want_version" ] || fail "uturn --version said '$got', want 'uturn $want_version'"
echo "    $got"
runuser -u uturn -- /usr/bin/uturn check-config --config /etc/uturn/uturn.toml | sed 's/^/    /'
# nginx -t's contract: a broken file fails with the reason.
printf 'listen = [\n' > target/debian/broken.toml
if /usr/bin/uturn check-config --config target/debian/broken.toml 2>target/debian/broken.err; then
  fail "check-config accepted a broken file"
fi
grep -q 'test failed' target/debian/broken.err || fail "check-config gave no reason: $(cat target/debian/broken.err)"

echo "==> the installed relay, as the uturn user, on loopback"
port=$(free_port)
admin=$(free_port)
lo=$((50000 + RANDOM % 10000))
# setpriv execs (runuser would stay as the parent), so $! is the relay itself.
setpriv --reuid uturn --regid uturn --init-groups /usr/bin/uturn --config /etc/uturn/uturn.toml --listen "127.0.0.1:$port" \
  --port-range "$lo-$((lo + 199))" --admin-listen "127.0.0.1:$admin" --rfc5766-channels --workers 2 \
  >target/debian/relay.out 2>target/debian/relay.log &
relay_pid=$!
wait_status "$admin" /ready 200 10 || { cat target/debian/relay.log; fail "installed relay not ready"; }
[ "$(ps -o user= -p "$relay_pid")" = uturn ] || fail "relay does not run as uturn"
uclient_session "$port" | sed 's/^/    /' || { cat target/debian/relay.log; fail "no session through the installed relay"; }
[ "$(http_get "$admin" /health)" = 200 ] || fail "GET /health"
kill -TERM "$relay_pid"
for _ in $(seq 50); do kill -0 "$relay_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$relay_pid" 2>/dev/null && fail "relay did not stop on SIGTERM"
wait "$relay_pid" || fail "relay exited non-zero on SIGTERM"
relay_pid=""

echo "==> systemd-analyze verify"
systemd-analyze verify /usr/lib/systemd/system/uturn.service
grep -q '^User=uturn$' /usr/lib/systemd/system/uturn.service || fail "unit not User=uturn"
grep -q '^ExecStart=/usr/bin/uturn --config /etc/uturn/uturn.toml$' /usr/lib/systemd/system/uturn.service \
  || fail "unit's ExecStart"
grep -q '^ExecStartPre=/usr/bin/uturn check-config' /usr/lib/systemd/system/uturn.service || fail "unit's ExecStartPre"

echo "==> dpkg -r: only the conffile stays"
dpkg -r uturn >/dev/null
dpkg-query -W -f='${Status}\n' uturn | grep -q 'config-files' || fail "status after -r: $(dpkg-query -W -f='${Status}' uturn)"
while read -r f; do
  if [ "$f" = /etc/uturn/uturn.toml ]; then
    [ -f "$f" ] || fail "the conffile went with dpkg -r"
  elif [ -e "$f" ]; then
    fail "$f is left after dpkg -r"
  fi
done < target/debian/files.txt
echo "    left: $(ls /etc/uturn)"

echo "==> dpkg --purge"
dpkg --purge uturn >/dev/null
[ ! -e /etc/uturn ] || fail "/etc/uturn left after purge"
[ ! -e /var/lib/uturn ] || fail "/var/lib/uturn left after purge"
dpkg-statoverride --list /etc/uturn/uturn.toml >/dev/null 2>&1 && fail "statoverride left after purge"
echo "package: 1 passed"
