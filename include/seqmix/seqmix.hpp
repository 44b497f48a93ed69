// SPDX-License-Identifier: MIT
// seqmix: header-only C++20 sequence-mixing kernels for CPUs. The umbrella header: the core,
// every mixer (chunked + recurrent forms, step) and the plain references in seqmix::reference.
#pragma once

#include <seqmix/core/any_tensor.hpp>
#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/io/mapped_file.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/memory.hpp>
#include <seqmix/core/packed_weights.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/view.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/tune.hpp>
#include <seqmix/version.hpp>

// gated accumulation: linear attention, simple GLA / retention / Lightning, GLA, Mamba2 SSD
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

// delta rule: DeltaNet, Gated DeltaNet
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/rwkv7.hpp>
#include <seqmix/reference/delta_rule.hpp>

// softmax attention (flash-style, KV cache) and sliding-window attention (ring buffer)
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>
#include <seqmix/reference/attention.hpp>

// block-sparse attention: NSA (native_sparse_attention, nsa_cache)
#include <seqmix/mixers/nsa.hpp>
#include <seqmix/reference/nsa.hpp>

// block-sparse attention: MoBA (moba_attention, moba_cache)
#include <seqmix/mixers/moba.hpp>
#include <seqmix/reference/moba.hpp>

// mixture of experts: routers, capacity, grouped (prefill) and per-token (decode) forms
#include <seqmix/mixers/moe.hpp>
#include <seqmix/reference/moe.hpp>

// backward passes of the chunked forms (training): mixers/backward.hpp lists them
#include <seqmix/mixers/backward.hpp>

// layers with weights from checkpoints (layers/layers.hpp lists them)
#include <seqmix/layers/layers.hpp>
// hybrid Linear-MoE models from Hugging Face checkpoints (models/models.hpp)
#include <seqmix/models/models.hpp>
