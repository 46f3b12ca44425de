#!/usr/bin/env python3
"""A real WebRTC call through uturn, made by headless Chromium (stdlib only, no pip packages).

For each transport whose port is given (udp, tcp, tls) the page browser_call.html (served from
a local http.server thread on http://localhost:<free port>) opens two RTCPeerConnections with
iceTransportPolicy "relay" and a single TURN server:
    udp -> turn:HOST:UDPPORT?transport=udp
    tcp -> turn:HOST:TCPPORT?transport=tcp
    tls -> turns:TLSNAME:TLSPORT?transport=tcp
The PCs swap offer/answer and trickled candidates directly in JS; then the script checks:
  * data channel: N messages each way arrive complete, intact and in order;
  * audio: a WebAudio oscillator track (AudioContext -> OscillatorNode ->
    MediaStreamDestination) sent a -> b; b's inbound-rtp audio has packetsReceived >= a
    threshold and codec audio/opus;
  * getStats(): on both PCs the selected candidate pair (transport.selectedCandidatePairId, or
    the nominated succeeded pair) has local and remote candidates of type "relay", both at
    --relay-ip (the TURN server's relayed addresses), a's local = b's remote and vice versa, and
    each local candidate's relayProtocol is the transport under test.
It prints one JSON line of findings per transport and "browser call over <t>: ok" for each
that passes; it exits 0 only if every check passed for every transport.

Chromium is driven over the DevTools protocol on --remote-debugging-pipe: the browser reads
commands on fd 3 and writes replies/events on fd 4, each a JSON text ended by a NUL byte.
Chromium flags, and why:
  --headless --disable-gpu            no display, no GPU on the test machine
  --no-sandbox                        runs as root / in containers without user namespaces
  --user-data-dir=<tempdir>           fresh profile, removed afterwards; also required for
                                      --ignore-certificate-errors-spki-list to take effect
  --no-first-run --disable-sync --disable-background-networking --disable-component-update
  --disable-extensions --disable-default-apps --no-pings --disable-domain-reliability
  --disable-client-side-phishing-detection --metrics-recording-only
                                      Chromium must download or phone home nothing
  --host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE <--host>, ...
                                      every name but localhost fails to resolve, so nothing
                                      can leave the machine by name. The rules apply to IP
                                      literals too: TURN over TCP to turn:127.0.0.1 fails with
                                      ERR_NAME_NOT_RESOLVED unless --host (and --tls-name) are
                                      excluded as well, so they are
  --allow-loopback-in-peer-connection WebRTC ignores loopback interfaces otherwise, and no
                                      socket opens where lo is the only usable interface
  --disable-features=WebRtcHideLocalIpsWithMdns
                                      host candidates as real IPs, not .local mDNS names
  --autoplay-policy=no-user-gesture-required
                                      the AudioContext starts running without a user gesture
  --ignore-certificate-errors-spki-list=<b64 sha256 of SPKI>
                                      (tls only) trust the relay's test certificate; given by
                                      --spki or computed from --cert with openssl
  --mute-audio                        nothing reaches a real audio device
  --enable-logging=stderr             Chromium's stderr tail is printed on failure
The launcher script /usr/bin/chromium adds flags of its own (remote extensions, ...); when
/usr/lib/chromium/chromium exists it is run directly instead (same PID either way, as the
launcher execs it). The browser is ended by its PID at the end, also on failure.
"""

import argparse
import statistics
import base64
import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "browser_call.html")
PER_TRANSPORT_S = 15.0


class CDPError(Exception):
    pass


class CDP:
    """DevTools protocol over a pipe pair: NUL-terminated JSON both ways."""

    def __init__(self, wfd, rfd):
        self.wfd, self.rfd = wfd, rfd
        self.next_id = 0
        self.replies = {}
        self.console = []
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self.cond:
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    elif msg.get("method") == "Runtime.consoleAPICalled":
                        args = msg["params"].get("args", [])
                        self.console.append(" ".join(str(a.get("value", a.get("description")))
                                                     for a in args))
                    elif msg.get("method") == "Runtime.exceptionThrown":
                        self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def call(self, method, params=None, session=None, timeout=10.0):
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.wfd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self.cond:
            while mid not in self.replies:
                left = deadline - time.monotonic()
                if self.closed:
                    raise CDPError(f"{method}: browser closed the DevTools pipe")
                if left <= 0:
                    raise CDPError(f"{method}: no reply within {timeout:.0f} s")
                self.cond.wait(left)
            reply = self.replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply["result"]


