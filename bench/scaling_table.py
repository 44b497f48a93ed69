#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Thread-scaling table from `bench_suite --sweep=scaling` JSON (and optionally bench_peak's).

  bench_suite --sweep=scaling --threads=1,2,4,8,16 --benchmark_out=scaling.json ...
  bench/scaling_table.py scaling.json [peak.json]

Prints a Markdown table: per mixer, tokens/s at each thread count and the speedup over 1 thread;
with peak.json also the FMA probe's own scaling, the ceiling any compute-bound kernel shares.
"""
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    out = defaultdict(dict)
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        parts = [p for p in b.get("run_name", b["name"]).split("/") if p != "real_time"]
        fields = dict(p.split(":", 1) for p in parts if ":" in p)
        plain = [p for p in parts if ":" not in p]
        out["/".join(plain)][int(fields["threads"])] = b
    return out


def main():
    suite = load(sys.argv[1])
    threads = sorted({t for s in suite.values() for t in s})
    print("| mixer · form | " + " | ".join(f"{t} thr" for t in threads) + " | speedup at "
          f"{threads[-1]} |")
    print("| --- | " + " | ".join("---" for _ in threads) + " | --- |")
    if len(sys.argv) > 2:
        peak = load(sys.argv[2]).get("BM_fma_peak", {})
        if peak:
            base = peak[min(peak)]["flops"]
            cells = [f"{peak[t]['flops'] / 1e9:.0f} GFLOP/s" if t in peak else "—" for t in threads]
            top = max(peak)
            print("| FMA peak probe | " + " | ".join(cells) +
                  f" | {peak[top]['flops'] / base:.1f}× |")
    for name, s in sorted(suite.items()):
        base = s[min(s)]["tokens"]
        cells = [f"{s[t]['tokens'] / 1e3:.0f} ktok/s ({s[t]['flops'] / 1e9:.0f} GF)" if t in s else "—"
                 for t in threads]
        top = max(s)
        print(f"| {name.replace('/', ' · ')} | " + " | ".join(cells) +
              f" | {s[top]['tokens'] / base:.1f}× |")


if __name__ == "__main__":
    main()
