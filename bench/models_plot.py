#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Plots bench_models' model-level O(N) vs O(N^2) picture from its JSON output.

    SEQMIX_BENCH_MODEL=0.5b bench_models --benchmark_filter='model_(prefill|decode)/[0-9]+/[01]/0/0/' \
        --benchmark_format=json --benchmark_out=models.json
    /usr/bin/python3 bench/models_plot.py models.json models.png [--title TEXT]

Left: prefill tokens/s against the context T; right: decode milliseconds per token at context T
(one step after a T-token prefill), for the hybrid (3:1 Gated DeltaNet : attention) and the
all-attention model of the same shape. Rows of one dtype and thread count are drawn (the first
found unless --dtype / --threads say which). Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import re
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("png")
    ap.add_argument("--title", default="")
    ap.add_argument("--dtype", type=int, default=None, help="0 = f32, 1 = bf16")
    ap.add_argument("--threads", type=int, default=None, help="0 = all")
    args = ap.parse_args()
    rows = json.load(open(args.json))["benchmarks"]
    pat = re.compile(r"^model_(prefill|decode)/(\d+)/([01])/([01])/(\d+)/")
    data = {}  # (phase, kind) -> {T: value}
    for b in rows:
        m = pat.match(b["name"])
        if not m or b.get("run_type", "iteration") != "iteration" or "error_message" in b:
            continue
        phase, T, kind, dtype, threads = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))
        if args.dtype is None:
            args.dtype = dtype
        if args.threads is None:
            args.threads = threads
        if dtype != args.dtype or threads != args.threads:
            continue
        unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        value = b["tokens"] if phase == "prefill" else b["real_time"] * unit
        data.setdefault((phase, kind), {})[T] = value
    if not data:
        print("no model_prefill / model_decode rows in", args.json)
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available (apt-get install python3-matplotlib)")
        return 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = {0: "hybrid 3:1 (GDN : attention)", 1: "all attention"}
    for ax, phase, ylabel in ((axes[0], "prefill", "prefill tokens/s"),
                              (axes[1], "decode", "decode ms per token")):
        for kind in (0, 1):
            series = data.get((phase, kind), {})
            if not series:
                continue
            ts = sorted(series)
            ax.plot(ts, [series[t] for t in ts], marker="o", label=names[kind])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    dt = {0: "f32", 1: "bf16"}[args.dtype]
    th = "all threads" if args.threads == 0 else f"{args.threads} thread(s)"
    fig.suptitle(args.title or f"0.5B Qwen3-Next-shaped model, {dt}, {th}")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print("wrote", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
