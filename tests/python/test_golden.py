# SPDX-License-Identifier: MIT
"""Every binding against the golden vectors (tests/golden: fla / mamba / PyTorch references,
cases 0-3, with and without an initial state), in both forms and both dtypes."""
import numpy as np
import pytest

import seqmix
from helpers import assert_close

CASES = [0, 1, 2, 3]
VARIANTS = ["noh0", "h0"]
DTYPES = [np.float32, np.float64]
# float32 chunked kernels vs fla's naive float32 recurrence: fla's own chunk kernels are up to
# 3.4e-5 of the largest value away (tests/golden/README.md); seqmix is held to the same scale.
RTOL = {np.float32: 5e-5, np.float64: 5e-5}


def inputs(golden, s, dtype):
    f = golden("inputs")
    return {n: f[f"case{s}.{n}"].astype(dtype) for n in
            ["q", "k", "v", "h0", "g", "gk", "beta", "k_l2"]}


def linear_attn(form, x, f, s, h0):
    fn = seqmix.chunk_linear_attn if form == "chunk" else seqmix.fused_recurrent_linear_attn
    return fn(x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True, normalize=False)


def simple_gla(form, x, f, s, h0):
    fn = seqmix.chunk_simple_gla if form == "chunk" else seqmix.fused_recurrent_simple_gla
    return fn(x["q"], x["k"], x["v"], g=x["g"], initial_state=h0, output_final_state=True)


def retention(form, x, f, s, h0):
    fn = seqmix.chunk_retention if form == "chunk" else seqmix.fused_recurrent_retention
    return fn(x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True)


def lightning_attn(form, x, f, s, h0):
    fn = seqmix.chunk_lightning_attn if form == "chunk" else seqmix.fused_recurrent_lightning_attn
    return fn(x["q"], x["k"], x["v"], layer_idx=2, num_layers=4, initial_state=h0,
              output_final_state=True)


def gla(form, x, f, s, h0):
    if form == "chunk":
        return seqmix.chunk_gla(x["q"], x["k"], x["v"], x["gk"], initial_state=h0,
                                output_final_state=True)
    return seqmix.fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["gk"], initial_state=h0,
                                      output_final_state=True)


def delta(gated, l2):
    def run(form, x, f, s, h0):
        k = x["k"] if l2 else x["k_l2"]
        kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
        if gated:
            fn = (seqmix.chunk_gated_delta_rule if form == "chunk"
                  else seqmix.fused_recurrent_gated_delta_rule)
            return fn(x["q"], k, x["v"], x["g"], x["beta"], **kw)
        fn = seqmix.chunk_delta_rule if form == "chunk" else seqmix.fused_recurrent_delta_rule
        return fn(x["q"], k, x["v"], x["beta"], **kw)
    return run


