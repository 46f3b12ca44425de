/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only */
/*
 * uturn's XDP fast path: ChannelData (RFC 8656 §12.5) relayed before the kernel's network stack.
 *
 *   client -> peer: UDP to a listen address whose payload is ChannelData on a channel with a
 *                   route in `client_routes`: the 4-byte header is stripped and the datagram
 *                   rewritten to relayed address -> peer.
 *   peer -> client: UDP from a peer to a relayed address with a route in `peer_routes`: a 4-byte
 *                   ChannelData header is added and the datagram rewritten to listen address ->
 *                   client (no padding: RFC 8656 §12.5 does not require it over UDP).
 *
 * Both rewrite the Ethernet, IPv4 and UDP headers (IPv4 checksum recomputed, UDP checksum
 * updated incrementally), find the next hop with bpf_fib_lookup and leave with XDP_TX or a
 * redirect through `tx_ports`. IPv6 (RFC 6156) the same way with `client_routes6` and
 * `peer_routes6`. Everything else — STUN, Send/Data indications, unknown channels, expired
 * routes, fragments, IPv4 options, IPv6 extension headers, anything malformed, a next hop
 * the kernel has not resolved — returns XDP_PASS unchanged to the socket path, which stays the authority: the
 * worker that owns an allocation decides what is in the maps and until when.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "channel_relay.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define HEADERS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))
#define HEADERS6 (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr))
#define CHANNEL_HEADER 4

/* The loader sets max_entries from the relay's configuration before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct client_key);
	__type(value, struct client_route);
	__uint(max_entries, 65536);
} client_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct peer_key);
	__type(value, struct peer_route);
	__uint(max_entries, 65536);
} peer_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct client_key6);
	__type(value, struct client_route6);
	__uint(max_entries, 65536);
} client_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct peer_key6);
	__type(value, struct peer_route6);
	__uint(max_entries, 65536);
} peer_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct traffic);
	__uint(max_entries, 65536);
} route_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct traffic);
	__uint(max_entries, 256);
} worker_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, V_COUNT);
} verdicts SEC(".maps");

/* Interfaces uturn attached to (ifindex -> that ifindex, no program), the only redirect targets. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, struct bpf_devmap_val);
	__uint(max_entries, 64);
} tx_ports SEC(".maps");

/* The words of the UDP checksum that a rewrite changes: the pseudo-header addresses, the ports,
 * the UDP length (once in the pseudo-header, once in the header) and the ChannelData header. */
struct csum_words {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be16 len_pseudo;
	__be16 len_header;
	__be16 channel;
	__be16 channel_len;
};

/* The IPv6 words a rewrite changes (the pseudo-header's 32-bit length sums as 0 + length). */
struct csum_words6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__be16 len_pseudo;
	__be16 len_header;
	__be16 channel;
	__be16 channel_len;
};

static __always_inline int count(__u32 v, int action)
{
	__u64 *n = bpf_map_lookup_elem(&verdicts, &v);
	if (n)
		*n += 1;
	return action;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline void ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u64 sum = 0;

	ip->check = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	ip->check = csum_fold(sum);
}

/* The UDP checksum after replacing `from_size` bytes of `old` by `to_size` bytes of `new` (both
 * multiples of 4, at 16-bit-aligned offsets of the checksummed data). 0 stays 0: IPv4 UDP
 * without a checksum. */
static __always_inline __be16 udp_checksum(__be16 check, struct csum_words *old, __u32 from_size,
					   struct csum_words *new, __u32 to_size)
{
	if (!check)
		return 0;
	__s64 diff = bpf_csum_diff((__be32 *)old, from_size, (__be32 *)new, to_size, (__u16)~check);
	__u16 sum = csum_fold((__u32)diff);
	return sum ? sum : 0xffff;
}

static __always_inline void add_traffic(void *map, __u32 key, int to_peer, __u64 bytes)
{
	struct traffic *t = bpf_map_lookup_elem(map, &key);
	if (!t)
		return;
	if (to_peer) {
		t->packets_to_peer += 1;
		t->bytes_to_peer += bytes;
	} else {
		t->packets_to_client += 1;
		t->bytes_to_client += bytes;
	}
}

