// A small std::thread parallel-for (no OpenMP: torch ships its own libgomp, and two OpenMP
// runtimes in one process do not mix).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace ectfast {

//! Worker count for a request: n <= 0 means std::thread::hardware_concurrency() (at least 1).
inline int resolve_threads(int n) {
  if (n > 0) return n;
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

//! Calls fn(begin, end) on contiguous, disjoint sub-ranges covering [0, n_items), on at most
//! `threads` threads (the calling thread is one of them), giving each at least `min_grain`
//! items. The first exception thrown by a worker is rethrown after all have joined.
template <class Fn>
void parallel_for(int64_t n_items, int threads, int64_t min_grain, Fn&& fn) {
  if (n_items <= 0) return;
  min_grain = std::max<int64_t>(1, min_grain);
  int64_t workers = std::min<int64_t>(std::max(1, threads), (n_items + min_grain - 1) / min_grain);
  workers = std::max<int64_t>(1, workers);
  if (workers == 1) {
    fn(int64_t(0), n_items);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
  auto run = [&](int64_t t) {
    const int64_t begin = n_items * t / workers;
    const int64_t end = n_items * (t + 1) / workers;
    try {
      fn(begin, end);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace ectfast
