// SPDX-License-Identifier: MIT
// Building blocks of the layer tier (issue 13): short_conv, rms_norm, gated_rms_norm, l2norm,
// rope, linear, swiglu_mlp against the double references (reference/layers.hpp).
#include <catch2/catch.hpp>

#include <seqmix/layers/short_conv.hpp>