/* Asks the kernel for the next hop of the filled-in `fib`. Returns the action to leave with once
 * the packet is rewritten (XDP_TX or XDP_REDIRECT), or -1 to pass it up unchanged. */
static __always_inline int lookup_next_hop(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	fib->ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return count(V_PASS_FIB, -1);
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	__u32 ifindex = fib->ifindex;
	if (!bpf_map_lookup_elem(&tx_ports, &ifindex))
		return count(V_PASS_NO_TX_PORT, -1);
	return XDP_REDIRECT;
}

/* Fills `fib` for IPv4 src -> dst and looks up the next hop (see lookup_next_hop). */
static __always_inline int next_hop(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __be32 src, __be32 dst,
				    __be16 sport, __be16 dport, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = tot_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	return lookup_next_hop(ctx, fib);
}

/* The new Ethernet header, `l3_len` bytes of IP header from `l3` and the UDP header, written at
 * the (moved) start of the frame; whatever follows the datagram (Ethernet padding, ChannelData
 * padding) is cut so the frame is `frame_len` bytes. */
static __always_inline int write_headers(struct xdp_md *ctx, const struct bpf_fib_lookup *fib, __be16 proto,
					 const void *l3, __u32 l3_len, const struct udphdr *udp, __u32 frame_len)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	struct ethhdr *eth = data;
	/* `l3_len` is a constant at every call: each branch is the whole function there. */
	if (l3_len == sizeof(struct iphdr)) {
		if (data + HEADERS > end)
			return -1;
		__builtin_memcpy(data + sizeof(*eth), l3, sizeof(struct iphdr));
		__builtin_memcpy(data + sizeof(*eth) + sizeof(struct iphdr), udp, sizeof(*udp));
	} else {
		if (data + HEADERS6 > end)
			return -1;
		__builtin_memcpy(data + sizeof(*eth), l3, sizeof(struct ipv6hdr));
		__builtin_memcpy(data + sizeof(*eth) + sizeof(struct ipv6hdr), udp, sizeof(*udp));
	}
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = proto;
	__u32 have = end - data;
	if (have > frame_len && bpf_xdp_adjust_tail(ctx, (int)frame_len - (int)have))
		return -1;
	return 0;
}

static __always_inline int leave(struct xdp_md *ctx, int action, __u32 ifindex, __u32 tx, __u32 redirect)
{
	if (action == XDP_TX)
		return count(tx, XDP_TX);
	count(redirect, 0);
	return bpf_redirect_map(&tx_ports, ifindex, 0);
}

/* The application-data length of the ChannelData at `cd` (its 4-byte header in the frame) with
 * `room` bytes after the header, or MAX_DATA + 1 (counted) when it is too large, longer than the
 * datagram, or followed by anything but zero padding to a multiple of 4. Over UDP the padding is
 * optional (RFC 8656 §12.5); zero padding needs no checksum correction when it is dropped. */
static __always_inline __u32 channel_data_length(__u8 *cd, __u32 room, void *end)
{
	__u32 len = ((__u32)cd[2] << 8) | cd[3];
	if (len > MAX_DATA)
		return count(V_PASS_TOO_LARGE, MAX_DATA + 1);
	if (len > room)
		return count(V_PASS_CHANNEL_LENGTH, MAX_DATA + 1);
	__u32 pad = room - len;
	if (pad) {
		if (pad > 3 || ((len + 3) & ~3U) != room)
			return count(V_PASS_CHANNEL_LENGTH, MAX_DATA + 1);
		/* Each padding byte is checked against the frame's end on its own: the datagram
		 * may end right after the last one. */
		__u8 *p = cd + CHANNEL_HEADER + len;
		if ((void *)(p + 1) > end || p[0])
			return count(V_PASS_CHANNEL_LENGTH, MAX_DATA + 1);
		if (pad > 1 && ((void *)(p + 2) > end || p[1]))
			return count(V_PASS_CHANNEL_LENGTH, MAX_DATA + 1);
		if (pad > 2 && ((void *)(p + 3) > end || p[2]))
			return count(V_PASS_CHANNEL_LENGTH, MAX_DATA + 1);
	}
	return len;
}

