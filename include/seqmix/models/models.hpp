// SPDX-License-Identifier: MIT
// The models tier (issue 14): hybrid Linear-MoE decoders from Hugging Face checkpoints.
//
//   config:   model_config / load_config (config.json -> layers, MoE placement, multipliers)
//   model:    hybrid_model (load, make_cache, prefill, decode), model_cache (snapshot/restore)
//   sampling: greedy_token, sampler (temperature + top-p, seeded)
// Families: qwen3_next (Gated DeltaNet + gated attention + MoE with shared expert),
// granitemoehybrid (Mamba2 + attention + MoE + shared MLP). Each header gives its math and cost.
#pragma once

#include <seqmix/models/config.hpp>
#include <seqmix/models/model.hpp>
#include <seqmix/models/sampling.hpp>
