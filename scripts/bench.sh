#!/usr/bin/env bash
# The main job: installs what is missing, builds the benchmarks in Release (-march=native), runs
# the machine-peak probe, the O(N) vs O(N²) suite (every mixer, both forms, softmax attention)
# and the working-memory probe, then prints the Markdown table and the paths of the plots.
# Every case runs 3 repetitions (the median is reported); the peak probe runs before and after
# the sweep, and the report is marked "machine loaded: figures unreliable" when the two differ
# by more than 10 % or a figure exceeds 100 % of the peak.
#   scripts/bench.sh            short sweep (T = 256 … 16384, 2 threads; a few minutes on 2 cores)
#   scripts/bench.sh --full     T = 256 … 65536, 1 and 2 threads (tens of minutes)
# Results: build/release/bench-report/{report.md,*.json,*.png}
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release
cmake --build --preset release --target bench_peak bench_suite memory_probe bench_layers
exec /usr/bin/python3 bench/suite.py --build build/release --out build/release/bench-report "$@"