/* ChannelData from a client on a routed channel: strip the header, send the data to the peer. */
static __always_inline int to_peer(struct xdp_md *ctx, const struct client_route *r, __u32 room)
{
	if (bpf_ktime_get_ns() >= r->expires_ns)
		return count(V_PASS_EXPIRED, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + HEADERS + CHANNEL_HEADER > end)
		return XDP_PASS;
	struct iphdr ip = *(struct iphdr *)(data + sizeof(struct ethhdr));
	struct udphdr udp = *(struct udphdr *)(data + sizeof(struct ethhdr) + sizeof(struct iphdr));
	__u8 *cd = data + HEADERS;
	__u32 len = channel_data_length(cd, room, end);
	if (len > MAX_DATA)
		return XDP_PASS;

	struct bpf_fib_lookup fib;
	__u16 ip_len = sizeof(struct iphdr) + sizeof(struct udphdr) + len;
	int action = next_hop(ctx, &fib, r->relayed_ip, r->peer_ip, r->relayed_port, r->peer_port, ip_len);
	if (action < 0)
		return XDP_PASS;

	__be16 udp_len = bpf_htons(sizeof(struct udphdr) + len);
	struct csum_words old = {
		.saddr = ip.saddr, .daddr = ip.daddr, .sport = udp.source, .dport = udp.dest,
		.len_pseudo = udp.len, .len_header = udp.len,
	};
	__builtin_memcpy(&old.channel, cd, CHANNEL_HEADER);
	struct csum_words new = {
		.saddr = r->relayed_ip, .daddr = r->peer_ip, .sport = r->relayed_port, .dport = r->peer_port,
		.len_pseudo = udp_len, .len_header = udp_len,
	};
	udp.check = udp_checksum(udp.check, &old, sizeof(old), &new, sizeof(new) - CHANNEL_HEADER);
	udp.source = r->relayed_port;
	udp.dest = r->peer_port;
	udp.len = udp_len;
	ip.saddr = r->relayed_ip;
	ip.daddr = r->peer_ip;
	ip.tot_len = bpf_htons(ip_len);
	ip.id = 0;
	ip.frag_off = bpf_htons(0x4000); /* DF, as the kernel sends UDP with path MTU discovery */
	ip.ttl = 64;
	ip_checksum(&ip);

	__u32 slot = r->slot, worker = r->worker;
	if (bpf_xdp_adjust_head(ctx, CHANNEL_HEADER))
		return count(V_PASS_ADJUST, XDP_PASS);
	if (write_headers(ctx, &fib, bpf_htons(ETH_P_IP), &ip, sizeof(ip), &udp, HEADERS + len))
		return count(V_PASS_ADJUST, XDP_DROP); /* the frame is already changed */
	add_traffic(&route_traffic, slot, 1, len);
	add_traffic(&worker_traffic, worker, 1, len);
	return leave(ctx, action, fib.ifindex, V_TO_PEER_TX, V_TO_PEER_REDIRECT);
}

