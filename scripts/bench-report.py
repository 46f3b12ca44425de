#!/usr/bin/env python3
"""Turns scripts/bench-compare.sh's JSON lines into docs/benchmarks.md (tables and ratios)."""
import datetime
import json
import os
import platform
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
command = sys.argv[2] if len(sys.argv) > 2 else "scripts/bench-compare.sh"
traffic = [r for r in rows if "offered_pps" in r]
by_scen = defaultdict(dict)
for r in traffic:
    by_scen[r["scenario"]].setdefault(r["offered_pps"], {})[r["contestant"]] = r


def cpu(r):
    return r.get("server_cpu_us_per_packet") or 0.0


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


out = []
p = out.append
p("# Benchmarks: uturn beside coturn and a bare UDP forwarder")
p("")
p(f"Measured {datetime.date.today()} on {os.cpu_count()} cores, Linux {platform.release()}, "
  "all three relays pinned to the same core(s) and driven by the same generator (`uturn-load`) "
  "pinned to another, on 127.0.0.1, in one run of:")
p("")
p(f"    {command}")
p("")
notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks-notes.md")
if os.path.exists(notes):
    p(open(notes).read().rstrip())
    p("")
p("`floor` is `udp-forwarder`: one thread, recvmmsg/sendmmsg, no TURN logic - the least a "
  "kernel-socket relay can cost. Server CPU is user+system time of all the relay's threads "
  "from /proc over the measured window, divided by the packets it relayed (an echo run relays "
  "each packet twice). On loopback the sender's CPU also pays for delivering into the "
  "receiver's socket, so every contestant's figure includes kernel work the generator causes. "
  "Generator CPU is shown because on a 2-core machine it can run out before the relay does. "
  "The machine is shared and noisy: compare ratios within one run.")
p("")


def floor_of(scen, rate):
    f = by_scen[scen].get(rate, {}).get("floor")
    return f or by_scen.get(scen.replace("send", "channel"), {}).get(rate, {}).get("floor")


p("## Summary: the targets at 100 kpps relayed")
p("")
p("One-way runs at 100,000 packets/s offered, echo runs at 50,000/s offered (100,000/s relayed). "
  "Targets: server CPU per packet at or below the floor and at most 0.75x coturn; p99 no worse "
  "than coturn's.")
p("")
p("| scenario | uturn µs/pkt | coturn µs/pkt | floor µs/pkt | uturn/coturn | uturn/floor | uturn p99 µs | coturn p99 µs |")
p("|---|---:|---:|---:|---:|---:|---:|---:|")
for scen in sorted(by_scen):
    rate = 50000 if "echo" in scen else 100000
    cs = by_scen[scen].get(rate, {})
    u, c, f = cs.get("uturn"), cs.get("coturn"), floor_of(scen, rate)
    if not (u and c):
        continue
    fc = f"{cpu(f):.2f}" if f else "-"
    p(f"| {scen} | {cpu(u):.2f} | {cpu(c):.2f} | {fc} | {ratio(cpu(u), cpu(c))} | "
      f"{ratio(cpu(u), cpu(f)) if f else '-'} | {u['latency']['p99_us']} | {c['latency']['p99_us']} |")
p("")
for scen in sorted(by_scen):
    p(f"## {scen}")
    p("")
    p("| offered pkt/s | relay | delivered pkt/s | loss % | p50 µs | p99 µs | server CPU µs/pkt | server switches/kpkt | generator CPU % | uturn/coturn CPU | uturn/floor CPU |")
    p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate in sorted(by_scen[scen]):
        cs = by_scen[scen][rate]
        u, c, f = cs.get("uturn"), cs.get("coturn"), floor_of(scen, rate)
        for name in ("uturn", "coturn", "coturn-fast", "floor"):
            r = cs.get(name)
            if not r:
                continue
            rc = ratio(cpu(u), cpu(c)) if name == "uturn" and u and c else ""
            rf = ratio(cpu(u), cpu(f)) if name == "uturn" and u and f else ""
            l = r["latency"]
            sw = r.get("server_switches_per_kpkt")
            sw = f"{sw:.0f}" if sw is not None else "-"
            p(f"| {rate} | {name} | {r['delivered_pps']:.0f} | {r['loss_pct']:.3f} | {l['p50_us']} | {l['p99_us']} | "
              f"{cpu(r):.2f} | {sw} | {r['generator_cpu_pct']:.0f} | {rc} | {rf} |")
    slug = "".join(ch if ch.isalnum() else "-" for ch in scen)
    p("")
    p(f"![CPU per packet](img/cpu-{slug}.png) ![p99 latency](img/p99-{slug}.png)")
    p("")

maxr = [r for r in rows if r.get("scenario") == "max-rate"]
if maxr:
    p("## Highest offered rate with loss under 0.1% (channel, smallest size, bisection)")
    p("")
    p("| relay | packets/s |")
    p("|---|---:|")
    for r in maxr:
        p(f"| {r['contestant']} | {r['max_rate_pps']} |")
    p("")
allocs = [r for r in rows if "allocs_per_s" in r]
if allocs:
    p("## Authenticated allocations (401 round, authenticated Allocate, Refresh 0 delete)")
    p("")
    p("| relay | allocations/s | Allocate p50 µs | p99 µs | server CPU µs/allocation | failures |")
    p("|---|---:|---:|---:|---:|---|")
    for r in allocs:
        p(f"| {r['contestant']} | {r['allocs_per_s']:.0f} | {r['latency']['p50_us']} | {r['latency']['p99_us']} | "
          f"{(r['server_cpu_us_per_alloc'] or 0):.1f} | {r['failures'] or 'none'} |")
    p("")
holds = [r for r in rows if "user_bytes_per_allocation" in r]
if holds:
    p("## Memory per idle allocation")
    p("")
    p("Resident memory of the relay before and after N idle allocations (user space), and the "
      "kernel's UDP socket memory (slab caches and /proc/net/sockstat) over the same step, "
      "halved because the generator's client sockets are counted there too.")
    p("")
    p("| relay | allocations | RSS before (KiB) | RSS after (KiB) | user bytes/allocation | kernel bytes/allocation |")
    p("|---|---:|---:|---:|---:|---:|")
    for r in holds:
        p(f"| {r['contestant']} | {r['allocations']} | {r['rss_before'] // 1024} | {r['rss_after'] // 1024} | "
          f"{r['user_bytes_per_allocation']:.0f} | {r['kernel_bytes_per_allocation']:.0f} |")
    p("")
xdp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks-xdp.md")
if os.path.exists(xdp):
    p("## Kernel bypass: XDP, across real interfaces")
    p("")
    p("From [benchmarks-xdp.md](benchmarks-xdp.md) (`scripts/bench-xdp.sh`, network namespaces, "
      "machine-wide CPU accounting), included here:")
    p("")
    body = open(xdp).read().split("\n", 1)[1]
    p(body.replace("\n## ", "\n### ").rstrip())
    p("")
auth = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks-auth.md")
if os.path.exists(auth):
    p(open(auth).read().rstrip())
    p("")
print("\n".join(out))
