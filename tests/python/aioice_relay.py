#!/usr/bin/env python3
"""Allocate on a TURN server with aioice's TURN client and exchange data through the relay.

Usage: aioice_relay.py HOST PORT USER PASSWORD [ROUNDS [udp|tcp|tls [CAFILE]]]

With tcp the client reaches the TURN server over TCP; with tls over TLS, verifying the server's
certificate against CAFILE (the test's self-signed certificate) for the name "localhost".

A UDP echo peer runs on 127.0.0.1. The client allocates (401 -> authenticated Allocate),
sends ROUNDS datagrams to the peer through the relay (aioice creates the permission, then binds a
channel once data flows) and waits for each echo. Exits 0 only if every echo came back intact.
"""
import asyncio
import ssl
import sys

from aioice import turn


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Collect(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def connection_made(self, transport):
        pass

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))


async def main(host, port, user, password, rounds, transport="udp", cafile=None):
    loop = asyncio.get_running_loop()
    peer_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer_addr = peer_transport.get_extra_info("sockname")
    transport, protocol = await asyncio.wait_for(
        turn.create_turn_endpoint(
            Collect,
            server_addr=(host, port),
            username=user,
            password=password,
            lifetime=600,
            channel_refresh_time=500,
            transport="udp" if transport == "udp" else "tcp",
            ssl=tls_context(cafile) if transport == "tls" else None,
        ),
        timeout=10,
    )
    relayed = transport.get_extra_info("sockname")
    print(f"allocated relayed address {relayed}", flush=True)
    try:
        for i in range(rounds):
            payload = f"aioice round {i} ".encode() * 8
            transport.sendto(payload, peer_addr)
            data, addr = await asyncio.wait_for(protocol.queue.get(), timeout=5)
            assert data == payload, f"round {i}: got {data!r}"
            assert addr == peer_addr, f"round {i}: from {addr}, expected {peer_addr}"
        print(f"{rounds} echoes through the relay", flush=True)
    finally:
        transport.close()
        peer_transport.close()
        await asyncio.sleep(0.2)


def tls_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False  # the server is reached by IP; the certificate is still verified
    ctx.set_alpn_protocols(["stun.turn"])
    return ctx


if __name__ == "__main__":
    h, p, u, w = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    t = sys.argv[6] if len(sys.argv) > 6 else "udp"
    ca = sys.argv[7] if len(sys.argv) > 7 else None
    asyncio.run(main(h, p, u, w, n, t, ca))