/* A datagram from a peer with a channel: add the ChannelData header, send it to the client. */
static __always_inline int to_client(struct xdp_md *ctx, const struct peer_route *r, __u32 len)
{
	if (bpf_ktime_get_ns() >= r->expires_ns)
		return count(V_PASS_EXPIRED, XDP_PASS);
	if (len > MAX_DATA)
		return count(V_PASS_TOO_LARGE, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + HEADERS > end)
		return XDP_PASS;
	struct iphdr ip = *(struct iphdr *)(data + sizeof(struct ethhdr));
	struct udphdr udp = *(struct udphdr *)(data + sizeof(struct ethhdr) + sizeof(struct iphdr));

	struct bpf_fib_lookup fib;
	__u16 ip_len = sizeof(struct iphdr) + sizeof(struct udphdr) + CHANNEL_HEADER + len;
	int action = next_hop(ctx, &fib, r->server_ip, r->client_ip, r->server_port, r->client_port, ip_len);
	if (action < 0)
		return XDP_PASS;

	__be16 udp_len = bpf_htons(sizeof(struct udphdr) + CHANNEL_HEADER + len);
	__be16 channel = bpf_htons(r->channel);
	__be16 channel_len = bpf_htons(len);
	struct csum_words old = {
		.saddr = ip.saddr, .daddr = ip.daddr, .sport = udp.source, .dport = udp.dest,
		.len_pseudo = udp.len, .len_header = udp.len,
	};
	struct csum_words new = {
		.saddr = r->server_ip, .daddr = r->client_ip, .sport = r->server_port, .dport = r->client_port,
		.len_pseudo = udp_len, .len_header = udp_len, .channel = channel, .channel_len = channel_len,
	};
	udp.check = udp_checksum(udp.check, &old, sizeof(old) - CHANNEL_HEADER, &new, sizeof(new));
	udp.source = r->server_port;
	udp.dest = r->client_port;
	udp.len = udp_len;
	ip.saddr = r->server_ip;
	ip.daddr = r->client_ip;
	ip.tot_len = bpf_htons(ip_len);
	ip.id = 0;
	ip.frag_off = bpf_htons(0x4000);
	ip.ttl = 64;
	ip_checksum(&ip);

	__u32 slot = r->slot, worker = r->worker;
	if (bpf_xdp_adjust_head(ctx, -CHANNEL_HEADER))
		return count(V_PASS_ADJUST, XDP_PASS);
	if (write_headers(ctx, &fib, bpf_htons(ETH_P_IP), &ip, sizeof(ip), &udp, HEADERS + CHANNEL_HEADER + len))
		return count(V_PASS_ADJUST, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	__be16 *hdr = data + HEADERS;
	if ((void *)(hdr + 2) > end)
		return count(V_PASS_ADJUST, XDP_DROP);
	hdr[0] = channel;
	hdr[1] = channel_len;
	add_traffic(&route_traffic, slot, 0, len);
	add_traffic(&worker_traffic, worker, 0, len);
	return leave(ctx, action, fib.ifindex, V_TO_CLIENT_TX, V_TO_CLIENT_REDIRECT);
}

static __always_inline int next_hop6(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const __u8 *src, const __u8 *dst,
				     __be16 sport, __be16 dport, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = tot_len;
	__builtin_memcpy(fib->ipv6_src, src, 16);
	__builtin_memcpy(fib->ipv6_dst, dst, 16);
	return lookup_next_hop(ctx, fib);
}

/* A fresh IPv6 header: version 6, no traffic class or flow label, hop limit 64. */
static __always_inline void ip6_header(struct ipv6hdr *ip6, const __u8 *src, const __u8 *dst, __u16 payload_len)
{
	__builtin_memset(ip6, 0, sizeof(*ip6));
	ip6->version = 6;
	ip6->payload_len = bpf_htons(payload_len);
	ip6->nexthdr = IPPROTO_UDP;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, src, 16);
	__builtin_memcpy(&ip6->daddr, dst, 16);
}

/* IPv6 ChannelData from a client on a routed channel (as to_peer). */
static __always_inline int to_peer6(struct xdp_md *ctx, const struct client_route6 *r, __u32 room)
{
	if (bpf_ktime_get_ns() >= r->expires_ns)
		return count(V_PASS_EXPIRED, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + HEADERS6 + CHANNEL_HEADER > end)
		return XDP_PASS;
	struct ipv6hdr ip6 = *(struct ipv6hdr *)(data + sizeof(struct ethhdr));
	struct udphdr udp = *(struct udphdr *)(data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	__u8 *cd = data + HEADERS6;
	__u32 len = channel_data_length(cd, room, end);
	if (len > MAX_DATA)
		return XDP_PASS;
	struct bpf_fib_lookup fib;
	__u16 udp_len = sizeof(struct udphdr) + len;
	int action = next_hop6(ctx, &fib, r->relayed_ip, r->peer_ip, r->relayed_port, r->peer_port,
			       sizeof(struct ipv6hdr) + udp_len);
	if (action < 0)
		return XDP_PASS;
	struct csum_words6 old = { .sport = udp.source, .dport = udp.dest, .len_pseudo = udp.len, .len_header = udp.len };
	__builtin_memcpy(old.saddr, &ip6.saddr, 16);
	__builtin_memcpy(old.daddr, &ip6.daddr, 16);
	__builtin_memcpy(&old.channel, cd, CHANNEL_HEADER);
	struct csum_words6 new = {
		.sport = r->relayed_port, .dport = r->peer_port,
		.len_pseudo = bpf_htons(udp_len), .len_header = bpf_htons(udp_len),
	};
	__builtin_memcpy(new.saddr, r->relayed_ip, 16);
	__builtin_memcpy(new.daddr, r->peer_ip, 16);
	__s64 diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&new, sizeof(new) - CHANNEL_HEADER,
				   (__u16)~udp.check);
	__u16 sum = csum_fold((__u32)diff);
	udp.check = sum ? sum : 0xffff;
	udp.source = r->relayed_port;
	udp.dest = r->peer_port;
	udp.len = bpf_htons(udp_len);
	ip6_header(&ip6, r->relayed_ip, r->peer_ip, udp_len);

	__u32 slot = r->slot, worker = r->worker;
	if (bpf_xdp_adjust_head(ctx, CHANNEL_HEADER))
		return count(V_PASS_ADJUST, XDP_PASS);
	if (write_headers(ctx, &fib, bpf_htons(ETH_P_IPV6), &ip6, sizeof(ip6), &udp, HEADERS6 + len))
		return count(V_PASS_ADJUST, XDP_DROP);
	add_traffic(&route_traffic, slot, 1, len);
	add_traffic(&worker_traffic, worker, 1, len);
	return leave(ctx, action, fib.ifindex, V_TO_PEER_TX, V_TO_PEER_REDIRECT);
}

