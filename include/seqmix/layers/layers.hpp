// SPDX-License-Identifier: MIT
// The layer tier (issue 13): building blocks and mixer layers with weights from checkpoints.
//
//   blocks:  short_conv, rms_norm / gated_rms_norm, l2norm, rope, linear, swiglu_mlp, moe_ffn
//   layers:  gated_deltanet (Qwen3-Next linear_attn), gated_attention (Qwen3-Next self_attn,
//            plain GQA with gated = false), mamba2 (Mamba2 / GraniteMoeHybrid mamba),
//            kda_layer (Kimi-Linear KDA self_attn), mla_attention (Kimi-Linear / DeepSeek MLA),
//            gla_layer (fla's GatedLinearAttention), rwkv7_layer (fla's RWKV7Attention)
//   caches:  recurrent_cache (conv window + mixer state), attention_cache (kv_cache)
// Each header gives its math, shapes and cost; reference/layers.hpp holds the plain references.
#pragma once

#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/gated_deltanet.hpp>
#include <seqmix/layers/gla.hpp>
#include <seqmix/layers/kda.hpp>
#include <seqmix/layers/l2norm.hpp>
#include <seqmix/layers/linear.hpp>
#include <seqmix/layers/mamba2.hpp>
#include <seqmix/layers/mla_attention.hpp>
#include <seqmix/layers/moe_ffn.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/rope.hpp>
#include <seqmix/layers/rwkv7.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/swiglu_mlp.hpp>
#include <seqmix/layers/weights.hpp>
