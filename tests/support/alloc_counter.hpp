// SPDX-License-Identifier: MIT
// Counts heap allocations made through global operator new (tensor storage included), so tests
// can show that a recurrent step allocates nothing per token and that a chunked form's working
// memory grows as O(T·(K+V)). The counting operators live in alloc_counter.cpp, linked into
// every test executable.
#pragma once

#include <cstddef>

namespace seqmix::testing {

struct allocation_stats {
  std::size_t count = 0;       // allocations since reset
  std::size_t live_bytes = 0;  // bytes currently allocated (since reset)
  std::size_t peak_bytes = 0;  // max of live_bytes since reset
};

/// Resets the counters (live bytes start from 0 at the reset point).
void reset_allocation_stats();
/// Counters since the last reset.
allocation_stats current_allocation_stats();

/// RAII scope: resets on entry; stats() reads the counters.
class allocation_scope {
 public:
  allocation_scope() { reset_allocation_stats(); }
  allocation_stats stats() const { return current_allocation_stats(); }
};

}  // namespace seqmix::testing
