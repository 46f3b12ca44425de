#!/usr/bin/env bash
# Tests deploy/kubernetes without a cluster (none can run here):
#  1. every manifest validates offline against the Kubernetes OpenAPI schema (the npm package
#     kubernetes-models, installed by `npm ci` from deploy/kubernetes/validate's lock file), and
#     a manifest with a wrong type fails that validation;
#  2. the contract between the manifests and the binary: the files the DaemonSet mounts (the
#     ConfigMap's uturn.toml, the Secret's REST secrets) and its args are accepted by
#     `uturn check-config`, and a relay started with them (adjusted for loopback: listen, admin
#     and metrics ports, the Redis address) answers the readiness and liveness probes' paths
#     and the metrics Service's port, and the preStop hook drains it until it exits 0.
# Uses target/release/uturn (scripts/test.sh builds it) or $UTURN_BIN. Needs node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib-install.sh
bin=$(realpath "${UTURN_BIN:-target/release/uturn}")
out=target/kubernetes
rm -rf "$out" && mkdir -p "$out"
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "==> validate deploy/kubernetes against the Kubernetes schema (kubernetes-models)"
(cd deploy/kubernetes/validate && npm ci --no-audit --no-fund --silent)
node deploy/kubernetes/validate/validate.mjs deploy/kubernetes "$out/contract.json" | tee "$out/validation.txt"
# The validation can fail: a probe period that is not an integer.
mkdir -p "$out/broken" && cp deploy/kubernetes/*.yaml "$out/broken/"
sed -i '0,/periodSeconds: 5$/s//periodSeconds: "5s"/' "$out/broken/daemonset.yaml"
if node deploy/kubernetes/validate/validate.mjs "$out/broken" >"$out/broken.txt"; then
  fail "a DaemonSet with periodSeconds: \"5s\" passed the validation"
fi
grep -q 'periodSeconds must be integer' "$out/broken.txt" || fail "unexpected validation output: $(cat "$out/broken.txt")"

echo "==> contract: the manifests' config and args against uturn check-config"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$out/redis.log" 2>&1 &
redis_pid=$!
relay_pid=""
trap 'kill $redis_pid ${relay_pid:-} 2>/dev/null || true' EXIT
# The mounted files under $out/root, the config's paths pointing there, the Redis on loopback;
# $(HOST_IP) and $(NODE_NAME) as the kubelet would expand them on a node 127.0.0.1.
python3 - "$out" "$redis_port" <<'PY'
import json, os, sys
out, redis_port = sys.argv[1], sys.argv[2]
root = os.path.abspath(os.path.join(out, "root"))
c = json.load(open(os.path.join(out, "contract.json")))
for path, text in c["files"].items():
    dest = root + path
    if path.endswith("uturn.toml"):
        for mount in c["files"]:
            text = text.replace('"' + os.path.dirname(mount) + "/", '"' + root + os.path.dirname(mount) + "/")
        text = text.replace("redis://uturn-redis:6379/", f"redis://127.0.0.1:{redis_port}/")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    open(dest, "w").write(text)
env = {"HOST_IP": "127.0.0.1", "NODE_NAME": "test-node"}
args = []
for a in c["args"]:
    for k, v in env.items():
        a = a.replace(f"$({k})", v)
    args.append(a.replace("=/etc/", "=" + root + "/etc/"))
open(os.path.join(out, "args"), "w").write("\n".join(args) + "\n")
open(os.path.join(out, "probes"), "w").write(
    f'{c["readiness"]["path"]} {c["readiness"]["port"]} {c["liveness"]["path"]} {c["liveness"]["port"]} {c["metricsPort"]}\n')
open(os.path.join(out, "prestop"), "w").write(c["preStop"][2] if c["preStop"][:2] == ["/bin/bash", "-c"] else "")
PY
mapfile -t args <"$out/args"
read -r ready_path ready_port live_path live_port metrics_port <"$out/probes"
prestop=$(cat "$out/prestop")
[ -n "$prestop" ] || fail "the preStop hook is not a /bin/bash -c command"
grep -q 'fleet-redis = "redis://127.0.0.1:' "$out/root/etc/uturn/uturn.toml" || fail "no fleet-redis in the ConfigMap"
"$bin" "${args[@]}" check-config | tee "$out/check-config.txt"

echo "==> contract: probes, metrics and the preStop drain on the admin API"
port=$(free_port)
admin=$(free_port)
metrics=$(free_port)
[ "$ready_port" = "$live_port" ] || fail "readiness and liveness probe different ports"
grep -q "admin-listen = \"127.0.0.1:$ready_port\"" "$out/root/etc/uturn/uturn.toml" || fail "the probes' port is not admin-listen"
grep -q "metrics-listen = \"0.0.0.0:$metrics_port\"" "$out/root/etc/uturn/uturn.toml" || fail "the metrics port is not metrics-listen"
"$bin" "${args[@]}" --listen "127.0.0.1:$port" --listen "tcp://127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
  --metrics-listen "127.0.0.1:$metrics" --workers 2 >"$out/relay.out" 2>"$out/relay.log" &
relay_pid=$!
wait_status "$admin" "$ready_path" 200 10 || { cat "$out/relay.log"; fail "readiness path $ready_path"; }
[ "$(http_get "$admin" "$live_path")" = 200 ] || fail "liveness path $live_path"
[ "$(http_get "$metrics" /metrics)" = 200 ] || fail "GET /metrics"
# The preStop hook, pointed at this relay's admin port and binary.
hook=${prestop//:$ready_port/:$admin}
hook=${hook//\/usr\/bin\/uturn/$bin}
start=$(date +%s)
timeout 30 bash -c "$hook" >"$out/prestop.out" 2>&1 || { cat "$out/prestop.out"; fail "the preStop hook failed"; }
wait "$relay_pid" || fail "the relay exited non-zero after the drain"
relay_pid=""
grep -q '"draining":true' "$out/prestop.out" || fail "the preStop hook did not drain: $(cat "$out/prestop.out")"
echo "    preStop drained the relay; it exited 0 after $(( $(date +%s) - start )) s"
echo "kubernetes: 1 passed"
