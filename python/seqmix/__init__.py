# SPDX-License-Identifier: MIT
"""seqmix: exact, fast sequence-mixing kernels for CPUs, in flash-linear-attention's conventions.

Activations are ``[B, T, H, D]`` (fla's ``head_first=False``), recurrent states ``[N, H, K, V]``.
Every function takes NumPy arrays or PyTorch CPU tensors (float32 or float64, one dtype per
call), uses them without copying when their last dimension is contiguous, releases the GIL
while the kernel runs, and returns the same kind of container as its first tensor argument.

Families (``chunk_*`` = chunked-parallel form, ``fused_recurrent_*`` = token loop; both return
``(o, final_state)``):

- linear attention: ``chunk_linear_attn``, ``fused_recurrent_linear_attn``, ``linear_attn_step``
- simple GLA / retention / Lightning: ``chunk_simple_gla``, ``fused_recurrent_simple_gla``,
  ``chunk_retention``, ``fused_recurrent_retention``, ``chunk_lightning_attn``,
  ``fused_recurrent_lightning_attn``, ``simple_gla_step``
- GLA: ``chunk_gla``, ``fused_recurrent_gla``, ``gla_step``
- Mamba2 SSD: ``mamba_chunk_scan_combined``, ``mamba_recurrent_scan``, ``mamba2_step``
- DeltaNet / Gated DeltaNet: ``chunk_delta_rule``, ``fused_recurrent_delta_rule``,
  ``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``, ``delta_rule_step``,
  ``gated_delta_rule_step``
- RWKV-6 / RWKV-7 / KDA: ``chunk_rwkv6``, ``fused_recurrent_rwkv6``, ``rwkv6_step``,
  ``chunk_rwkv7``, ``fused_recurrent_rwkv7``, ``rwkv7_step``, ``chunk_kda``,
  ``fused_recurrent_kda``, ``kda_step``
- softmax attention: ``parallel_attn`` (causal, GQA, window, sinks) and ``KVCache`` (decode)
- MoE block: ``MoE``
- sparse attention: ``parallel_nsa`` (NSA, fla's names), ``moba_attn`` (MoBA)
- models: ``load_model(dir)`` -> ``Model`` (``prefill``, ``decode``, ``generate``, ``reset``,
  ``snapshot``, ``restore``)

``set_num_threads`` / ``get_num_threads`` control the kernels' OpenMP threads (results are
bitwise independent of the count). ``load_safetensors`` reads a safetensors file into NumPy.
"""

from ._seqmix import (  # noqa: F401
    KVCache,
    MoE,
    __version__,
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_lightning_attn,
    chunk_linear_attn,
    chunk_retention,
    chunk_simple_gla,
    delta_rule_step,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_lightning_attn,
    fused_recurrent_linear_attn,
    fused_recurrent_retention,
    fused_recurrent_simple_gla,
    gated_delta_rule_step,
    get_num_threads,
    gla_step,
    has_openmp,
    linear_attn_step,
    mamba_chunk_scan_combined,
    mamba_recurrent_scan,
    parallel_attn,
    set_num_threads,
    simd_arch,
    simple_gla_step,
)
from ._seqmix import (  # noqa: F401  (benchmark and test helpers)
    _cpp_chunk_simple_gla_loop,
    _cpp_simple_gla_step_loop,
    _set_output_poison,
    _set_torch_fast_path,
    _view_address,
)
from ._safetensors import load_safetensors  # noqa: F401

# Mixers added later register here: each name the extension exports beyond the list above
# (e.g. chunk_rwkv6) is re-exported as is.
from . import _seqmix as _ext

for _name in dir(_ext):
    if not _name.startswith("_") and _name not in globals():
        globals()[_name] = getattr(_ext, _name)
del _name, _ext
