# Shared by bench-compare.sh, bench-ab.sh, bench-streams.sh and bench-tcp-relay.sh (sourced,
# not run): starting and stopping one contestant pinned to SERVER_CPUS. Needs BIN (the release build folder) and OUT (scratch
# folder) set; sets SERVER_PID. Everything listens on 127.0.0.1.

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=""
TRACE_PID=""
stop_server() {
  if [ -n "$TRACE_PID" ]; then kill "$TRACE_PID" 2>/dev/null || true; wait "$TRACE_PID" 2>/dev/null || true; fi
  TRACE_PID=""
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}

# start_server SPEC PORT PEER_PORT: SPEC is `uturn` (or `uturn@PATH` for another build of the
# binary), `coturn` (COTURN_BIN, default Debian's turnserver), `coturn-fast` (the same with
# --multiplex-peer --udp-gso, coturn 4.17's fastest mode) or `floor` (forwarding to PEER_PORT),
# optionally followed by
# `:VAR=VALUE[,VAR=VALUE]` environment for the relay process. For uturn, an entry `TOML=LINE`
# is not environment: LINE is added to its config file (e.g. `uturn:TOML=reuseport-cpu = true`),
# and an entry `TRACE=QUERY` runs a trace (`GET /trace?QUERY` on an admin endpoint it opens, read
# by curl and discarded) while the relay is loaded (e.g. `uturn:TRACE=client=127.0.0.1`).
start_server() {
  local spec=$1 port=$2 peer=$3 name envs workers bin=$BIN/uturn
  name=${spec%%:*}; envs=""; [ "$spec" != "$name" ] && envs=${spec#*:}
  if [ "${name#*@}" != "$name" ]; then bin=${name#*@}; name=${name%%@*}; fi
  local -a env_args=()
  [ -n "$envs" ] && IFS=',' read -r -a env_args <<< "$envs"
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  case $name in
    uturn)
      # One generator IP makes thousands of allocations per second: lift the per-IP limit on
      # unauthenticated requests (coturn has none by default).
      printf 'unauth-rate = 0\n' > "$OUT/uturn.toml"
      local -a kept=()
      local trace="" admin=""
      for e in "${env_args[@]}"; do
        case $e in
          TOML=*) printf '%s\n' "${e#TOML=}" >> "$OUT/uturn.toml" ;;
          TRACE=*) trace=${e#TRACE=} ;;
          *) kept+=("$e") ;;
        esac
      done
      if [ -n "$trace" ]; then
        admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        printf 'admin-listen = "127.0.0.1:%s"\n' "$admin" >> "$OUT/uturn.toml"
      fi
      env_args=("${kept[@]}")
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" "$bin" --config "$OUT/uturn.toml" --listen 127.0.0.1:"$port" \
        --workers "$workers" --log-level warn --port-range 20000-30000 >/dev/null 2>>"$OUT/uturn.log" &
      ;;
    coturn|coturn-fast)
      local -a fast=()
      [ "$name" = coturn-fast ] && fast=(--multiplex-peer --udp-gso)
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" "${COTURN_BIN:-turnserver}" "${fast[@]}" -n --listening-ip=127.0.0.1 --listening-port="$port" \
        --relay-ip=127.0.0.1 --lt-cred-mech --user=demo:demo --realm=uturn.local --no-tls --no-dtls --no-cli \
        --no-tcp-relay --relay-threads="$workers" --min-port=30001 --max-port=60000 --allow-loopback-peers \
        --pidfile="$OUT/coturn.pid" --log-file="$OUT/coturn.log" --simple-log >/dev/null 2>&1 &
      ;;
    floor)
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" "$BIN"/udp-forwarder --listen 127.0.0.1:"$port" \
        --forward-to 127.0.0.1:"$peer" >/dev/null 2>&1 &
      ;;
    *) echo "unknown contestant $name" >&2; return 2 ;;
  esac
  SERVER_PID=$!
  sleep 1
  if [ "$name" = uturn ] && [ -n "${trace:-}" ]; then
    curl -sN "http://127.0.0.1:$admin/trace?$trace" >/dev/null 2>&1 &
    TRACE_PID=$!
    sleep 0.5
  fi
}

# test_certificate: $OUT/cert.pem and $OUT/key.pem, self-signed for CN localhost (2048-bit RSA).
test_certificate() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" >/dev/null 2>&1
}

# start_stream_relay NAME UTURN_TOML COTURN_ARG...: `uturn` or `coturn` (COTURN_BIN) with one
# worker / relay thread on SERVER_CPUS, listening on UDP and TCP at $PLAIN and on TLS at $SECURE
# (fresh ports, set here) with test_certificate's files. UTURN_TOML is added to uturn's config
# file; the COTURN_ARGs to coturn's command line. Sets SERVER_PID.
start_stream_relay() {
  local name=$1 toml=$2; shift 2
  PLAIN=$(free_port); SECURE=$(free_port)
  case $name in
    uturn)
      printf 'listen = ["udp://127.0.0.1:%s", "tcp://127.0.0.1:%s", "tls://127.0.0.1:%s"]\ntls-cert = "%s"\ntls-key = "%s"\n%s\n' \
        "$PLAIN" "$PLAIN" "$SECURE" "$OUT/cert.pem" "$OUT/key.pem" "$toml" > "$OUT/uturn.toml"
      taskset -c "$SERVER_CPUS" "$BIN/uturn" --config "$OUT/uturn.toml" --workers 1 --log-level warn \
        --port-range 20000-30000 >/dev/null 2>>"$OUT/uturn.log" &
      ;;
    coturn)
      taskset -c "$SERVER_CPUS" "${COTURN_BIN:-turnserver}" -n --listening-ip=127.0.0.1 --listening-port="$PLAIN" \
        --tls-listening-port="$SECURE" --cert="$OUT/cert.pem" --pkey="$OUT/key.pem" --no-dtls \
        --relay-ip=127.0.0.1 --lt-cred-mech --user=demo:demo --realm=uturn.local --no-cli "$@" \
        --relay-threads=1 --min-port=30001 --max-port=60000 --allow-loopback-peers \
        --pidfile="$OUT/coturn.pid" --log-file="$OUT/coturn.log" --simple-log >/dev/null 2>&1 &
      ;;
    *) echo "unknown contestant $name" >&2; return 2 ;;
  esac
  SERVER_PID=$!
  sleep 1.5
}
