// Shared by the native CPU kernels (built by native.py, which hashes this header with each source).
//
//   v16f, load16, store16, splat  16 float lanes (GCC / Clang vector extensions: one AVX-512 register here, a pair
//                                 of AVX2 ones or four NEON ones elsewhere)
//   sum_lanes16(x)                lane c: the sum of x[c]'s 16 lanes, for 16 vectors at once (a shuffle tree; a
//                                 vector's own lanes are added in the same order in whichever slot it sits)
//   bf16_to_f32                   one bfloat16 as float32
//   parallel_for(pool, n, fn)     fn(i) for i in [0, n) on the calling thread and XLA's intra-op pool

#ifndef JAXLLM_NATIVE_CPU_H_
#define JAXLLM_NATIVE_CPU_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // unaligned loads / stores

inline v16f load16(const float* p) { return *reinterpret_cast<const v16f_u*>(p); }
inline void store16(float* p, v16f x) { *reinterpret_cast<v16f_u*>(p) = x; }
inline v16f splat(float x) { return v16f{} + x; }

#if defined(__clang__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, v16i{__VA_ARGS__})
#endif

// Adds lane halves of a and b: the first 8 lanes hold a's pairwise sums, the last 8 b's (one level of a tree).
inline v16f fold8(v16f a, v16f b) {
  return SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline v16f fold4(v16f a, v16f b) {
  return SHUFFLE2(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         SHUFFLE2(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline v16f fold2(v16f a, v16f b) {
  return SHUFFLE2(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         SHUFFLE2(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
inline v16f fold1(v16f a, v16f b) {
  return SHUFFLE2(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE2(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane c of the result is the sum of x[c]'s 16 lanes: 16 dot products finished in 15 shuffle-and-add steps.
inline v16f sum_lanes16(const v16f* x) {
  v16f a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) a[i] = fold8(x[2 * i], x[2 * i + 1]);
  for (int i = 0; i < 4; ++i) b[i] = fold4(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 2; ++i) c[i] = fold2(b[2 * i], b[2 * i + 1]);
  return fold1(c[0], c[1]);
}

inline float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fn(i) for every i in [0, n), items taken from a shared counter by the caller and num_threads - 1 tasks on XLA's
// intra-op pool (one per core: a task more made the cores take turns), returning when all are done. The counter's
// state outlives the call (a task may start after every item is done, and then claims none); fn runs only on items
// claimed before the return.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
  };
  auto state = std::make_shared<State>();
  auto work = [n, &fn](State& s) {
    int64_t mine = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < n;) {
      fn(i);
      ++mine;
    }
    if (mine) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.done += mine;
      if (s.done == n) s.cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

}  // namespace jaxllm

#endif  // JAXLLM_NATIVE_CPU_H_
