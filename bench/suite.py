#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""seqmix's main job: run the benchmark suite and turn its JSON into a table and plots.

Runs (from a Release build directory):
  bench/bench_peak      machine limits: FMA GFLOP/s and memory GB/s on 1..all threads
  bench/bench_suite     every mixer, both forms, softmax attention, over a T sweep
  bench/memory_probe    measured peak working memory of each form as T grows
  bench/bench_layers    GDN and Mamba2 layers against the gated attention layer over T
and writes into --out: peak.json, suite.json, memory.json, layers.json, report.md, time_per_token.png,
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


def crossover_point(ts, linear, quadratic):
    """(text, T) of the smallest T where linear[T] < quadratic[T], log-log interpolated between
    grid points; T is None when there is no crossing inside the sweep."""
    prev = None
    for t in ts:
        if t not in linear or t not in quadratic:
            continue
        lin, quad = linear[t], quadratic[t]
        if lin < quad:
            if prev is None:
                return f"≤ {t}", t
            pt, pl, pq = prev
            # ratio r = lin/quad crosses 1 between pt and t; interpolate log r over log T.
            r0, r1 = math.log(pl / pq), math.log(lin / quad)
            x = math.exp(math.log(pt) + (math.log(t) - math.log(pt)) * r0 / (r0 - r1))
            return f"≈ {x:.0f}", x
        prev = (t, lin, quad)
    return (f"> {max(ts)}" if ts else "—"), None


def crossover(ts, linear, quadratic):
    return crossover_point(ts, linear, quadratic)[0]


def machine_state(before, after, rows):
    """Reasons to distrust the figures: the peak probe moved by > 10 % between the start and the
    end of the sweep (other load came or went), or a figure exceeds 100 % of the FMA peak (the
    peak was measured while the machine was busy)."""
    reasons = []
    for kind, label in (("fma", "FMA peak"), ("read", "memory read")):
        for t in sorted(set(before[kind]) & set(after[kind])):
            a, b = before[kind][t], after[kind][t]
            if a and b and abs(a - b) / max(a, b) > 0.10:
                reasons.append(f"{label} on {t} thread{'s' if t > 1 else ''} moved from "
                               f"{a / 1e9:.1f} to {b / 1e9:.1f} G/s during the sweep "
                               f"({100 * abs(a - b) / max(a, b):.0f} % > 10 %)")
    for r in rows:
        th = r["fields"].get("threads", 1)
        fma = max(before["fma"].get(th, 0), after["fma"].get(th, 0))
        if r.get("flops") and fma and r["flops"] > fma:
            name = "/".join(r["plain"]) + f" T={r['fields'].get('T')} {th}T"
            reasons.append(f"{name} reports {r['flops'] / 1e9:.1f} GFLOP/s, "
                           f"{100 * r['flops'] / fma:.0f} % of the measured peak (> 100 %)")
    return reasons


