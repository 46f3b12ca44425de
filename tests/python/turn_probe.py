#!/usr/bin/env python3
"""A minimal TURN client (RFC 8656 over UDP, long-term credentials) and an echo peer, written
from the RFCs for the XDP end-to-end test (tests/tests/xdp.rs), which runs each in its own
network namespace. Every step prints one JSON line; the test asserts on them and on uturn's
metrics.

  turn_probe.py peer --listen IP:PORT
      Echoes every datagram. A datagram "BURST <delay> <count>" makes it send <count>
      datagrams to the sender after <delay> seconds (to test the peer -> client direction when
      the client can no longer reach the peer).

  turn_probe.py client --server IP:PORT --user U --password P --peer IP:PORT --count N
                       --lapse SECONDS
      Binding; Allocate; ChannelBind; N ChannelData echoed; an unbound channel and garbage;
      waits SECONDS for the permission to lapse and sends N more (none may come back, nor the
      peer's burst); CreatePermission and N more (all must come back); Refresh LIFETIME 0 and N
      more (none may come back).
"""

import argparse
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import threading
import time

MAGIC = 0x2112A442
BINDING, ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND = 0x001, 0x003, 0x004, 0x008, 0x009
USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, REALM, NONCE = 0x0006, 0x0008, 0x0009, 0x0014, 0x0015
CHANNEL_NUMBER, LIFETIME, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS = 0x000C, 0x000D, 0x0012, 0x0016
REQUESTED_TRANSPORT, XOR_MAPPED_ADDRESS, REQUESTED_ADDRESS_FAMILY = 0x0019, 0x0020, 0x0017


def addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def emit(**kv):
    print(json.dumps(kv), flush=True)


def xor_address(host, port, tid):
    """RFC 8489 §14.2: the port XORed with the cookie's top half, the address with the cookie
    (IPv4) or the cookie and the transaction ID (IPv6)."""
    fam = family(host)
    raw = socket.inet_pton(fam, host)
    mask = struct.pack("!I", MAGIC) + tid
    x = bytes(a ^ b for a, b in zip(raw, mask))
    return struct.pack("!BBH", 0, 1 if fam == socket.AF_INET else 2, port ^ (MAGIC >> 16)) + x


def parse_xor_address(v, tid):
    port = struct.unpack("!H", v[2:4])[0] ^ (MAGIC >> 16)
    fam = socket.AF_INET if v[1] == 1 else socket.AF_INET6
    mask = struct.pack("!I", MAGIC) + tid
    raw = bytes(a ^ b for a, b in zip(v[4:], mask))
    return socket.inet_ntop(fam, raw), port


def attr(t, v):
    pad = (4 - len(v) % 4) % 4
    return struct.pack("!HH", t, len(v)) + v + b"\0" * pad


def message(method, attrs, tid, key=None):
    """A request with `attrs` (list of (type, value)), signed with `key` if given."""
    body = b"".join(attr(t, v) for t, v in attrs)
    if key is not None:
        # RFC 8489 §14.5: the length covers MESSAGE-INTEGRITY when the HMAC is computed.
        head = struct.pack("!HHI", method, len(body) + 24, MAGIC) + tid
        mac = hmac.new(key, head + body, hashlib.sha1).digest()
        body += attr(MESSAGE_INTEGRITY, mac)
    return struct.pack("!HHI", method, len(body), MAGIC) + tid + body, tid


def parse(data):
    if len(data) < 20:
        return None
    mtype, length, magic = struct.unpack("!HHI", data[:8])
    if magic != MAGIC:
        return None
    attrs, i = {}, 20
    while i + 4 <= 20 + length:
        t, n = struct.unpack("!HH", data[i:i + 4])
        attrs.setdefault(t, data[i + 4:i + 4 + n])
        i += 4 + n + (4 - n % 4) % 4
    return mtype, data[8:20], attrs


