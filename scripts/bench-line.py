#!/usr/bin/env python3
"""Prints one line of a uturn-load JSON report read from stdin (used by bench-compare.sh)."""
import json
import sys

r = json.loads(sys.stdin.read())
lat = r["latency"]["p99_us"]
cpu = r.get("server_cpu_us_per_packet") or 0.0
sw = r.get("server_switches_per_kpkt") or 0.0
print(f"  {r['contestant']:7} {r['scenario']:24} offered {r['offered_pps']:>7} delivered {r['delivered_pps']:>9.0f} "
      f"loss {r['loss_pct']:.3f}% p99 {lat} us cpu {cpu:.2f} us/pkt sw/kpkt {sw:.0f} gen {r['generator_cpu_pct']:.0f}%")
