# Shell helpers shared by scripts/test-package.sh and scripts/test-image.sh: free loopback
# ports, waiting for the admin API, and one coturn turnutils_uclient session through a relay.
# Source it; every wait is bounded, and traffic stays on 127.0.0.1.

# A free port on 127.0.0.1 (UDP and TCP both free at the time of asking).
free_port() {
  python3 - <<'PY'
import socket, random
for _ in range(200):
    p = random.randint(20000, 45000)
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", p))
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM); t.bind(("127.0.0.1", p))
        u.close(); t.close(); print(p); break
    except OSError:
        pass
PY
}

# http_get PORT PATH: the status line's code of `GET PATH` on 127.0.0.1:PORT (bash's /dev/tcp;
# uturn's admin API wants `Host: IP:PORT`), or 000 when nothing answers.
http_get() {
  local port=$1 path=$2 reply
  reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'GET $path HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nConnection: close\r\n\r\n' >&3 && cat <&3" 2>/dev/null) || true
  echo "${reply:-HTTP/1.1 000}" | head -1 | awk '{print $2}'
}

# http_post PORT PATH: like http_get, with POST.
http_post() {
  local port=$1 path=$2 reply
  reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'POST $path HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' >&3 && cat <&3" 2>/dev/null) || true
  echo "${reply:-HTTP/1.1 000}" | head -1 | awk '{print $2}'
}

# wait_status PORT PATH CODE SECONDS: polls until GET PATH answers CODE; fails after SECONDS.
wait_status() {
  local port=$1 path=$2 want=$3 limit=$4 i
  for ((i = 0; i < limit * 5; i++)); do
    [ "$(http_get "$port" "$path")" = "$want" ] && return 0
    sleep 0.2
  done
  echo "GET $path on 127.0.0.1:$port did not answer $want within ${limit}s" >&2
  return 1
}

# uclient_session PORT: one turnutils_uclient client-to-client session (-y: two allocations
# on the relay send to each other through channels) over UDP to 127.0.0.1:PORT with the demo
# credential; fails unless every message came back. The relay needs --rfc5766-channels
# (uclient picks RFC 5766 channel numbers).
uclient_session() {
  local port=$1 out
  out=$(timeout 60 turnutils_uclient -y -u demo -w demo -p "$port" -n 20 -l 120 -m 1 127.0.0.1 2>&1) || {
    echo "$out" >&2
    echo "turnutils_uclient failed against 127.0.0.1:$port" >&2
    return 1
  }
  if ! grep -q 'Total lost packets 0 (0.000000%)' <<<"$out"; then
    echo "$out" >&2
    echo "turnutils_uclient lost packets through 127.0.0.1:$port" >&2
    return 1
  fi
  grep -E 'tot_send_msgs|Total lost' <<<"$out" | tail -2
}
