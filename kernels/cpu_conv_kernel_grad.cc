// Kernel (weight) gradient of a 2-D NHWC convolution on the CPU, as an XLA FFI handler.
//
//   dw[i, j, ci, co] = sum_{n, h, w} x[n, h*sh + i - pt, w*sw + j - pl, ci] * g[n, h, w, co]
//
// XLA:CPU computes this as a convolution with batch and feature swapped (transposes of x
// and g) or, in shiftjax.conv's XLA path, as matrix products of gathered taps (copies).
// Here x and g are read in place: a register tile of accumulators, rows of ci by vectors
// of co, takes one vector of g and one broadcast x per row at each output position. Out of
// range taps (padding) are skipped, never materialized. Built by shiftjax.kernels.native
// for the machine it runs on (-march=native); float32 only, co a multiple of 16.
#include <algorithm>
#include <array>
#include <utility>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pl;
};

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output positions o with 0 <= o*s + tap - pad < size, as [lo, hi).
void ValidRange(int64_t tap, int64_t pad, int64_t s, int64_t size, int64_t out,
                int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(0, FloorDiv(pad - tap + s - 1, s));
  *hi = std::min<int64_t>(out, FloorDiv(size - 1 - tap + pad, s) + 1);
}

// acc[R rows of ci][C vectors of co] += x[.., ci] * g[.., co] over one image's positions.
template <int R, int C>
void Tile(const Geometry& d, const float* x, const float* g, int64_t i, int64_t j,
          int64_t c0, int64_t o0, float* dw) {
  int64_t h_lo, h_hi, w_lo, w_hi;
  ValidRange(i, d.pt, d.sh, d.h, d.ho, &h_lo, &h_hi);
  ValidRange(j, d.pl, d.sw, d.w, d.wo, &w_lo, &w_hi);
  float* out = dw + ((i * d.kw + j) * d.ci + c0) * d.co + o0;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      __builtin_memcpy(&acc[r][c], out + r * d.co + c * kLanes, sizeof(Vec));
  for (int64_t hh = h_lo; hh < h_hi; ++hh) {
    const float* xrow = x + ((hh * d.sh + i - d.pt) * d.w) * d.ci + c0;
    const float* grow = g + (hh * d.wo) * d.co + o0;
    for (int64_t ww = w_lo; ww < w_hi; ++ww) {
      const float* xp = xrow + (ww * d.sw + j - d.pl) * d.ci;
      const float* gp = grow + ww * d.co;
      Vec gv[C];
      for (int c = 0; c < C; ++c) __builtin_memcpy(&gv[c], gp + c * kLanes, sizeof(Vec));
      for (int r = 0; r < R; ++r) {
        const float xv = xp[r];
        for (int c = 0; c < C; ++c) acc[r][c] += xv * gv[c];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      __builtin_memcpy(out + r * d.co + c * kLanes, &acc[r][c], sizeof(Vec));
}

using TileFn = void (*)(const Geometry&, const float*, const float*, int64_t, int64_t,
                        int64_t, int64_t, float*);

template <int C, int... R>
constexpr std::array<TileFn, sizeof...(R)> TilesOf(std::integer_sequence<int, R...>) {
  return {&Tile<R + 1, C>...};
}
constexpr int kMaxRows1 = kAccumulators;
constexpr int kMaxRows2 = kAccumulators / 2;
const auto kTiles1 = TilesOf<1>(std::make_integer_sequence<int, kMaxRows1>());
const auto kTiles2 = TilesOf<2>(std::make_integer_sequence<int, kMaxRows2>());

// One image's contribution, added to dw [kh, kw, ci, co].
void Image(const Geometry& d, const float* x, const float* g, float* dw) {
  const bool pair = (d.co / kLanes) % 2 == 0;
  const int cols = pair ? 2 : 1;
  const int max_rows = pair ? kMaxRows2 : kMaxRows1;
  // Equal row blocks: ceil(ci / max_rows) blocks of about the same size.
  const int64_t blocks = (d.ci + max_rows - 1) / max_rows;
  for (int64_t i = 0; i < d.kh; ++i)
    for (int64_t j = 0; j < d.kw; ++j)
      for (int64_t o0 = 0; o0 < d.co; o0 += cols * kLanes)
        for (int64_t b = 0, c0 = 0; b < blocks; ++b) {
          const int64_t rows = (d.ci - c0) / (blocks - b);
          const TileFn tile = pair ? kTiles2[rows - 1] : kTiles1[rows - 1];
          tile(d, x, g, i, j, c0, o0, dw);
          c0 += rows;
        }
}

// Images split into `parts` fixed ranges, each summed into its own buffer and the buffers
// added in order: the result does not depend on which thread ran which part.
struct Work {
  Geometry d;
  const float* x;
  const float* g;
  int64_t parts;
  std::vector<std::vector<float>> sums;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  bool closed = false;

  void Run() {
    const int64_t image_x = d.h * d.w * d.ci, image_g = d.ho * d.wo * d.co;
    for (int64_t p; (p = next.fetch_add(1)) < parts;) {
      std::vector<float>& dw = sums[p];
      for (int64_t n = p * d.n / parts; n < (p + 1) * d.n / parts; ++n)
        Image(d, x + n * image_x, g + n * image_g, dw.data());
    }
  }
};

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> g, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pl, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions(), kd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || gd[0] != xd[0] ||
      kd[2] != xd[3] || kd[3] != gd[3] || gd[3] % kLanes != 0)
    return ffi::Error::InvalidArgument("conv_kernel_grad: inconsistent shapes");
  auto work = std::make_shared<Work>();
  work->d = {xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1], sh, sw, pt, pl};
  work->x = x.typed_data();
  work->g = g.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->parts = std::min<int64_t>(threads, xd[0]);
  work->sums.assign(work->parts, std::vector<float>(dw->element_count(), 0.0f));
  for (int64_t t = 1; t < work->parts; ++t) {
    pool.Schedule([work] {
      {
        std::lock_guard<std::mutex> lock(work->mu);
        if (work->closed) return;
        ++work->active;
      }
      work->Run();
      std::lock_guard<std::mutex> lock(work->mu);
      if (--work->active == 0) work->cv.notify_all();
    });
  }
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->closed = true;
    work->cv.wait(lock, [&] { return work->active == 0; });
  }
  float* out = dw->typed_data();
  std::copy(work->sums[0].begin(), work->sums[0].end(), out);
  for (int64_t p = 1; p < work->parts; ++p)
    for (size_t k = 0; k < work->sums[p].size(); ++k) out[k] += work->sums[p][k];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShiftjaxConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Ret<ffi::Buffer<ffi::F32>>());