# Families of the per-family plot panels: each O(N) mixer beside causal softmax attention.
FAMILIES = (
    ("gated accumulation", ("linear_attention", "simple_gla", "gla", "mamba2_ssd", "rwkv6")),
    ("delta rule", ("delta_net", "gated_delta_net", "kda", "rwkv7")),
    ("sliding window and block-sparse", ("sliding_window", "nsa", "moba")),
)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build/release")
    ap.add_argument("--out", default="build/release/bench-report")
    ap.add_argument("--full", action="store_true", help="T = 256 … 65536, 1 and 2 threads")
    ap.add_argument("--threads", default=None, help="comma list of thread counts")
    ap.add_argument("--min-time", default=None, help="--benchmark_min_time in seconds")
    ap.add_argument("--repetitions", type=int, default=3,
                    help="Google Benchmark repetitions per case (>= 3; the median is reported)")
    ap.add_argument("--report-only", action="store_true", help="reuse the JSON in --out")
    args = ap.parse_args()
    if args.repetitions < 3:
        ap.error(f"--repetitions must be >= 3 (a median of fewer runs is not robust), got "
                 f"{args.repetitions}")

    os.makedirs(args.out, exist_ok=True)
    bench_dir = os.path.join(args.build, "bench")
    threads = args.threads or ("1,2" if args.full else str(min(2, os.cpu_count() or 1)))
    sweep = "full" if args.full else "quick"
    min_time = args.min_time or ("0.2" if args.full else "0.05")
    peak_json = os.path.join(args.out, "peak.json")
    suite_json = os.path.join(args.out, "suite.json")
    memory_json = os.path.join(args.out, "memory.json")
    layers_json = os.path.join(args.out, "layers.json")
    commit = git_commit()

    peak_after_json = os.path.join(args.out, "peak_after.json")
    if not args.report_only:
        def probe(path):
            run([os.path.join(bench_dir, "bench_peak"), "--benchmark_min_time=0.3",
                 f"--benchmark_out={path}", "--benchmark_out_format=json",
                 f"--benchmark_context=commit={commit}"])
        probe(peak_json)  # before the sweep ...
        run([os.path.join(bench_dir, "bench_suite"), f"--sweep={sweep}", f"--threads={threads}",
             f"--benchmark_min_time={min_time}", f"--benchmark_repetitions={args.repetitions}",
             "--benchmark_report_aggregates_only=true", f"--benchmark_out={suite_json}",
             "--benchmark_out_format=json", f"--benchmark_context=commit={commit}",
             f"--benchmark_context=cpu={cpu_name()}",
             f"--benchmark_context=seqmix_min_time={min_time}",
             f"--benchmark_context=seqmix_repetitions={args.repetitions}"])
        # the layer tier at hidden 1024 (bench_layers): GDN and Mamba2 layers against the gated
        # attention layer over T, f32, the sweep's largest thread count
        layer_threads = max(int(t) for t in threads.split(","))
        run([os.path.join(bench_dir, "bench_layers"),
             f"--benchmark_filter=layer_prefill/[012]/[0-9]+/{layer_threads}/0/",
             f"--benchmark_min_time={min_time}", f"--benchmark_repetitions={args.repetitions}",
             "--benchmark_report_aggregates_only=true", f"--benchmark_out={layers_json}",
             "--benchmark_out_format=json", f"--benchmark_context=commit={commit}"])
        with open(memory_json, "w") as f:
            print("+ memory_probe", flush=True)
            subprocess.run([os.path.join(bench_dir, "memory_probe"), f"--sweep={sweep}"],
                           stdout=f, check=True)
        probe(peak_after_json)  # ... and after it: a change means the machine's load changed

    _, peak_rows = load_benchmarks(peak_json)
    peak = peak_numbers(peak_rows)
    peak_after = peak_numbers(load_benchmarks(peak_after_json)[1]) if os.path.exists(
        peak_after_json) else peak
    context, rows = load_benchmarks(suite_json)
    reasons = machine_state(peak, peak_after, rows)
    # what the run recorded wins over this invocation's values (--report-only on older JSON)
    commit = context.get("commit", commit)
    cpu = context.get("cpu", cpu_name())
    min_time = context.get("seqmix_min_time", "not recorded" if args.report_only else min_time)
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
    if reasons:
        out("**machine loaded: figures unreliable** — " + "; ".join(reasons) + ".\n")
    else:
        out("Machine state: the peak probe before and after the sweep agree within 10 % and no "
            "figure exceeds the measured peak.\n")
    reps = context.get("seqmix_repetitions", "1 (older run: no repetitions recorded)"
                       if args.report_only else args.repetitions)
    out(f"Machine: {cpu}, {context.get('num_cpus', os.cpu_count())} cores; seqmix compiled for SIMD target "
        f"`{context.get('seqmix_simd_arch', 'unknown')}`; commit `{commit}`; "
        f"B = 1, H = 8, K = V = 64 (softmax: D = 64), fp32, wall-clock medians of {reps} "
        f"Google Benchmark repetitions per case (min time {min_time} s each).\n")
    if context.get("library_build_type") == "debug":
        out("Google Benchmark prints \"Library was built as DEBUG. Timings may be affected.\": "
            "that is Debian's build of libbenchmark itself (the timing harness, compiled without "
            "NDEBUG), not seqmix; the code measured here is compiled with -O3 -march=native.\n")
    out("Machine limits (bench_peak, before / after the sweep): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: FMA {peak['fma'].get(t, 0) / 1e9:.1f} / "
        f"{peak_after['fma'].get(t, 0) / 1e9:.1f} GFLOP/s, read "
        f"{peak['read'].get(t, 0) / 1e9:.1f} / {peak_after['read'].get(t, 0) / 1e9:.1f} GB/s"
        for t in sorted(peak["fma"])) + "; percentages below are of the higher of the two.\n")
    # percentages against the better of the two probes (the honest, smaller percentage)
    for kind in ("fma", "read"):
        for t, v in peak_after[kind].items():
            peak[kind][t] = max(peak[kind].get(t, 0), v)
    out("Forms: `chunked` = chunked-parallel prefill over the whole sequence; `recurrent` = token "
        "loop over the sequence; `step` = one decode token (B = 1), its cost does not depend on T "
        "for the O(N) mixers; softmax `decode` = one token against a KV cache holding T tokens. "
        "Each cell: time per token (µs) · GFLOP/s · % of the FMA peak for that thread count "
        "(decode of softmax: GB/s of K/V read · % of measured read bandwidth; above 100 % the "
        "K/V cache was cache-resident, since the probe reads 256 MiB from DRAM).\n")
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

    if os.path.exists(layers_json):
        # layer_prefill/<kind>/<T>/<threads>/<dtype>: kind 0 GDN, 1 gated attention, 2 Mamba2
        names = {0: "Gated DeltaNet layer", 1: "gated attention layer", 2: "Mamba2 layer"}
        lay = defaultdict(dict)
        lay_threads = None
        for r in load_benchmarks(layers_json)[1]:
            nums = [int(x) for x in r["plain"][1:] if x.isdigit()]
            if r["plain"][0] != "layer_prefill" or len(nums) < 4:
                continue
            kind, t, lay_threads = nums[0], nums[1], nums[2]
            lay[kind][t] = r
        if lay:
            lt = sorted({t for s_ in lay.values() for t in s_})
            out(f"\n## Layers: O(N) vs O(N²) at the layer level (bench_layers, hidden 1024, "
                f"B = 1, f32, {lay_threads} thread{'s' if lay_threads != 1 else ''})\n")
            out("GDN: 8 key / 16 value heads × 64; gated attention: 16 heads × 64, 4 KV heads, "
                "partial RoPE; Mamba2: 16 heads × 64, state 128. Prefill of T tokens, "
                "projections included: µs per token, % of the FMA peak (projection and mixer "
                "FLOP), and the attention layer's time over the layer's.\n")
            out("| layer | " + " | ".join(f"T={t}" for t in lt) + " |")
            out("| --- | " + " | ".join("---" for _ in lt) + " |")
            att = lay.get(1, {})
            fma = peak["fma"].get(lay_threads)
            for kind in sorted(lay):
                cells = []
                for t in lt:
                    r = lay[kind].get(t)
                    if not r or not r["tokens"]:
                        cells.append("—")
                        continue
                    c = f"{1e6 / r['tokens']:.1f} µs"
                    if fma and r["flops"]:
                        c += f", {100 * r['flops'] / fma:.0f} %"
                    if kind != 1 and t in att:
                        c += f", {att[t]['seconds'] / r['seconds']:.2f}×"
                    cells.append(c)
                out(f"| {names.get(kind, kind)} | " + " | ".join(cells) + " |")

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

    # One panel per family: its O(N) mixers (chunked, recurrent, step) beside causal softmax
    # attention (chunked prefill, KV-cache decode), with each mixer's prefill crossover marked.
    th = max(thread_counts)
    styles = {"chunked": "-", "recurrent": "--", "step": ":", "decode": ":"}
    markers = {"chunked": "o", "recurrent": "s", "step": "^", "decode": "v"}
    panels = [(title, [m for m in members if any(k[0] == m and k[2] == th for k in series)])
              for title, members in FAMILIES]
    panels = [(title, members) for title, members in panels if members]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 6.2), squeeze=False)
    soft_pre = {t: r["seconds"] for t, r in series.get(("softmax", "chunked", th), {}).items()}
    for ax, (title, members) in zip(axes[0], panels):
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(members)}
        colors["softmax"] = "black"
        for (mixer, form, t_), s_ in sorted(series.items()):
            if t_ != th or (mixer not in members and mixer != "softmax"):
                continue
            ts = sorted(s_)  # drawn only where measured (a step measured at one T is one marker)
            ys = [1e6 / s_[t]["tokens"] for t in ts]
            ax.plot(ts, ys, styles.get(form, "-"), marker=markers.get(form, "o"),
                    color=colors[mixer], label=f"{mixer} · {form}" +
                    (f" (T={ts[0]})" if len(ts) == 1 else ""),
                    linewidth=2.5 if mixer == "softmax" else 1.5,
                    markersize=7 if len(ts) == 1 else 4)
        for i, m in enumerate(members):
            pre = series.get((m, "chunked", th), {})
            text, x = crossover_point(all_t, {t: r["seconds"] for t, r in pre.items()}, soft_pre)
            if x is None or not pre:
                continue
            # the crossing point on the mixer's own curve, interpolated in log-log space
            ts = sorted(pre)
            y = None
            for a, b in zip(ts, ts[1:]):
                if a <= x <= b:
                    ya, yb = 1e6 / pre[a]["tokens"], 1e6 / pre[b]["tokens"]
                    f = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
                    y = math.exp(math.log(ya) + f * (math.log(yb) - math.log(ya)))
            if y is None:
                y = 1e6 / pre[ts[0]]["tokens"]
            ax.plot([x], [y], marker="*", markersize=14, color=colors[m], markeredgecolor="k",
                    linestyle="none")
            ax.annotate(f"T {text}", (x, y), textcoords="offset points", xytext=(8, -12 - 11 * i),
                        fontsize=8, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens; decode: tokens in the cache)")
        ax.set_ylabel("time per token (µs, log scale)")
        ax.set_title(f"{title} vs softmax attention")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"seqmix time per token — B=1, H=8, K=V=64, fp32, {th} threads; ★ = prefill "
                 f"crossover with softmax\n{cpu}, commit {commit}"
                 + ("  [machine loaded: figures unreliable]" if reasons else ""), fontsize=10)
    fig.tight_layout()
    p1 = os.path.join(args.out, "time_per_token.png")
    fig.savefig(p1, dpi=110)

    fig, ax = plt.subplots(figsize=(10, 6))
    mem_mixers = sorted({m for (m, f) in mem_series})
    mem_colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(
        [m for m in mem_mixers if m not in ("activations", "naive_softmax")])}
    mem_colors["activations"] = "0.55"
    mem_colors["naive_softmax"] = "black"
    # Several forms hold exactly the same memory (e.g. every recurrent state): distinct hollow
    # markers of decreasing size per series keep coinciding lines visible.
    marker_cycle = ["o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p"]
    for i, ((mixer, form), s) in enumerate(sorted(mem_series.items())):
        ts = sorted(s)
        ax.plot(ts, [max(s[t], 1) / 2**20 for t in ts],
                "-." if mixer in ("activations", "naive_softmax") else
                ("-" if form.startswith("chunked") else "--"),
                marker=marker_cycle[i % len(marker_cycle)], markerfacecolor="none",
                markersize=11 - 5 * i / max(1, len(mem_series) - 1), label=f"{mixer} · {form}",
                color=mem_colors[mixer], linewidth=2.5 if mixer == "naive_softmax" else 1.2)
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
