#!/usr/bin/env bash
# Installs the Debian packages seqmix's build, tests and benchmarks need, only those missing.
# Run as root on Debian 12 (bookworm). Nothing is downloaded at build time.
# pybind11-dev, python3-dev, python3-pytest and python3-torch (~1 GB with its libraries) are for
# the Python module and its tests (python/, tests/python); without them CMake skips the module.
set -euo pipefail
packages=(cmake ninja-build g++ clang libomp-14-dev libclang-rt-14-dev ccache clang-format
          libeigen3-dev libxsimd-dev catch2 libbenchmark-dev nlohmann-json3-dev
          python3-matplotlib python3-numpy libopenblas-dev
          pybind11-dev python3-dev python3-pytest python3-torch)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "seqmix: installing missing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "seqmix: not root; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