/* An IPv6 datagram from a peer with a channel (as to_client). */
static __always_inline int to_client6(struct xdp_md *ctx, const struct peer_route6 *r, __u32 len)
{
	if (bpf_ktime_get_ns() >= r->expires_ns)
		return count(V_PASS_EXPIRED, XDP_PASS);
	if (len > MAX_DATA)
		return count(V_PASS_TOO_LARGE, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + HEADERS6 > end)
		return XDP_PASS;
	struct ipv6hdr ip6 = *(struct ipv6hdr *)(data + sizeof(struct ethhdr));
	struct udphdr udp = *(struct udphdr *)(data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	struct bpf_fib_lookup fib;
	__u16 udp_len = sizeof(struct udphdr) + CHANNEL_HEADER + len;
	int action = next_hop6(ctx, &fib, r->server_ip, r->client_ip, r->server_port, r->client_port,
			       sizeof(struct ipv6hdr) + udp_len);
	if (action < 0)
		return XDP_PASS;
	__be16 channel = bpf_htons(r->channel);
	__be16 channel_len = bpf_htons(len);
	struct csum_words6 old = { .sport = udp.source, .dport = udp.dest, .len_pseudo = udp.len, .len_header = udp.len };
	__builtin_memcpy(old.saddr, &ip6.saddr, 16);
	__builtin_memcpy(old.daddr, &ip6.daddr, 16);
	struct csum_words6 new = {
		.sport = r->server_port, .dport = r->client_port,
		.len_pseudo = bpf_htons(udp_len), .len_header = bpf_htons(udp_len),
		.channel = channel, .channel_len = channel_len,
	};
	__builtin_memcpy(new.saddr, r->server_ip, 16);
	__builtin_memcpy(new.daddr, r->client_ip, 16);
	__s64 diff = bpf_csum_diff((__be32 *)&old, sizeof(old) - CHANNEL_HEADER, (__be32 *)&new, sizeof(new),
				   (__u16)~udp.check);
	__u16 sum = csum_fold((__u32)diff);
	udp.check = sum ? sum : 0xffff;
	udp.source = r->server_port;
	udp.dest = r->client_port;
	udp.len = bpf_htons(udp_len);
	ip6_header(&ip6, r->server_ip, r->client_ip, udp_len);

	__u32 slot = r->slot, worker = r->worker;
	if (bpf_xdp_adjust_head(ctx, -CHANNEL_HEADER))
		return count(V_PASS_ADJUST, XDP_PASS);
	if (write_headers(ctx, &fib, bpf_htons(ETH_P_IPV6), &ip6, sizeof(ip6), &udp, HEADERS6 + CHANNEL_HEADER + len))
		return count(V_PASS_ADJUST, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	__be16 *hdr = data + HEADERS6;
	if ((void *)(hdr + 2) > end)
		return count(V_PASS_ADJUST, XDP_DROP);
	hdr[0] = channel;
	hdr[1] = channel_len;
	add_traffic(&route_traffic, slot, 0, len);
	add_traffic(&worker_traffic, worker, 0, len);
	return leave(ctx, action, fib.ifindex, V_TO_CLIENT_TX, V_TO_CLIENT_REDIRECT);
}

/* IPv6 without extension headers, UDP with a checksum (RFC 8200 requires one). */
static __always_inline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return count(V_PASS_NOT_UDP, XDP_PASS);
	if (ip6->nexthdr != IPPROTO_UDP)
		return count(ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == 58 ? V_PASS_NOT_UDP : V_PASS_IP_OPTIONS,
			     XDP_PASS);
	struct udphdr *udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > end)
		return count(V_PASS_BAD_LENGTH, XDP_PASS);
	__u32 plen = bpf_ntohs(ip6->payload_len);
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp) || plen != udp_len || (void *)udp + udp_len > end || !udp->check)
		return count(V_PASS_BAD_LENGTH, XDP_PASS);
	__u32 payload_len = udp_len - sizeof(*udp);
	__u8 *payload = (void *)(udp + 1);
	if (payload_len >= CHANNEL_HEADER && (void *)(payload + CHANNEL_HEADER) <= end && (payload[0] & 0xc0) == 0x40) {
		struct client_key6 ck = {
			.client_port = udp->source, .server_port = udp->dest,
			.channel = ((__u16)payload[0] << 8) | payload[1],
		};
		__builtin_memcpy(ck.client_ip, &ip6->saddr, 16);
		__builtin_memcpy(ck.server_ip, &ip6->daddr, 16);
		struct client_route6 *cr = bpf_map_lookup_elem(&client_routes6, &ck);
		if (cr)
			return to_peer6(ctx, cr, payload_len - CHANNEL_HEADER);
	}
	struct peer_key6 pk = { .peer_port = udp->source, .relayed_port = udp->dest };
	__builtin_memcpy(pk.peer_ip, &ip6->saddr, 16);
	__builtin_memcpy(pk.relayed_ip, &ip6->daddr, 16);
	struct peer_route6 *pr = bpf_map_lookup_elem(&peer_routes6, &pk);
	if (pr)
		return to_client6(ctx, pr, payload_len);
	return count(V_PASS_NO_ROUTE, XDP_PASS);
}

