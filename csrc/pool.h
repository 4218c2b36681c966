// Run one worker function on `threads` threads (or inline for one); the workers share their
// work through the state they are given (an atomic chunk counter), as quant_stats and fuse do.
#pragma once

#include <thread>
#include <vector>

namespace qtools {

template <class State, class Fn>
void run_workers(int threads, State& state, Fn fn) {
  if (threads <= 1) {
    fn(state);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) pool.emplace_back([&state, fn] { fn(state); });
  for (auto& t : pool) t.join();
}

}  // namespace qtools