class Client:
    def __init__(self, server, user, password):
        self.server = server
        self.user = user.encode()
        self.password = password.encode()
        self.sock = socket.socket(family(server[0]), socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)
        self.key = None
        self.realm = self.nonce = None

    def transact(self, method, attrs, signed=True):
        """`attrs(tid)` gives the attributes (XOR addresses depend on the transaction ID).
        Returns (error code or 0, attributes, transaction ID)."""
        for _ in range(5):
            extra = []
            if signed and self.key is not None:
                extra = [(USERNAME, self.user), (REALM, self.realm), (NONCE, self.nonce)]
            tid = os.urandom(12)
            msg, tid = message(method, attrs(tid) + extra, tid, self.key if signed else None)
            self.sock.sendto(msg, self.server)
            deadline = time.time() + 1.0
            while time.time() < deadline:
                try:
                    data, _ = self.sock.recvfrom(2048)
                except socket.timeout:
                    break
                p = parse(data)
                if p is None or p[1] != tid:
                    continue
                mtype, _, a = p
                if mtype & 0x0110 == 0x0110 and ERROR_CODE in a:
                    code = a[ERROR_CODE][2] * 100 + a[ERROR_CODE][3]
                    if code in (401, 438) and signed:
                        self.realm, self.nonce = a[REALM], a[NONCE]
                        self.key = hashlib.md5(self.user + b":" + self.realm + b":" + self.password).digest()
                        break  # retry with credentials
                    return code, a, tid
                return 0, a, tid
        raise RuntimeError("no answer to method %#x" % method)

    def channel_data(self, channel, payload, pad=False):
        """Sends ChannelData; with `pad`, zero-padded to a multiple of 4 (optional over UDP,
        RFC 8656 §12.5)."""
        fill = b"\0" * (-len(payload) % 4) if pad else b""
        self.sock.sendto(struct.pack("!HH", channel, len(payload)) + payload + fill, self.server)

    def exchange(self, channel, count, tag):
        """Sends `count` ChannelData datagrams, returns how many distinct ones came back."""
        got = set()
        for i in range(count):
            # 94 + i % 3 bytes: every other datagram padded, with 1, 2 or 3 bytes.
            self.channel_data(channel, b"%s %06d " % (tag, i) + b"x" * (80 + i % 3), pad=i % 2 == 1)
            if i % 20 == 19:
                self.drain(channel, got, 0.02)
        self.drain(channel, got, 0.5)
        return len(got)

    def drain(self, channel, got, wait):
        self.sock.settimeout(wait)
        try:
            while True:
                data, _ = self.sock.recvfrom(2048)
                if len(data) >= 4 and struct.unpack("!H", data[:2])[0] == channel:
                    n = struct.unpack("!H", data[2:4])[0]
                    got.add(bytes(data[4:4 + n]))
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(1.0)


def run_client(args):
    c = Client(addr(args.server), args.user, args.password)
    peer = addr(args.peer)
    code, a, tid = c.transact(BINDING, lambda t: [], signed=False)
    emit(step="binding", code=code, mapped=list(parse_xor_address(a[XOR_MAPPED_ADDRESS], tid)) if code == 0 else None)
    want = struct.pack("!BBH", 1 if family(peer[0]) == socket.AF_INET else 2, 0, 0)
    code, a, tid = c.transact(ALLOCATE, lambda t: [(REQUESTED_TRANSPORT, struct.pack("!BBH", 17, 0, 0)),
                                                   (REQUESTED_ADDRESS_FAMILY, want)])
    emit(step="allocate", code=code, relayed=list(parse_xor_address(a[XOR_RELAYED_ADDRESS], tid)) if code == 0 else None)
    if code:
        return 1
    channel = 0x4001
    code, _, _ = c.transact(CHANNEL_BIND, lambda t: [(CHANNEL_NUMBER, struct.pack("!HH", channel, 0)),
                                                     (XOR_PEER_ADDRESS, xor_address(*peer, t))])
    emit(step="channel_bind", code=code)
    emit(step="bound", sent=args.count, received=c.exchange(channel, args.count, b"bound"))
    # Not for the fast path: an unbound channel and bytes that are neither STUN nor ChannelData.
    for i in range(5):
        c.channel_data(0x4002, b"unbound %d" % i)
        c.sock.sendto(b"\xff" * 12, c.server)
    # The peer sends a burst to the relayed address once the permission has lapsed.
    burst = args.lapse + 1.0
    c.channel_data(channel, b"BURST %.1f 20" % burst)
    time.sleep(0.2)
    c.drain(channel, set(), 0.1)
    time.sleep(args.lapse + 0.5)
    received = c.exchange(channel, args.count, b"lapsed")
    late = set()
    c.drain(channel, late, 1.5)  # covers the burst
    emit(step="lapsed", sent=args.count, received=received, burst_received=len(late))
    code, _, _ = c.transact(CREATE_PERMISSION, lambda t: [(XOR_PEER_ADDRESS, xor_address(*peer, t))])
    emit(step="create_permission", code=code)
    emit(step="renewed", sent=args.count, received=c.exchange(channel, args.count, b"renewed"))
    code, _, _ = c.transact(REFRESH, lambda t: [(LIFETIME, struct.pack("!I", 0))])
    emit(step="delete", code=code)
    emit(step="deleted", sent=args.count, received=c.exchange(channel, args.count, b"deleted"))
    return 0


def run_peer(args):
    listen = addr(args.listen)
    sock = socket.socket(family(listen[0]), socket.SOCK_DGRAM)
    sock.bind(listen)
    emit(step="peer", listening=args.listen)

    def burst(to, delay, count):
        time.sleep(delay)
        for i in range(count):
            sock.sendto(b"burst %d" % i, to)

    while True:
        data, src = sock.recvfrom(4096)
        if data.startswith(b"BURST "):
            _, delay, count = data.split()
            threading.Thread(target=burst, args=(src, float(delay), int(count)), daemon=True).start()
        else:
            sock.sendto(data, src)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--user", required=True)
    c.add_argument("--password", required=True)
    c.add_argument("--peer", required=True)
    c.add_argument("--count", type=int, default=200)
    c.add_argument("--lapse", type=float, default=3.0)
    q = sub.add_parser("peer")
    q.add_argument("--listen", required=True)
    args = p.parse_args()
    sys.exit(run_client(args) if args.role == "client" else run_peer(args))


if __name__ == "__main__":
    main()
