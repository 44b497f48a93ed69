// SPDX-License-Identifier: MIT
// seqmix: header-only C++20 sequence-mixing kernels for CPUs. The umbrella header.
#pragma once

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/version.hpp>
