#!/usr/bin/env python3
"""Markdown tables from bench_gated's JSON (--benchmark_out): tokens/s and GFLOP/s (with % of
the FMA peak given by --peak1/--peak2, GFLOP/s on 1 and 2 threads) per mixer, form, K, T and
thread count.  Usage: gated_table.py gated.json [--peak1 117.0 --peak2 232.6]"""
import argparse
import json
import re
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("json")
ap.add_argument("--peak1", type=float, default=117.0)
ap.add_argument("--peak2", type=float, default=232.6)
a = ap.parse_args()
peak = {1: a.peak1, 2: a.peak2}

rows = defaultdict(dict)  # (bench, K, threads) -> {T: (tokens/s, GFLOP/s)}
steps = []
for b in json.load(open(a.json))["benchmarks"]:
    if b.get("run_type") == "aggregate":
        continue
    name = b["name"]
    m = re.match(r"BM_(\w+?)_(chunked|recurrent)/T:(\d+)/[KN]:(\d+)/threads:(\d+)", name)
    if m:
        mixer, form, T, K, th = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5))
        rows[(mixer, form, K, th)][T] = (b["tokens"], b["flops"] / 1e9)
        continue
    m = re.match(r"BM_(\w+?)_step/K:(\d+)/threads:(\d+)", name)
    if m:
        steps.append((m.group(1), int(m.group(2)), int(m.group(3)), b["real_time"], b["time_unit"]))

Ts = sorted({T for r in rows.values() for T in r})
for th in (1, 2):
    print(f"\n### {th} thread{'s' if th > 1 else ''} (B = 1, H = 8; tokens/s · GFLOP/s · % of peak)\n")
    print("| mixer | form | K = V | " + " | ".join(f"T={T}" for T in Ts) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in Ts) + " |")
    for (mixer, form, K, t) in sorted(k for k in rows if k[3] == th):
        cells = []
        for T in Ts:
            v = rows[(mixer, form, K, t)].get(T)
            cells.append("" if v is None else
                         f"{v[0] / 1e3:.0f}k · {v[1]:.0f} · {100 * v[1] / peak[th]:.0f}%")
        print(f"| {mixer} | {form} | {K} | " + " | ".join(cells) + " |")
print("\n### decode step (one token, B = 1, H = 8)\n")
print("| mixer | K = V | threads | time |")
print("| --- | --- | --- | --- |")
for mixer, K, th, t, unit in sorted(steps):
    print(f"| {mixer} | {K} | {th} | {t / 1e3 if unit == 'ns' else t:.2f} µs |")
