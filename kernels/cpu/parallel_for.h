// ParallelFor: the scheduler the native CPU kernels share (included by each source, which
// is its own translation unit and shared library).
#ifndef SHIFTJAX_KERNELS_CPU_PARALLEL_FOR_H_
#define SHIFTJAX_KERNELS_CPU_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace shiftjax_cpu {

// Runs task(0) ... task(count - 1) on the calling thread and the XLA intra-op pool.
// Tasks are claimed one by one; the call returns when all have finished. The state is
// shared with the scheduled helpers, which may start after the caller has finished all
// tasks (the pool was busy): they then find nothing to do and touch nothing else.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> task) {
  struct State {
    std::function<void(int64_t)> task;
    int64_t count;
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int active = 0;
    bool closed = false;
    void Run() {
      for (int64_t t; (t = next.fetch_add(1)) < count;) task(t);
    }
  };
  auto state = std::make_shared<State>();
  state->task = std::move(task);
  state->count = count;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state] {
      {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->closed) return;
        ++state->active;
      }
      state->Run();
      std::lock_guard<std::mutex> lock(state->mu);
      if (--state->active == 0) state->cv.notify_all();
    });
  }
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->closed = true;
  state->cv.wait(lock, [&] { return state->active == 0; });
}

}  // namespace shiftjax_cpu

#endif  // SHIFTJAX_KERNELS_CPU_PARALLEL_FOR_H_