SEC("xdp")
int uturn_channel_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return count(V_PASS_NOT_UDP, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(ctx);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count(V_PASS_NOT_UDP, XDP_PASS);
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->version != 4)
		return count(V_PASS_NOT_UDP, XDP_PASS);
	if (ip->ihl != 5)
		return count(V_PASS_IP_OPTIONS, XDP_PASS);
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or a fragment offset */
		return count(V_PASS_FRAGMENT, XDP_PASS);
	if (ip->protocol != IPPROTO_UDP)
		return count(V_PASS_NOT_UDP, XDP_PASS);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return count(V_PASS_BAD_LENGTH, XDP_PASS);
	__u32 ip_len = bpf_ntohs(ip->tot_len);
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp) || ip_len != sizeof(*ip) + udp_len || (void *)ip + ip_len > end)
		return count(V_PASS_BAD_LENGTH, XDP_PASS);
	__u32 payload_len = udp_len - sizeof(*udp);
	__u8 *payload = (void *)(udp + 1);

	if (payload_len >= CHANNEL_HEADER && (void *)(payload + CHANNEL_HEADER) <= end && (payload[0] & 0xc0) == 0x40) {
		struct client_key ck = {
			.client_ip = ip->saddr, .server_ip = ip->daddr,
			.client_port = udp->source, .server_port = udp->dest,
			.channel = ((__u16)payload[0] << 8) | payload[1],
		};
		struct client_route *cr = bpf_map_lookup_elem(&client_routes, &ck);
		if (cr)
			return to_peer(ctx, cr, payload_len - CHANNEL_HEADER);
	}
	struct peer_key pk = {
		.peer_ip = ip->saddr, .relayed_ip = ip->daddr,
		.peer_port = udp->source, .relayed_port = udp->dest,
	};
	struct peer_route *pr = bpf_map_lookup_elem(&peer_routes, &pk);
	if (pr)
		return to_client(ctx, pr, payload_len);
	return count(V_PASS_NO_ROUTE, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
