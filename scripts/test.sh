#!/usr/bin/env bash
# The test command: installs what is missing, builds every test with g++ (warnings are errors)
# and runs them all with CTest. Extra arguments go to ctest (e.g. -R gla).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset dev
cmake --build --preset dev
ctest --preset dev "$@"
