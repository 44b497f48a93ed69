# SPDX-License-Identifier: MIT
# Type stubs of seqmix (the extension seqmix._seqmix re-exported). Array = a NumPy array or a
# PyTorch CPU tensor, float32 or float64; outputs have the kind of the first tensor argument.
# Shapes: B batch, T tokens, H heads (HV value heads for GVA), K key dim, V value dim,
# N sequences (B, or len(cu_seqlens) - 1).
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Array = Any  # numpy.ndarray | torch.Tensor
Offsets = Union[Array, Sequence[int], None]
SeqOut = Tuple[Array, Optional[Array]]  # (o [B, T, H, V], final_state [N, H, K, V] or None)

__version__: str
has_openmp: bool

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_arch() -> str: ...
def load_safetensors(path: str, metadata: bool = ...) -> Dict[str, np.ndarray]: ...

# linear attention: q, k [B, T, H, K]; v [B, T, H, V]
def chunk_linear_attn(q: Array, k: Array, v: Array, scale: Optional[float] = None,
                      initial_state: Optional[Array] = None, output_final_state: bool = False,
                      normalize: bool = True, cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_linear_attn(q: Array, k: Array, v: Array, scale: Optional[float] = None,
                                initial_state: Optional[Array] = None,
                                output_final_state: bool = False, normalize: bool = False,
                                cu_seqlens: Offsets = None) -> SeqOut: ...
# simple GLA: g [B, T, H] log decays, or g_gamma [H]
def chunk_simple_gla(q: Array, k: Array, v: Array, g: Optional[Array] = None,
                     g_gamma: Optional[Array] = None, scale: Optional[float] = None,
                     initial_state: Optional[Array] = None, output_final_state: bool = False,
                     cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_simple_gla(q: Array, k: Array, v: Array, g: Optional[Array] = None,
                               g_gamma: Optional[Array] = None, scale: Optional[float] = None,
                               initial_state: Optional[Array] = None,
                               output_final_state: bool = False,
                               cu_seqlens: Offsets = None) -> SeqOut: ...
def chunk_retention(q: Array, k: Array, v: Array, scale: Optional[float] = None,
                    initial_state: Optional[Array] = None, output_final_state: bool = False,
                    cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_retention(q: Array, k: Array, v: Array, scale: Optional[float] = None,
                              initial_state: Optional[Array] = None,
                              output_final_state: bool = False,
                              cu_seqlens: Offsets = None) -> SeqOut: ...
def chunk_lightning_attn(q: Array, k: Array, v: Array, layer_idx: int, num_layers: int,
                         scale: Optional[float] = None, initial_state: Optional[Array] = None,
                         output_final_state: bool = False, cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_lightning_attn(q: Array, k: Array, v: Array, layer_idx: int, num_layers: int,
                                   scale: Optional[float] = None,
                                   initial_state: Optional[Array] = None,
                                   output_final_state: bool = False,
                                   cu_seqlens: Offsets = None) -> SeqOut: ...
# GLA: g / gk [B, T, H, K], gv [B, T, H, V]
def chunk_gla(q: Array, k: Array, v: Array, g: Array, scale: Optional[float] = None,
              initial_state: Optional[Array] = None, output_final_state: bool = False,
              cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_gla(q: Array, k: Array, v: Array, gk: Optional[Array] = None,
                        gv: Optional[Array] = None, scale: Optional[float] = None,
                        initial_state: Optional[Array] = None, output_final_state: bool = False,
                        cu_seqlens: Offsets = None) -> SeqOut: ...
# DeltaNet / Gated DeltaNet: v [B, T, HV, V]; g, beta [B, T, HV]; states [N, HV, K, V]
def chunk_delta_rule(q: Array, k: Array, v: Array, beta: Array, scale: Optional[float] = None,
                     initial_state: Optional[Array] = None, output_final_state: bool = False,
                     cu_seqlens: Offsets = None,
                     use_qk_l2norm_in_kernel: bool = False) -> SeqOut: ...
def fused_recurrent_delta_rule(q: Array, k: Array, v: Array, beta: Optional[Array] = None,
                               scale: Optional[float] = None,
                               initial_state: Optional[Array] = None,
                               output_final_state: bool = False, cu_seqlens: Offsets = None,
                               use_qk_l2norm_in_kernel: bool = False) -> SeqOut: ...
def chunk_gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array,
                           scale: Optional[float] = None, initial_state: Optional[Array] = None,
                           output_final_state: bool = False, cu_seqlens: Offsets = None,
                           use_qk_l2norm_in_kernel: bool = False) -> SeqOut: ...
def fused_recurrent_gated_delta_rule(q: Array, k: Array, v: Array, g: Optional[Array] = None,
                                     beta: Optional[Array] = None, scale: Optional[float] = None,
                                     initial_state: Optional[Array] = None,
                                     output_final_state: bool = False,
                                     cu_seqlens: Offsets = None,
                                     use_qk_l2norm_in_kernel: bool = False) -> SeqOut: ...
# Mamba2 SSD: x [B, T, H, P]; dt [B, T, H]; A [H] < 0; B, C [B, T, G, N]; states [., H, P, N]
def mamba_chunk_scan_combined(x: Array, dt: Array, A: Array, B: Array, C: Array,
                              chunk_size: int = 64, D: Optional[Array] = None,
                              z: Optional[Array] = None, dt_bias: Optional[Array] = None,
                              initial_states: Optional[Array] = None, seq_idx: None = None,
                              cu_seqlens: Offsets = None, dt_softplus: bool = False,
                              dt_limit: Tuple[float, float] = (0.0, float("inf")),
                              return_final_states: bool = False,
                              return_varlen_states: bool = False) -> Any: ...
def mamba_recurrent_scan(x: Array, dt: Array, A: Array, B: Array, C: Array,
                         chunk_size: int = 64, D: Optional[Array] = None,
                         z: Optional[Array] = None, dt_bias: Optional[Array] = None,
                         initial_states: Optional[Array] = None, seq_idx: None = None,
                         cu_seqlens: Offsets = None, dt_softplus: bool = False,
                         dt_limit: Tuple[float, float] = (0.0, float("inf")),
                         return_final_states: bool = False,
                         return_varlen_states: bool = False) -> Any: ...
# one-token steps: q, k [B, H, K]; v [B, HV, V]; state [B, HV, K, V] updated in place
def linear_attn_step(q: Array, k: Array, v: Array, state: Array, scale: Optional[float] = None,
                     out: Optional[Array] = None) -> Array: ...
def simple_gla_step(q: Array, k: Array, v: Array, g: Optional[Array], state: Array,
                    scale: Optional[float] = None, g_gamma: Optional[Array] = None,
                    out: Optional[Array] = None) -> Array: ...
def gla_step(q: Array, k: Array, v: Array, gk: Array, state: Array,
             scale: Optional[float] = None, gv: Optional[Array] = None,
             out: Optional[Array] = None) -> Array: ...
def delta_rule_step(q: Array, k: Array, v: Array, beta: Array, state: Array,
                    scale: Optional[float] = None, use_qk_l2norm_in_kernel: bool = False,
                    out: Optional[Array] = None) -> Array: ...
def gated_delta_rule_step(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                          scale: Optional[float] = None, use_qk_l2norm_in_kernel: bool = False,
                          out: Optional[Array] = None) -> Array: ...
def mamba2_step(x: Array, dt: Array, A: Array, B: Array, C: Array, state: Array,
                D: Optional[Array] = None, z: Optional[Array] = None,
                dt_bias: Optional[Array] = None, dt_softplus: bool = False,
                dt_limit: Tuple[float, float] = (0.0, float("inf")),
                out: Optional[Array] = None) -> Array:
    """x [B, H, P]; dt [B, H]; A [H]; B, C [B, G, N]; state [B, H, P, N] in place."""
    ...
def rwkv6_step(r: Array, k: Array, v: Array, w: Array, u: Array, state: Array,
               scale: Optional[float] = None, out: Optional[Array] = None) -> Array: ...
def rwkv7_step(r: Array, w: Array, k: Array, v: Array, a: Array, b: Array, state: Array,
               scale: float = 1.0, out: Optional[Array] = None) -> Array: ...
def kda_step(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
             scale: Optional[float] = None, use_qk_l2norm_in_kernel: bool = False,
             out: Optional[Array] = None) -> Array: ...
# softmax attention: q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]
def parallel_attn(q: Array, k: Array, v: Array, scale: Optional[float] = None,
                  window_size: Optional[int] = None, cu_seqlens: Offsets = None,
                  sink: Optional[Array] = None) -> Array: ...

class KVCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, value_dim: Optional[int] = None,
                 capacity: int = ..., window_size: Optional[int] = None, dtype: str = "float32",
                 scale: Optional[float] = None, sink: Optional[Array] = None) -> None: ...
    def prefill(self, q: Array, k: Array, v: Array, cu_seqlens: Offsets = None) -> Array: ...
    def step(self, q: Array, k: Array, v: Array, out: Optional[Array] = None) -> Array: ...
    def reset(self, b: Optional[int] = None) -> None: ...
    def truncate(self, b: int, n: int) -> None: ...
    @property
    def lengths(self) -> List[int]: ...
    @property
    def capacity(self) -> int: ...
    @property
    def is_ring(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> str: ...

class MoE:
    def __init__(self, router_weight: Array, gate_up_proj: Array, down_proj: Array, *,
                 top_k: int = 2, router: str = "softmax_topk", norm_topk_prob: bool = False,
                 n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                 e_score_correction_bias: Optional[Array] = None,
                 shared_gate_proj: Optional[Array] = None, shared_up_proj: Optional[Array] = None,
                 shared_down_proj: Optional[Array] = None,
                 shared_expert_gate: Optional[Array] = None, activation: str = "silu",
                 gated: bool = True, capacity_factor: float = 0.0, drop: str = "by_score",
                 compute_losses: bool = True, pack_experts: bool = True) -> None: ...
    def forward(self, x: Array, form: str = "auto", return_router: bool = False) -> Any: ...
    def __call__(self, x: Array) -> Array: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def model_dim(self) -> int: ...
    @property
    def expert_dim(self) -> int: ...

# second-wave mixers (present when the extension was built with them)
def chunk_rwkv6(r: Array, k: Array, v: Array, w: Array, u: Array, scale: Optional[float] = None,
                initial_state: Optional[Array] = None, output_final_state: bool = False,
                cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_rwkv6(r: Array, k: Array, v: Array, w: Array, u: Array,
                          scale: Optional[float] = None, initial_state: Optional[Array] = None,
                          output_final_state: bool = False, cu_seqlens: Offsets = None) -> SeqOut: ...
def chunk_rwkv7(r: Array, w: Array, k: Array, v: Array, a: Array, b: Array, scale: float = 1.0,
                initial_state: Optional[Array] = None, output_final_state: bool = True,
                cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_rwkv7(r: Array, w: Array, k: Array, v: Array, a: Array, b: Array,
                          scale: float = 1.0, initial_state: Optional[Array] = None,
                          output_final_state: bool = True, cu_seqlens: Offsets = None) -> SeqOut: ...
def chunk_kda(q: Array, k: Array, v: Array, g: Array, beta: Array, scale: Optional[float] = None,
              initial_state: Optional[Array] = None, output_final_state: bool = False,
              use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Offsets = None) -> SeqOut: ...
def fused_recurrent_kda(q: Array, k: Array, v: Array, g: Array, beta: Array,
                        scale: Optional[float] = None, initial_state: Optional[Array] = None,
                        output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                        cu_seqlens: Offsets = None) -> SeqOut: ...

# third wave: sparse attention and models (present when the extension was built with them)
# NSA: q [B, T, HQ, K]; k [B, T, H, K]; v [B, T, H, V]; gates [B, T, HQ]; block_indices int64
# [B, T, H, S]. Returns o [B, T, HQ, V]; (o, block_indices) with return_block_indices;
# (o, {o_cmp, o_slc, o_swa?, lse_cmp, k_cmp, v_cmp, block_indices}) with return_extras.
def parallel_nsa(q: Array, k: Array, v: Array, g_cmp: Array, g_slc: Array,
                 g_swa: Optional[Array] = None, block_indices: Optional[Array] = None,
                 block_counts: int = 16, block_size: int = 64, window_size: int = 0,
                 scale: Optional[float] = None, cu_seqlens: Offsets = None,
                 return_block_indices: bool = False, return_extras: bool = False) -> Any: ...
# MoBA: packed q [N, HQ, K], k [N, H, K], v [N, H, V] with cu_seqlens -> o [N, HQ, V];
# or q [B, T, HQ, K], k, v [B, T, H, *] -> o [B, T, HQ, V].
def moba_attn(q: Array, k: Array, v: Array, cu_seqlens: Offsets = None, chunk_size: int = 64,
              top_k: int = 8, scale: Optional[float] = None) -> Array: ...

Ids = Union[Array, Sequence[int], int]  # int64 token ids

class ModelSnapshot: ...

class Model:
    def prefill(self, ids: Ids, cu_seqlens: Offsets = None, logits: str = "all") -> Array: ...
    def decode(self, ids: Ids) -> Array: ...
    def generate(self, prompt_ids: Ids, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0,
                 eos_token_id: Optional[int] = None) -> Array: ...
    def reset(self) -> None: ...
    def snapshot(self) -> ModelSnapshot: ...
    def restore(self, snapshot: ModelSnapshot) -> None: ...
    @property
    def vocab(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def lengths(self) -> List[int]: ...
    @property
    def unused_tensors(self) -> List[str]: ...

def load_model(dir: str, capacity: int = 4096) -> Model: ...
