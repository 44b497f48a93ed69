#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""seqmix's main job: run the benchmark suite and turn its JSON into a table and plots.

Runs (from a Release build directory):
  bench/bench_peak      machine limits: FMA GFLOP/s and memory GB/s on 1..all threads
  bench/bench_suite     every mixer, both forms, softmax attention, over a T sweep
  bench/memory_probe    measured peak working memory of each form as T grows
and writes into --out: peak.json, suite.json, memory.json, report.md, time_per_token.png,
memory.png. Needs Debian's python3 with matplotlib (falls back to the table alone without it).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections import defaultdict


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_name(name):
    """'gla/chunked/T:4096/threads:2/real_time' -> ('gla', 'chunked', {'T': 4096, ...})."""
    parts = [p for p in name.split("/") if p != "real_time"]
    fields = {}
    plain = []
    for p in parts:
        if ":" in p:
            k, v = p.split(":", 1)
            try:
                fields[k] = int(v)
            except ValueError:
                fields[k] = v
        else:
            plain.append(p)
    return plain, fields


def to_seconds(value, unit):
    return value * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def load_benchmarks(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        if "error_occurred" in b and b["error_occurred"]:
            continue
        plain, fields = parse_name(b.get("run_name", b["name"]))
        rows.append({"plain": plain, "fields": fields,
                     "seconds": to_seconds(b["real_time"], b["time_unit"]),
                     "tokens": b.get("tokens"), "flops": b.get("flops"),
                     "bytes": b.get("bytes")})
    return data.get("context", {}), rows


def peak_numbers(rows):
    peak = {"fma": {}, "read": {}, "triad": {}}
    for r in rows:
        kind = r["plain"][0]
        t = r["fields"].get("threads")
        if kind == "BM_fma_peak":
            peak["fma"][t] = r["flops"]
        elif kind == "BM_mem_read":
            peak["read"][t] = r["bytes"]
        elif kind == "BM_mem_triad":
            peak["triad"][t] = r["bytes"]
    return peak


def fmt_rate(x):
    if x is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt_bytes(n):
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024.0
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"


def crossover(ts, linear, quadratic):
    """Smallest T where linear[T] < quadratic[T], log-log interpolated between grid points."""
    prev = None
    for t in ts:
        if t not in linear or t not in quadratic:
            continue
        lin, quad = linear[t], quadratic[t]
        if lin < quad:
            if prev is None:
                return f"≤ {t}"
            pt, pl, pq = prev
            # ratio r = lin/quad crosses 1 between pt and t; interpolate log r over log T.
            r0, r1 = math.log(pl / pq), math.log(lin / quad)
            x = math.log(pt) + (math.log(t) - math.log(pt)) * r0 / (r0 - r1)
            return f"≈ {math.exp(x):.0f}"
        prev = (t, lin, quad)
    return f"> {max(ts)}" if ts else "—"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build/release")
    ap.add_argument("--out", default="build/release/bench-report")
    ap.add_argument("--full", action="store_true", help="T = 256 … 65536, 1 and 2 threads")
    ap.add_argument("--threads", default=None, help="comma list of thread counts")
    ap.add_argument("--min-time", default=None, help="--benchmark_min_time in seconds")
    ap.add_argument("--report-only", action="store_true", help="reuse the JSON in --out")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    bench_dir = os.path.join(args.build, "bench")
    threads = args.threads or ("1,2" if args.full else str(min(2, os.cpu_count() or 1)))
    sweep = "full" if args.full else "quick"
    min_time = args.min_time or ("0.3" if args.full else "0.1")
    peak_json = os.path.join(args.out, "peak.json")
    suite_json = os.path.join(args.out, "suite.json")
    memory_json = os.path.join(args.out, "memory.json")
    commit = git_commit()

    if not args.report_only:
        run([os.path.join(bench_dir, "bench_peak"), "--benchmark_min_time=0.3",
             f"--benchmark_out={peak_json}", "--benchmark_out_format=json",
             f"--benchmark_context=commit={commit}"])
        run([os.path.join(bench_dir, "bench_suite"), f"--sweep={sweep}", f"--threads={threads}",
             f"--benchmark_min_time={min_time}", f"--benchmark_out={suite_json}",
             "--benchmark_out_format=json", f"--benchmark_context=commit={commit}"])
        with open(memory_json, "w") as f:
            print("+ memory_probe", flush=True)
            subprocess.run([os.path.join(bench_dir, "memory_probe"), f"--sweep={sweep}"],
                           stdout=f, check=True)

    _, peak_rows = load_benchmarks(peak_json)
    peak = peak_numbers(peak_rows)
    context, rows = load_benchmarks(suite_json)
    with open(memory_json) as f:
        memory = json.load(f)

    # series[(mixer, form, threads)][T] = row
    series = defaultdict(dict)
    for r in rows:
        if len(r["plain"]) < 2:
            continue
        mixer, form = r["plain"][0], r["plain"][1]
        series[(mixer, form, r["fields"].get("threads", 1))][r["fields"]["T"]] = r
    all_t = sorted({t for s in series.values() for t in s})
    thread_counts = sorted({k[2] for k in series})

    lines = []
    out = lines.append
    out(f"# seqmix benchmark report ({sweep} sweep)\n")
    out(f"Machine: {cpu_name()}, {os.cpu_count()} cores; commit `{commit}`; "
        f"B = 1, H = 8, K = V = 64 (softmax: D = 64), fp32, wall-clock medians of Google "
        f"Benchmark runs (min time {min_time} s).\n")
    out("Machine limits (bench_peak): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: FMA {peak['fma'].get(t, 0) / 1e9:.1f} GFLOP/s, "
        f"read {peak['read'].get(t, 0) / 1e9:.1f} GB/s" for t in sorted(peak["fma"])) + "\n")
    out("Forms: `chunked` = chunked-parallel prefill over the whole sequence; `recurrent` = token "
        "loop over the sequence; `step` = one decode token (B = 1), its cost does not depend on T "
        "for the O(N) mixers; softmax `decode` = one token against a KV cache holding T tokens. "
        "Each cell: time per token (µs) · GFLOP/s · % of the FMA peak for that thread count "
        "(decode of softmax: GB/s of K/V read · % of measured read bandwidth).\n")
    for th in thread_counts:
        fma = peak["fma"].get(th) or max(peak["fma"].values())
        bw = peak["read"].get(th) or max(peak["read"].values())
        out(f"\n## {th} thread{'s' if th > 1 else ''}\n")
        out("| mixer | form | " + " | ".join(f"T={t}" for t in all_t) + " |")
        out("| --- | --- | " + " | ".join("---" for _ in all_t) + " |")
        for (mixer, form, t_), s in sorted(series.items()):
            if t_ != th:
                continue
            cells = []
            for t in all_t:
                r = s.get(t)
                if r is None:
                    cells.append("—")
                    continue
                per_tok = 1e6 / r["tokens"] if r["tokens"] else float("nan")
                if r.get("bytes"):
                    cells.append(f"{per_tok:.3g} µs · {r['bytes'] / 1e9:.1f} GB/s · "
                                 f"{100 * r['bytes'] / bw:.0f}% bw")
                elif r.get("flops"):
                    cells.append(f"{per_tok:.3g} µs · {r['flops'] / 1e9:.1f} GF · "
                                 f"{100 * r['flops'] / fma:.0f}%")
                else:
                    cells.append(f"{per_tok:.3g} µs")
            out(f"| {mixer} | {form} | " + " | ".join(cells) + " |")

        # crossovers against causal softmax attention
        soft_pre = {t: r["seconds"] for t, r in series.get(("softmax", "chunked", th), {}).items()}
        soft_dec = {t: r["seconds"] for t, r in series.get(("softmax", "decode", th), {}).items()}
        mixers = sorted({m for (m, f, t_) in series if t_ == th and m not in ("softmax",)})
        if soft_pre:
            out(f"\nCrossover T at which each O(N) mixer beats causal softmax attention "
                f"({th} thread{'s' if th > 1 else ''}):\n")
            out("| mixer | prefill (chunked vs softmax chunked) | decode (step vs softmax decode "
                "at cache length T) |")
            out("| --- | --- | --- |")
            for m in mixers:
                pre = {t: r["seconds"] for t, r in series.get((m, "chunked", th), {}).items()}
                step = series.get((m, "step", th), {})
                dec = {t: r["seconds"] for t, r in step.items()}
                if len(dec) == 1:  # one measurement stands for every T
                    only = next(iter(dec.values()))
                    dec = {t: only for t in all_t}
                out(f"| {m} | {crossover(all_t, pre, soft_pre) if pre else '—'} | "
                    f"{crossover(all_t, dec, soft_dec) if dec and soft_dec else '—'} |")

    out("\n## Peak working memory (measured: bytes allocated during one call, inputs excluded)\n")
    mem_series = defaultdict(dict)
    for m in memory.get("results", []):
        mem_series[(m["mixer"], m["form"])][m["T"]] = m["peak_bytes"]
    mem_t = sorted({t for s in mem_series.values() for t in s})
    out("| mixer | form | " + " | ".join(f"T={t}" for t in mem_t) + " |")
    out("| --- | --- | " + " | ".join("---" for _ in mem_t) + " |")
    for (mixer, form), s in sorted(mem_series.items()):
        out(f"| {mixer} | {form} | " + " | ".join(fmt_bytes(s[t]) if t in s else "—"
                                                 for t in mem_t) + " |")
    if memory.get("note"):
        out("\n" + memory["note"] + "\n")

    report = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(report)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: table only (apt-get install python3-matplotlib)")
        return 0

    th = max(thread_counts)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    styles = {"chunked": "-", "recurrent": "--", "step": ":", "decode": ":"}
    markers = {"chunked": "o", "recurrent": "s", "step": "^", "decode": "v"}
    mixer_names = sorted({m for (m, f, t_) in series if t_ == th})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(mixer_names)}
    for (mixer, form, t_), s in sorted(series.items()):
        if t_ != th:
            continue
        ts = sorted(s)
        ys = [1e6 / s[t]["tokens"] for t in ts]
        if len(ts) == 1:  # a step measured once: draw it flat over the sweep
            ts, ys = [all_t[0], all_t[-1]], ys * 2
        ax.plot(ts, ys, styles.get(form, "-"), marker=markers.get(form, "o"),
                color=colors[mixer], label=f"{mixer} · {form}",
                linewidth=2.5 if mixer == "softmax" else 1.5, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens; for decode: tokens already in the cache)")
    ax.set_ylabel("time per token (µs, log scale)")
    ax.set_title(f"seqmix: time per token vs T — B=1, H=8, K=V=64, fp32, {th} threads\n"
                 f"{cpu_name()}, commit {commit}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    p1 = os.path.join(args.out, "time_per_token.png")
    fig.savefig(p1, dpi=110)

    fig, ax = plt.subplots(figsize=(10, 6))
    mem_mixers = sorted({m for (m, f) in mem_series})
    mem_colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(
        [m for m in mem_mixers if m not in ("activations", "naive_softmax")])}
    mem_colors["activations"] = "0.55"
    mem_colors["naive_softmax"] = "black"
    for (mixer, form), s in sorted(mem_series.items()):
        ts = sorted(s)
        ax.plot(ts, [max(s[t], 1) / 2**20 for t in ts],
                "-." if mixer in ("activations", "naive_softmax") else
                ("-" if form.startswith("chunked") else "--"),
                marker="o" if form.startswith("chunked") else "s", label=f"{mixer} · {form}",
                markersize=4, color=mem_colors[mixer],
                linewidth=2.5 if mixer == "naive_softmax" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("peak working memory (MiB, log scale)")
    ax.set_title("seqmix: measured peak working memory vs T (B=1, H=8, K=V=64, fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    p2 = os.path.join(args.out, "memory.png")
    fig.savefig(p2, dpi=110)
    print(f"plots: {os.path.abspath(p1)}\n       {os.path.abspath(p2)}")
    print(f"table: {os.path.abspath(os.path.join(args.out, 'report.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