def spki_of(pem):
    """base64(sha256(SubjectPublicKeyInfo DER)) of a PEM certificate: the same as
    openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary
    | base64, with the last two steps done by hashlib and base64."""
    try:
        pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout", "-in", pem],
                             capture_output=True, check=True, timeout=10).stdout
        der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub,
                             capture_output=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        sys.exit(f"cannot compute the SPKI hash of {pem}: {e} {getattr(e, 'stderr', b'')!r}")
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def serve_page():
    """http://localhost:<free port>/browser_call.html from a daemon thread."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=HERE)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://localhost:{server.server_address[1]}/{os.path.basename(PAGE)}"


def launch_chromium(binary, profile, spki, stderr, hosts):
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--disable-default-apps", "--no-pings",
        "--disable-domain-reliability", "--disable-client-side-phishing-detection",
        "--metrics-recording-only", "--mute-audio", "--enable-logging=stderr",
        f"--user-data-dir={profile}",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
        "--host-resolver-rules=MAP * ~NOTFOUND, " +
        ", ".join(f"EXCLUDE {h}" for h in dict.fromkeys(["localhost"] + hosts)),
        "--remote-debugging-pipe",
    ]
    if spki:
        flags.append(f"--ignore-certificate-errors-spki-list={spki}")
    cmd_r, cmd_w = os.pipe()    # we write commands, the browser reads them on fd 3
    resp_r, resp_w = os.pipe()  # the browser writes on fd 4, we read

    def child_fds():
        # Move both ends above 10 first so that dup2 onto 3 and 4 cannot clobber either.
        a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen([binary] + flags + ["about:blank"], stdin=subprocess.DEVNULL,
                            stdout=stderr, stderr=stderr, pass_fds=(3, 4),
                            preexec_fn=child_fds, start_new_session=True)
    os.close(cmd_r)
    os.close(resp_w)
    return proc, CDP(cmd_w, resp_r)


def open_page(cdp, url, timeout=10.0):
    target = cdp.call("Target.createTarget", {"url": url})["targetId"]
    session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    cdp.call("Runtime.enable", session=session)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cdp.call("Runtime.evaluate", {"expression": "typeof runCall", "returnByValue": True},
                     session=session)
        if r["result"].get("value") == "function":
            return session
        time.sleep(0.1)
    raise CDPError(f"page {url} did not load within {timeout:.0f} s")


def ice_host(host):
    return f"[{host}]" if ":" in host else host


def ice_url(transport, args):
    host = ice_host(args.host)
    if transport == "udp":
        return f"turn:{host}:{args.udp_port}?transport=udp"
    if transport == "tcp":
        return f"turn:{host}:{args.tcp_port}?transport=tcp"
    return f"turns:{args.tls_name}:{args.tls_port}?transport=tcp"


def run_call(cdp, session, transport, args, timeout_s):
    cfg = {"transport": transport, "url": ice_url(transport, args), "username": args.user,
           "credential": args.password, "timeoutMs": int(timeout_s * 1000),
           "messages": args.messages, "minAudioPackets": args.min_audio_packets}
    if args.rtc_config:
        # An RTCConfiguration as a server handed it (uturn's POST /ice-servers), unchanged.
        with open(args.rtc_config) as f:
            cfg["rtcConfig"] = json.load(f)
        cfg["url"] = args.rtc_config
    r = cdp.call("Runtime.evaluate", {"expression": f"runCall({json.dumps(cfg)})",
                                      "awaitPromise": True, "returnByValue": True},
                 session=session, timeout=timeout_s + 5)
    if "exceptionDetails" in r:
        raise CDPError(f"runCall threw: {json.dumps(r['exceptionDetails'])[:500]}")
    return r["result"]["value"]


def check(res, transport, args):
    """The failed checks, as sentences; empty when the call passed."""
    fails = [f"page error: {e}" for e in res.get("errors", [])]
    fails += [f"ICE candidate error on pc {e.get('pc')}: {e.get('errorCode')} {e.get('errorText')}"
              f" ({e.get('url')})" for e in res.get("iceErrors") or [] if fails]
    if res.get("datachannel") is None:  # never connected: the checks below were not reached
        for side, cands in (res.get("gathered") or {}).items():
            if not cands:
                fails.append(f"pc {side}: no relay candidate gathered (no successful Allocate "
                             f"over {transport} from {res.get('url')})")
        return fails + ["not reached: data channel, audio and selected pair checks"]
    dc = res.get("datachannel") or {}
    n = args.messages
    if dc.get("receivedByA") != n or dc.get("receivedByB") != n:
        fails.append(f"data channel: expected {n} messages each way, got {dc or 'none'}")
    elif not (dc.get("intactA") and dc.get("intactB")):
        fails.append(f"data channel: messages corrupted or out of order: {dc}")
    audio = res.get("audio") or {}
    if (audio.get("packetsReceived") or 0) < args.min_audio_packets:
        fails.append(f"audio: packetsReceived {audio.get('packetsReceived')} < "
                     f"{args.min_audio_packets}")
    if (audio.get("codec") or "").lower() != "audio/opus":
        fails.append(f"audio: codec {audio.get('codec')!r}, expected audio/opus")
    sel = res.get("selected") or {}
    for side in ("a", "b"):
        pair = sel.get(side)
        if not pair or not pair.get("local") or not pair.get("remote"):
            fails.append(f"pc {side}: no selected candidate pair")
            continue
        for end in ("local", "remote"):
            c = pair[end]
            if c.get("type") != "relay":
                fails.append(f"pc {side}: {end} candidate is {c.get('type')}, expected relay")
            if c.get("address") != args.relay_ip or not c.get("port"):
                fails.append(f"pc {side}: {end} candidate at {c.get('address')}:{c.get('port')},"
                             f" expected a relayed address on {args.relay_ip}")
        if pair["local"].get("relayProtocol") != transport:
            fails.append(f"pc {side}: local relayProtocol {pair['local'].get('relayProtocol')!r},"
                         f" expected {transport!r}")
    if sel.get("a") and sel.get("b") and not fails:
        ep = lambda c: (c.get("address"), c.get("port"))
        if ep(sel["a"]["local"]) != ep(sel["b"]["remote"]) or \
           ep(sel["b"]["local"]) != ep(sel["a"]["remote"]):
            fails.append("selected pairs of a and b do not mirror each other")
    return fails


def summary(res, fails):
    sel = res.get("selected") or {}
    ep = lambda c: c and f"{c.get('address')}:{c.get('port')}"
    pairs = {s: p and {"local": ep(p.get("local")), "remote": ep(p.get("remote")),
                       "localType": (p.get("local") or {}).get("type"),
                       "remoteType": (p.get("remote") or {}).get("type"),
                       "relayProtocol": (p.get("local") or {}).get("relayProtocol")}
             for s, p in sel.items()}
    return {"transport": res.get("transport"), "url": res.get("url"), "ok": not fails,
            "selected": pairs, "datachannel": res.get("datachannel"),
            "audio": res.get("audio"), "connectMs": res.get("connectMs"),
            "elapsedMs": res.get("elapsedMs"), "step": res.get("step"),
            "states": res.get("states"), "gathered": res.get("gathered"),
            "iceErrors": res.get("iceErrors"), "failures": fails}


def stop_browser(proc, cdp):
    if proc.poll() is None and cdp is not None:
        try:
            cdp.call("Browser.close", timeout=3)
        except CDPError:
            pass
    for sig, wait in ((None, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if sig is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="TURN server address for udp/tcp")
    ap.add_argument("--user", default="demo")
    ap.add_argument("--password", default="demo")
    ap.add_argument("--udp-port", type=int)
    ap.add_argument("--tcp-port", type=int)
    ap.add_argument("--tls-port", type=int)
    ap.add_argument("--tls-name", default="localhost", help="host name in the turns: URL")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cert", help="the relay's PEM certificate (its SPKI hash is trusted)")
    g.add_argument("--spki", help="base64 sha256 of the certificate's SubjectPublicKeyInfo")
    ap.add_argument("--relay-ip", default="127.0.0.1", help="expected relayed address")
    ap.add_argument("--timeout", type=float, default=50, help="seconds for the whole run")
    ap.add_argument("--messages", type=int, default=20, help="data channel messages each way")
    ap.add_argument("--min-audio-packets", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1,
                    help="calls per transport (each prints its connect time; the median closes)")
    ap.add_argument("--rtc-config", help="a JSON RTCConfiguration file (e.g. uturn's POST "
                    "/ice-servers answer) given to RTCPeerConnection as is, plus "
                    "iceTransportPolicy relay; runs one call, checked as TURN over UDP")
    ap.add_argument("--chromium", help="browser binary (default: /usr/lib/chromium/chromium, "
                                       "else /usr/bin/chromium)")
    args = ap.parse_args()

    transports = [t for t in ("udp", "tcp", "tls") if getattr(args, f"{t}_port")]
    if args.rtc_config:
        transports = ["udp"]
    if not transports:
        ap.error("give at least one of --udp-port, --tcp-port, --tls-port")
    binary = args.chromium or next((b for b in ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
                                    if os.access(b, os.X_OK)), None)
    if not binary:
        sys.exit("no Chromium found (apt-get install chromium)")
    spki = args.spki or (spki_of(args.cert) if args.cert else None)
    if "tls" in transports and not spki:
        print("warning: --tls-port without --cert/--spki: the certificate must be trusted "
              "otherwise", file=sys.stderr)

    # End the browser (finally below) also when this script is sent SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("browser call: terminated"))
    start = time.monotonic()
    deadline = start + args.timeout
    tmp = tempfile.mkdtemp(prefix="browser_call.")
    server, url = serve_page()
    stderr_path = os.path.join(tmp, "chromium.stderr")
    proc = cdp = None
    failed = []
    try:
        with open(stderr_path, "wb") as stderr:
            proc, cdp = launch_chromium(binary, os.path.join(tmp, "profile"), spki, stderr,
                                         [ice_host(args.host), args.tls_name])
        session = open_page(cdp, url, timeout=min(15.0, deadline - time.monotonic()))
        connect_ms = {t: [] for t in transports}
        for t in [t for t in transports for _ in range(max(1, args.repeat))]:
            left = deadline - time.monotonic() - 6  # keep time to close the browser
            if left < 3:
                failed.append(t)
                print(f"browser call over {t}: FAILED: no time left (--timeout {args.timeout})")
                continue
            try:
                res = run_call(cdp, session, t, args, min(PER_TRANSPORT_S, left))
            except CDPError as e:
                res = {"transport": t, "url": ice_url(t, args), "errors": [str(e)]}
            fails = check(res, t, args)
            print(json.dumps(summary(res, fails)), flush=True)
            if fails:
                failed.append(t)
                print(f"browser call over {t}: FAILED:\n  " + "\n  ".join(fails), flush=True)
            else:
                print(f"browser call over {t}: ok", flush=True)
                if res.get("connectMs") is not None:
                    connect_ms[t].append(res["connectMs"])
                    print(f"connect time over {t}: {res['connectMs']} ms", flush=True)
        for t, ms in connect_ms.items():
            if ms:
                print(f"median connect time over {t}: {statistics.median(ms)} ms over {len(ms)} calls "
                      f"({', '.join(map(str, ms))})", flush=True)
    except (CDPError, OSError) as e:
        failed.append("setup")
        print(f"browser call: FAILED: {e}", flush=True)
    finally:
        if proc is not None:
            stop_browser(proc, cdp)
        server.shutdown()
        server.server_close()
        if failed:
            if cdp is not None and cdp.console:
                print("--- page console ---\n" + "\n".join(cdp.console[-20:]))
            try:
                with open(stderr_path, "rb") as f:
                    lines = f.read().decode(errors="replace").splitlines()
                    tail = [ln for ln in lines if "dbus" not in ln.lower()][-30:]  # D-Bus noise
                print("--- chromium stderr (tail, D-Bus lines left out) ---\n" + "\n".join(tail))
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - start
    if failed:
        print(f"browser call: FAILED ({', '.join(failed)}) in {took:.1f} s")
        return 1
    print(f"browser call: all of {', '.join(transports)} ok in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
