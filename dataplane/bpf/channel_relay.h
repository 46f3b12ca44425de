/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only */
/*
 * Map layouts shared by the XDP ChannelData relay (channel_relay.c) and its Rust loader
 * (dataplane/src/xdp/maps.rs mirrors every struct here, field for field; a test checks the
 * sizes). Addresses and ports are in network byte order, exactly as they sit in the packet;
 * channel numbers and lengths are in host order.
 */
#ifndef UTURN_CHANNEL_RELAY_H
#define UTURN_CHANNEL_RELAY_H

#include <linux/types.h>

/* Client -> peer: a ChannelData datagram from `client` to the listen address `server` on
 * `channel` (RFC 8656 §12.5). */
struct client_key {
	__be32 client_ip;
	__be32 server_ip;
	__be16 client_port;
	__be16 server_port;
	__u16 channel;
	__u16 zero; /* always 0: keys are compared bytewise */
};

/* Where such a datagram's payload goes: from the relayed transport address to the peer. */
struct client_route {
	__be32 relayed_ip;
	__be32 peer_ip;
	__be16 relayed_port;
	__be16 peer_port;
	__u32 slot;   /* index into route_traffic */
	__u32 worker; /* index into worker_traffic */
	__u32 zero;
	__u64 expires_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns); at or after it, XDP_PASS */
};

/* Peer -> client: a datagram from `peer` to the relayed transport address `relayed`. */
struct peer_key {
	__be32 peer_ip;
	__be32 relayed_ip;
	__be16 peer_port;
	__be16 relayed_port;
};

/* Where it goes: ChannelData on `channel` from the listen address to the client. */
struct peer_route {
	__be32 server_ip;
	__be32 client_ip;
	__be16 server_port;
	__be16 client_port;
	__u16 channel;
	__u16 zero;
	__u32 slot;
	__u32 worker;
	__u64 expires_ns;
};

/* The IPv6 counterparts: the same fields with 16-byte addresses (RFC 6156 allocations). */
struct client_key6 {
	__u8 client_ip[16];
	__u8 server_ip[16];
	__be16 client_port;
	__be16 server_port;
	__u16 channel;
	__u16 zero;
};

struct client_route6 {
	__u8 relayed_ip[16];
	__u8 peer_ip[16];
	__be16 relayed_port;
	__be16 peer_port;
	__u32 slot;
	__u32 worker;
	__u32 zero;
	__u64 expires_ns;
};

struct peer_key6 {
	__u8 peer_ip[16];
	__u8 relayed_ip[16];
	__be16 peer_port;
	__be16 relayed_port;
};

struct peer_route6 {
	__u8 server_ip[16];
	__u8 client_ip[16];
	__be16 server_port;
	__be16 client_port;
	__u16 channel;
	__u16 zero;
	__u32 slot;
	__u32 worker;
	__u64 expires_ns;
};

/* Application data relayed in XDP, per CPU: packets and payload bytes each way. */
struct traffic {
	__u64 packets_to_peer;
	__u64 bytes_to_peer;
	__u64 packets_to_client;
	__u64 bytes_to_client;
};

/* What the program did with a packet; index into `verdicts` (per-CPU packet counts). */
enum verdict {
	V_TO_PEER_TX = 0,         /* ChannelData relayed to a peer, out of the interface it came in on */
	V_TO_PEER_REDIRECT,       /* ... out of another interface */
	V_TO_CLIENT_TX,           /* peer data relayed to a client as ChannelData, same interface */
	V_TO_CLIENT_REDIRECT,     /* ... another interface */
	V_PASS_NOT_UDP,           /* not IPv4 or IPv6 UDP over Ethernet (TCP, ARP, VLAN, ...) */
	V_PASS_IP_OPTIONS,        /* IPv4 options or IPv6 extension headers: left to the kernel */
	V_PASS_FRAGMENT,          /* an IPv4 fragment */
	V_PASS_BAD_LENGTH,        /* IP or UDP length inconsistent with the frame; IPv6 UDP without checksum */
	V_PASS_NO_ROUTE,          /* no channel route for it (STUN, Send/Data, unbound channel, other traffic) */
	V_PASS_EXPIRED,           /* a route whose deadline passed: the socket path decides */
	V_PASS_CHANNEL_LENGTH,    /* ChannelData whose length field does not fit the datagram, or nonzero padding */
	V_PASS_TOO_LARGE,         /* payload above MAX_DATA */
	V_PASS_FIB,               /* bpf_fib_lookup failed: no neighbour yet, forwarding off, MTU */
	V_PASS_NO_TX_PORT,        /* the next hop's interface is not one uturn attached to */
	V_PASS_ADJUST,            /* bpf_xdp_adjust_head/tail refused */
	V_COUNT
};

/* The Rust mirrors (dataplane/src/xdp/maps.rs) assume these sizes: no hidden padding. */
_Static_assert(sizeof(struct client_key) == 16, "client_key");
_Static_assert(sizeof(struct client_route) == 32, "client_route");
_Static_assert(sizeof(struct peer_key) == 12, "peer_key");
_Static_assert(sizeof(struct peer_route) == 32, "peer_route");
_Static_assert(sizeof(struct traffic) == 32, "traffic");
_Static_assert(sizeof(struct client_key6) == 40, "client_key6");
_Static_assert(sizeof(struct client_route6) == 56, "client_route6");
_Static_assert(sizeof(struct peer_key6) == 36, "peer_key6");
_Static_assert(sizeof(struct peer_route6) == 56, "peer_route6");

/* Largest application-data length relayed in XDP, bytes; larger datagrams go up. */
#define MAX_DATA 4096

#endif
