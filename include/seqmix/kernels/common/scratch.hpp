// SPDX-License-Identifier: MIT
// Per-call scratch of the chunked kernels from the workspace arena (core/workspace.hpp), so a
// steady-state loop of one shape allocates nothing after its first call.
//
// - take_zeroed(frame, n): n elements of T from the frame, zero-filled (the chunked kernels'
//   buffers used to be value-initialised std::vectors; zeroing keeps every result bitwise what
//   it was, at the cost of one fill per call as before). With a scratch_size in place of the
//   frame it only counts bytes, so presize() can size the arena once before a call takes.
// - take_per_slot<WS>(arena, frame, take): one scratch struct per thread slot, with its buffers,
//   for a parallel region: taken by the calling thread before the region (a worker only uses,
//   never takes, its slot's), the arena presized to the whole need first.
// - gemm_pack<T>(): this thread's packing buffer for linalg::gemm (which takes a std::vector&).
//   gemm resizes it to the product's need and only reads what it wrote in the same call, so one
//   vector per OS thread and scalar type serves every gemm that thread runs; it grows to the
//   largest product seen and never shrinks, so repeated shapes allocate nothing. Thread-local,
//   like thread_workspace(): a call in a parallel region gets its worker's own buffer.
#pragma once

#include <algorithm>
#include <cstddef>
#include <new>
#include <span>
#include <vector>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>

namespace seqmix::kernels::common {

/// Counts the bytes a sequence of workspace takes uses (each piece rounded up to the
/// workspace's 64-byte granule), for presize(): the scratch structs' take(f, ...) run with a
/// scratch_size in place of a frame count instead of taking.
struct scratch_size {
  std::size_t bytes = 0;
  template <class T>
  void add(index_t n) {
    const std::size_t a = workspace::alignment;
    bytes += (static_cast<std::size_t>(n) * sizeof(T) + a - 1) / a * a;
  }
};

/// n elements of T from `frame`, every one set to T(0).
template <class T>
std::span<T> take_zeroed(workspace::frame& frame, index_t n) {
  return frame.take<T>(n, T(0));
}
/// Sizing pass: counts n elements of T, takes nothing (an empty span).
template <class T>
std::span<T> take_zeroed(scratch_size& size, index_t n) {
  size.add<T>(n);
  return {};
}

/// Before a call takes `bytes` from `ws`: when nothing is taken from it and it is not already
/// one block of at least that size, makes it one block of `bytes` (workspace::reserve). The first
/// call of a shape then allocates once, exactly its need, instead of growing block by block and
/// merging (which holds the old blocks and the merged one at once); later calls allocate
/// nothing. A no-op while the arena is in use (a nested call: the arena grows as usual).
inline void presize(workspace& ws, std::size_t bytes) {
  if (ws.used() != 0 || bytes == 0) return;
  if (ws.block_count() == 1 && ws.capacity() >= bytes) return;
  ws.reserve(bytes);
}

/// One WS per thread slot (max_slots(), at least 1) from `frame`, each constructed and given its
/// buffers by take(ws, f), where f is the frame or, in the sizing pass, a scratch_size. `frame`
/// must be a fresh scope of `arena` (nothing taken from it yet: the arena is presized to the
/// whole need before the first take) and must outlive the parallel region that uses the slots.
template <class WS, class Take>
std::span<WS> take_per_slot(workspace& arena, workspace::frame& frame, const Take& take) {
  const index_t slots = std::max(1, max_slots());
  {
    scratch_size need, one;
    WS probe{};
    take(probe, one);
    need.add<WS>(slots);
    presize(arena, need.bytes + static_cast<std::size_t>(slots) * one.bytes);
  }
  std::span<WS> ws = frame.take<WS>(slots);
  for (WS& w : ws) {
    ::new (static_cast<void*>(&w)) WS{};
    take(w, frame);
  }
  return ws;
}

/// This thread's linalg::gemm packing buffer for scalar type T (see the file comment).
template <class T>
std::vector<T>& gemm_pack() {
  thread_local std::vector<T> pack;
  return pack;
}

}  // namespace seqmix::kernels::common