OPS = {
    "linear_attn": ("fla_scalar_decay", linear_attn),
    "simple_gla": ("fla_scalar_decay", simple_gla),
    "retention": ("fla_scalar_decay", retention),
    "lightning_attn": ("fla_scalar_decay", lightning_attn),
    "gla": ("fla_vector_decay", gla),
    "delta_rule": ("fla_delta", delta(False, False)),
    "delta_rule_l2norm": ("fla_delta", delta(False, True)),
    "gated_delta_rule": ("fla_delta", delta(True, False)),
    "gated_delta_rule_l2norm": ("fla_delta", delta(True, True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("op", list(OPS))
def test_fla_ops(golden, op, form, dtype):
    file, run = OPS[op]
    f = golden(file)
    for s in CASES:
        x = inputs(golden, s, dtype)
        for var in VARIANTS:
            h0 = x["h0"] if var == "h0" else None
            h0_before = None if h0 is None else h0.copy()
            o, ht = run(form, x, f, s, h0)
            assert o.dtype == dtype and ht.dtype == dtype
            name = f"{op}.case{s}.{var}"
            assert_close(o, f[name + ".o_naive"], RTOL[dtype], name + ".o")
            assert_close(ht, f[name + ".ht_naive"], RTOL[dtype], name + ".ht")
            if h0 is not None:  # fla never writes initial_state
                assert np.array_equal(h0, h0_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("fn", [seqmix.mamba_chunk_scan_combined, seqmix.mamba_recurrent_scan],
                         ids=["chunk", "recurrent"])
def test_mamba2(golden, fn, dtype):
    f = golden("mamba2_ssd")
    for s in CASES:
        x = inputs(golden, s, dtype)
        dt = f[f"mamba2_ssd.case{s}.dt"].astype(dtype)
        A = f[f"mamba2_ssd.case{s}.A"].astype(dtype)
        for var in VARIANTS:
            h0 = f[f"mamba2_ssd.case{s}.h0_pn"].astype(dtype) if var == "h0" else None
            # x = v, B = k, C = q, ngroups = H, dt already positive (no softplus)
            y, ht = fn(x["v"], dt, A, x["k"], x["q"], chunk_size=64, initial_states=h0,
                       return_final_states=True)
            name = f"mamba2_ssd.case{s}.{var}"
            assert_close(y, f[name + ".o_naive"], RTOL[dtype], name + ".y")
            assert_close(ht, f[name + ".ht_naive"], RTOL[dtype], name + ".ht [B,H,P,N]")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("op,window", [("softmax_causal", None), ("softmax_swa32", 32)])
def test_softmax_attention(golden, op, window, dtype):
    f = golden("softmax_attn")
    for s in CASES:
        x = inputs(golden, s, dtype)
        o = seqmix.parallel_attn(x["q"], x["k"], x["v"], window_size=window)
        assert_close(o, f[f"{op}.case{s}.o_naive"], 1e-5, f"{op}.case{s}")
        # the same through a KV cache: prefill the first half, decode the rest token by token
        B, T, H, K = x["q"].shape
        V = x["v"].shape[3]
        cache = seqmix.KVCache(B, H, K, V, capacity=T, window_size=window,
                               dtype=np.dtype(dtype).name)
        t0 = max(1, T // 2)
        parts = [cache.prefill(x["q"][:, :t0], x["k"][:, :t0], x["v"][:, :t0])]
        for t in range(t0, T):
            parts.append(cache.step(x["q"][:, t], x["k"][:, t], x["v"][:, t])[:, None])
        assert cache.lengths == [T] * B
        assert_close(np.concatenate(parts, axis=1), f[f"{op}.case{s}.o_naive"], 1e-5,
                     f"{op}.case{s} via KVCache")


MOE_BLOCKS = {
    # block: (weights prefix, constructor keywords, shared expert module name)
    "mixtral": ("mixtral", dict(router="softmax_topk", norm_topk_prob=True), None),
    "qwen3_moe_norm": ("qwen3_moe_norm", dict(norm_topk_prob=True), None),
    "qwen3_moe_nonorm": ("qwen3_moe_norm", dict(norm_topk_prob=False), None),
    "deepseek_v3": ("deepseek_v3", dict(router="sigmoid_bias", n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True),
                    "shared_experts"),
    "qwen3_next": ("qwen3_next", dict(norm_topk_prob=True), "shared_expert"),
}


@pytest.mark.parametrize("form", ["grouped", "per_token"])
@pytest.mark.parametrize("block", list(MOE_BLOCKS))
def test_moe_blocks(golden, block, form):
    f = golden("v2/moe_blocks")
    wname, kw, shared = MOE_BLOCKS[block]
    w = lambda n: f.get(f"{wname}.w.{n}")  # noqa: E731
    extra = {}
    if w("gate.e_score_correction_bias") is not None:
        extra["e_score_correction_bias"] = w("gate.e_score_correction_bias")
    if shared:
        extra.update(shared_gate_proj=w(f"{shared}.gate_proj.weight"),
                     shared_up_proj=w(f"{shared}.up_proj.weight"),
                     shared_down_proj=w(f"{shared}.down_proj.weight"))
        if w("shared_expert_gate.weight") is not None:
            extra["shared_expert_gate"] = w("shared_expert_gate.weight")
    m = seqmix.MoE(w("gate.weight"), w("experts.gate_up_proj"), w("experts.down_proj"), top_k=2,
                   **kw, **extra)
    y, info = m.forward(f[f"{block}.x"], form=form, return_router=True)
    assert_close(y, f[f"{block}.y"], 1e-5, f"{block}.y")
    assert_close(info["router_logits"], f[f"{block}.router_logits"], 1e-5, "router_logits")
    order = np.argsort(info["topk_ids"], axis=1)
    ids = np.take_along_axis(info["topk_ids"], order, 1)
    wts = np.take_along_axis(info["topk_weights"], order, 1)
    assert np.array_equal(ids, f[f"{block}.topk_ids_sorted"])
    assert_close(wts, f[f"{block}.topk_weights_sorted"], 1e-5, "topk_weights")
    assert abs(info["aux_loss"] - float(f[f"{block}.load_balancing_loss"][0])) < 1e-4
    assert abs(info["z_loss"] - float(f[f"{block}.router_z_loss"][0])) < 1e-4
