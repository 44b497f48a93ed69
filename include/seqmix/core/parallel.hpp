// SPDX-License-Identifier: MIT
// Threading: one parallel loop over an index space, OpenMP when available, serial otherwise.
//
// Partitioning is static and depends only on (n, thread count), and every index is processed
// by exactly one thread with no cross-index reduction, so results are bitwise identical for
// any thread count as long as the body writes disjoint outputs. Nested calls run serially
// inside the enclosing team (no nested parallelism; Eigen stays single-threaded inside).
#pragma once

#include <atomic>

#include <seqmix/core/error.hpp>

#if defined(_OPENMP)
#include <omp.h>
#define SEQMIX_HAS_OPENMP 1
#else
#define SEQMIX_HAS_OPENMP 0
#endif

namespace seqmix {

namespace detail {
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};  // 0: OpenMP's default (OMP_NUM_THREADS or all cores)
  return n;
}
}  // namespace detail

/// Sets the number of threads seqmix's kernels use (0 = OpenMP's default). Without OpenMP,
/// every kernel is serial and this only records the value.
inline void set_num_threads(int n) {
  if (n < 0) throw shape_error("seqmix::set_num_threads: argument 'n': must be >= 0");
  detail::thread_setting().store(n);
}

/// Threads a parallel loop started now would use (1 without OpenMP or inside a parallel region).
inline int num_threads() {
#if SEQMIX_HAS_OPENMP
  if (omp_in_parallel()) return 1;
  const int n = detail::thread_setting().load();
  return n > 0 ? n : omp_get_max_threads();
#else
  return 1;
#endif
}

/// Calls body(i) for i in [0, n), split statically over `num_threads()` threads.
/// The body must not throw (validate before calling); results must not depend on which thread
/// runs an index.
template <class Body>
void parallel_for(index_t n, Body&& body) {
  if (n <= 0) return;
#if SEQMIX_HAS_OPENMP
  const int threads = num_threads();
  if (threads > 1 && n > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (index_t i = 0; i < n; ++i) body(i);
}

/// Like parallel_for, but each thread gets its own slot `tid` in [0, max_slots()) for scratch
/// buffers; the partition of indices is the same static one.
template <class Body>
void parallel_for_with_slot(index_t n, Body&& body) {
  if (n <= 0) return;
#if SEQMIX_HAS_OPENMP
  const int threads = num_threads();
  if (threads > 1 && n > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num();
#pragma omp for schedule(static)
      for (index_t i = 0; i < n; ++i) body(i, tid);
    }
    return;
  }
#endif
  for (index_t i = 0; i < n; ++i) body(i, 0);
}

/// Upper bound of `tid` passed by parallel_for_with_slot for a loop started now.
inline int max_slots() {
  return num_threads();
}

/// RAII: sets the thread count for a scope and restores the previous setting.
class scoped_num_threads {
 public:
  explicit scoped_num_threads(int n) : previous_(detail::thread_setting().load()) {
    set_num_threads(n);
  }
  ~scoped_num_threads() { detail::thread_setting().store(previous_); }
  scoped_num_threads(const scoped_num_threads&) = delete;
  scoped_num_threads& operator=(const scoped_num_threads&) = delete;

 private:
  int previous_;
};

}  // namespace seqmix
