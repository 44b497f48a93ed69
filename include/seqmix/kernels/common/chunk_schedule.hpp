// SPDX-License-Identifier: MIT
// The chunk scheduler shared by the chunked forms of the engines (kernels/gated_accumulation,
// kernels/delta_rule). It knows nothing of the math: it hands (item, chunk) pairs to the
// engine's callbacks in an order that keeps every result bitwise independent of the thread
// count.
//
// Vocabulary. An item is one (sequence, head) pair, numbered 0..items-1 by the engine (the
// engines use item = n·H + h). An item covers the tokens [t0, t1) of its sequence (a
// token_range, from the engine's `segment_of(item)`), cut into chunks of C tokens aligned at t0:
// chunk c is [t0 + c·C, min(t1, t0 + (c+1)·C)), so only the last chunk may be short. Direction
// forward visits chunks 0, 1, ...; reverse visits the same chunks last to first (backward
// passes carry their state from the end), so both directions see identical chunk boundaries.
//
// Two schedules, chosen by use_windows():
// - items (at least as many items as threads): item_ranges() splits the items into contiguous
//   ranges, one per thread; for_chunks_interleaved() runs one range, chunk rank by chunk rank,
//   every item of the range in turn (the heads of a token share the pages of the [T, H, D]
//   layout, so a chunk of rows read for one head is still in cache for the next). The engine's
//   per-chunk callback does local phase, inter term and state update at once.
// - windows (fewer items than threads, e.g. B = 1 with few heads): the chunks of an item are
//   taken in windows of `wc` chunks (window_chunks(): about 4 chunks per thread per step); each
//   window is three parallel steps: (1) local(job, item, chunk, slot) for every job = (item,
//   chunk of the window), the part of a chunk that does not read the state; (2) per item, in
//   parallel over items, scan(job, item, chunk) over the window's chunks in order, the only
//   sequential part (the state recurrence across chunks); (3) inter(job, item, chunk, slot),
//   the part that reads the state entering the chunk. Job j of a window is item j / wc and
//   chunk rank first + j % wc: the engine keeps one carry per job (jobs = items·wc) between the
//   steps, and one scratch per slot (core/parallel.hpp's max_slots()).
// An engine that runs the same per-chunk code under both schedules gets bitwise equal results
// for every thread count: the schedules differ only in which thread runs a chunk and when.
//
// Cost: the scheduler itself is O(items + chunks) index arithmetic per call and allocates
// nothing; the windowed schedule starts 3 parallel regions per window.
#pragma once

#include <algorithm>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::kernels::common {

/// Order in which an item's chunks are visited.
enum class chunk_order { forward, reverse };

/// Tokens [t0, t1) (an item's segment or one chunk of it).
struct token_range {
  index_t t0 = 0, t1 = 0;
  index_t size() const { return t1 - t0; }
};

/// Chunks of C tokens in a segment of `len` tokens.
inline index_t chunk_count(index_t len, index_t C) {
  return len <= 0 ? 0 : (len + C - 1) / C;
}

/// The chunk of rank `rank` (0 = first visited) of segment `sg` in order `dir`, or an empty
/// range {t1, t1} when the segment has fewer chunks.
inline token_range nth_chunk(const token_range& sg, index_t C, chunk_order dir, index_t rank) {
  const index_t n = chunk_count(sg.size(), C);
  if (rank < 0 || rank >= n) return {sg.t1, sg.t1};
  const index_t c = dir == chunk_order::forward ? rank : n - 1 - rank;
  const index_t t0 = sg.t0 + c * C;
  return {t0, std::min(sg.t1, t0 + C)};
}

/// The g-th of `groups` contiguous item ranges (static, like parallel_for's own partition).
inline token_range item_range(index_t items, index_t groups, index_t g) {
  return {g * items / groups, (g + 1) * items / groups};
}

/// Runs body(i0, i1) for min(items, threads) contiguous item ranges, on the calling thread when
/// there is only one range (no parallel region: it costs microseconds), else one per thread.
template <class Body>
void for_item_ranges(index_t items, int threads, Body&& body) {
  const index_t groups = std::min<index_t>(items, std::max(1, threads));
  if (groups <= 1) {
    if (items > 0) body(index_t(0), items);
    return;
  }
  parallel_for(groups, [&](index_t g) {
    const token_range r = item_range(items, groups, g);
    body(r.t0, r.t1);
  });
}

/// The items schedule on one thread: for chunk rank 0, 1, ..., every item of [i0, i1) that has
/// a chunk of that rank in turn: fn(item, chunk). `segment(item)` gives the item's tokens.
template <class Segment, class Fn>
void for_chunks_interleaved(index_t i0, index_t i1, index_t C, chunk_order dir, Segment&& segment,
                            Fn&& fn) {
  for (index_t rank = 0;; ++rank) {
    bool any = false;
    for (index_t i = i0; i < i1; ++i) {
      const token_range c = nth_chunk(segment(i), C, dir, rank);
      if (c.size() <= 0) continue;
      any = true;
      fn(i, c);
    }
    if (!any) break;
  }
}

/// Whether the windowed schedule should run: fewer items than threads, and more chunks in all
/// (`total_chunks`, an estimate is fine: the choice never changes results) than items.
inline bool use_windows(index_t items, index_t total_chunks, int threads) {
  return items < threads && total_chunks > items;
}

/// Chunks per item in one window: about 4 chunks per thread per parallel step, so each step
/// outweighs its start-up cost.
inline index_t window_chunks(index_t items, int threads) {
  return std::max<index_t>(1, (4 * index_t(threads) + items - 1) / std::max<index_t>(1, items));
}

/// The windowed schedule (see the header comment). jobs = items·wc carries are the engine's;
/// local(job, item, chunk, slot), scan(job, item, chunk), inter(job, item, chunk, slot). Jobs
/// whose item has no chunk of that rank are skipped.
template <class Segment, class Local, class Scan, class Inter>
void run_windows(index_t items, index_t C, chunk_order dir, index_t wc, Segment&& segment,
                 Local&& local, Scan&& scan, Inter&& inter) {
  const index_t jobs = items * wc;
  for (index_t first = 0;; first += wc) {
    bool any = false;
    for (index_t i = 0; i < items && !any; ++i) {
      any = nth_chunk(segment(i), C, dir, first).size() > 0;
    }
    if (!any) break;
    auto chunk_of = [&](index_t job) {
      return nth_chunk(segment(job / wc), C, dir, first + job % wc);
    };
    parallel_for_with_slot(jobs, [&](index_t job, int slot) {
      const token_range c = chunk_of(job);
      if (c.size() > 0) local(job, job / wc, c, slot);
    });
    parallel_for(items, [&](index_t i) {
      for (index_t j = i * wc; j < (i + 1) * wc; ++j) {
        const token_range c = chunk_of(j);
        if (c.size() <= 0) break;  // ranks grow with j: no later chunk either
        scan(j, i, c);
      }
    });
    parallel_for_with_slot(jobs, [&](index_t job, int slot) {
      const token_range c = chunk_of(job);
      if (c.size() > 0) inter(job, job / wc, c, slot);
    });
  }
}

}  // namespace seqmix::kernels::common
