// 2-D NHWC convolution and its kernel (weight) gradient on the CPU, as XLA FFI handlers.
//
//   conv:        y[n, h, w, co]    = sum_{i, j, ci} x[n, h*sh + i - pt, w*sw + j - pl, ci] * k[i, j, ci, co]
//   fused conv:  relu?(conv * scale[co] + bias[co] + residual[n, h, w, co])   (inference)
//   kernel grad: dk[i, j, ci, co] = sum_{n, h, w} x[n, h*sh + i - pt, w*sw + j - pl, ci] * g[n, h, w, co]
//
// Both read x in place: taps that fall in the padding are skipped (kernel gradient) or read
// from a zero row (conv), never materialized. XLA:CPU computes the kernel gradient as a
// convolution with batch and feature swapped (transposes of x and g);
// shiftjax.kernels.training.conv's XLA path as matrix products of gathered taps (copies).
// Each kernel is a register tile of accumulators, R rows by C vectors of co, updated with
// one vector load and R broadcasts per step. Built by shiftjax.kernels.training.native for
// the machine it runs on (-march=native):
// float32, co a multiple of 16 (the widest vector).
#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using shiftjax_cpu::ParallelFor;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16
#endif
// Naturally aligned: values of this type live in registers and on the stack, while Load and
// Store read and write memory of any alignment. Declared aligned(4), GCC 12 kept the
// accumulators in memory on AVX2 (Zen 2): the forward conv ran at 8-16 GFLOP/s instead of
// 60-72, four to eight times slower than with this type.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(Vec));
  return v;
}

void Store(float* p, const Vec& v) { __builtin_memcpy(p, &v, sizeof(Vec)); }

// x [n, h, w, ci] convolved to [n, ho, wo, co] with kernel taps kh x kw.
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

// The widest register tile for `vectors` vectors of co: (C, largest R).
std::pair<int, int> TileShape(int64_t vectors) {
  const int cols = vectors % 4 == 0 ? 4 : vectors % 2 == 0 ? 2 : 1;
  return {cols, kAccumulators / cols};
}


// Instantiations Fn<1, C> ... Fn<N, C> of a tile template, indexed by R - 1.
template <typename Fn, template <int, int> class Tile, int C, int... R>
constexpr std::array<Fn, sizeof...(R)> Tiles(std::integer_sequence<int, R...>) {
  return {&Tile<R + 1, C>::Run...};
}

template <typename Fn, template <int, int> class Tile>
Fn TileFor(int rows, int cols) {
  static const auto one = Tiles<Fn, Tile, 1>(std::make_integer_sequence<int, kAccumulators>());
  static const auto two = Tiles<Fn, Tile, 2>(std::make_integer_sequence<int, kAccumulators / 2>());
  static const auto four = Tiles<Fn, Tile, 4>(std::make_integer_sequence<int, kAccumulators / 4>());
  return cols == 4 ? four[rows - 1] : cols == 2 ? two[rows - 1] : one[rows - 1];
}

// Splits `total` into ceil(total / max_rows) nearly equal blocks: fn(start, rows).
template <typename F>
void Blocks(int64_t total, int max_rows, F fn) {
  const int64_t blocks = (total + max_rows - 1) / max_rows;
  for (int64_t b = 0, start = 0; b < blocks; ++b) {
    const int64_t rows = (total - start) / (blocks - b);
    fn(start, static_cast<int>(rows));
    start += rows;
  }
}

// ------------------------------------------------------------------------------- conv

// Zeros read by taps in the padding (ci <= kMaxZeroRow, checked by the handler).
constexpr int64_t kMaxZeroRow = 4096;
alignas(64) const float kZeroRow[kMaxZeroRow] = {};

// What the inference conv does to its sums before storing them, each part optional (null
// pointers, relu false: the plain conv). Applied to the register tile, so a packed layer's
// scale, bias, residual and relu cost no pass over memory of their own.
struct Epilogue {
  const float* scale = nullptr;     // [co]
  const float* bias = nullptr;      // [co]
  const float* residual = nullptr;  // this image's [ho, wo, co]
  bool relu = false;
};

// In the order of the XLA path (shiftjax.kernels.inference.conv): y * scale + bias, then
// + residual, then relu.
Vec Finish(Vec y, const Epilogue& e, int64_t position, int64_t co, int64_t o) {
  if (e.scale) y *= Load(e.scale + o);
  if (e.bias) y += Load(e.bias + o);
  if (e.residual) y += Load(e.residual + position * co + o);
  if (e.relu) {
    const Vec zero = {};
    y = y > zero ? y : zero;
  }
  return y;
}

// y[R consecutive output positions of one image, C vectors of co from o0].
template <int R, int C>
struct ConvTile {
  static void Run(const Geometry& d, const Epilogue& e, const float* x, const float* k,
                  int64_t p0, int64_t o0, float* y) {
    int64_t oh[R], ow[R];
    for (int r = 0; r < R; ++r) oh[r] = (p0 + r) / d.wo, ow[r] = (p0 + r) % d.wo;
    Vec acc[R][C] = {};
    for (int64_t i = 0; i < d.kh; ++i)
      for (int64_t j = 0; j < d.kw; ++j) {
        const float* xp[R];
        for (int r = 0; r < R; ++r) {
          const int64_t row = oh[r] * d.sh + i - d.pt, col = ow[r] * d.sw + j - d.pl;
          const bool inside = row >= 0 && row < d.h && col >= 0 && col < d.w;
          xp[r] = inside ? x + (row * d.w + col) * d.ci : kZeroRow;
        }
        const float* kp = k + (i * d.kw + j) * d.ci * d.co + o0;
        for (int64_t c = 0; c < d.ci; ++c) {
          Vec kv[C];
          for (int v = 0; v < C; ++v) kv[v] = Load(kp + c * d.co + v * kLanes);
          for (int r = 0; r < R; ++r) {
            const float xv = xp[r][c];
            for (int v = 0; v < C; ++v) acc[r][v] += xv * kv[v];
          }
        }
      }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < C; ++v) {
        const int64_t o = o0 + v * kLanes;
        Store(y + (p0 + r) * d.co + o, Finish(acc[r][v], e, p0 + r, d.co, o));
      }
  }
};
using ConvTileFn = void (*)(const Geometry&, const Epilogue&, const float*, const float*,
                            int64_t, int64_t, float*);

// Each row of a conv tile broadcasts from its own input pointer. With more rows than the
// general-purpose registers hold (16 on x86-64, less what the loop needs) the pointers
// spill and every broadcast costs a second load: 24 rows ran at half the speed of 8
// (32x32x16 convs, AVX-512), 12 rows were fastest for two vectors of co.
int ConvRows(int cols, int max_rows) { return std::min(max_rows, cols == 1 ? 8 : 12); }

void ConvImage(const Geometry& d, const Epilogue& e, const float* x, const float* k,
               float* y) {
  const auto [cols, accumulator_rows] = TileShape(d.co / kLanes);
  const int max_rows = ConvRows(cols, accumulator_rows);
  Blocks(d.ho * d.wo, max_rows, [&](int64_t p0, int rows) {
    const ConvTileFn tile = TileFor<ConvTileFn, ConvTile>(rows, cols);
    for (int64_t o0 = 0; o0 < d.co; o0 += cols * kLanes) tile(d, e, x, k, p0, o0, y);
  });
}

bool ConvShapesAgree(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k,
                     ffi::ResultBuffer<ffi::F32>& y) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  return xd.size() == 4 && kd.size() == 4 && yd.size() == 4 && yd[0] == xd[0] &&
         kd[2] == xd[3] && kd[3] == yd[3] && yd[3] % kLanes == 0 && xd[3] <= kMaxZeroRow;
}

ffi::Error RunConv(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                   const ffi::Buffer<ffi::F32>& k, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pl, Epilogue e, ffi::ResultBuffer<ffi::F32>& y) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  const Geometry d{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1],
                   sh, sw, pt, pl};
  const float *xs = x.typed_data(), *ks = k.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, d.n, [&d, &e, xs, ks, ys](int64_t n) {
    const int64_t out = n * d.ho * d.wo * d.co;
    Epilogue image = e;  // per task: the tasks run concurrently
    if (e.residual) image.residual = e.residual + out;
    ConvImage(d, image, xs + n * d.h * d.w * d.ci, ks, ys + out);
  });
  return ffi::Error::Success();
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                ffi::ResultBuffer<ffi::F32> y) {
  if (!ConvShapesAgree(x, k, y))
    return ffi::Error::InvalidArgument("shiftjax conv: inconsistent shapes");
  return RunConv(pool, x, k, sh, sw, pt, pl, Epilogue{}, y);
}

// The inference conv with its epilogue. scale, bias and residual are each either empty
// (not applied) or of their full shape ([co], [co], y's shape).
ffi::Error FusedConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                     ffi::Buffer<ffi::F32> residual, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pl, bool relu, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t co = y->dimensions().size() == 4 ? y->dimensions()[3] : -1;
  auto optional = [](const ffi::Buffer<ffi::F32>& b, int64_t size, bool* ok) {
    *ok = *ok && (b.element_count() == 0 || static_cast<int64_t>(b.element_count()) == size);
    return b.element_count() ? b.typed_data() : nullptr;
  };
  bool ok = ConvShapesAgree(x, k, y);
  Epilogue e;
  e.scale = optional(scale, co, &ok);
  e.bias = optional(bias, co, &ok);
  e.residual = optional(residual, static_cast<int64_t>(y->element_count()), &ok);
  e.relu = relu;
  if (!ok) return ffi::Error::InvalidArgument("shiftjax fused conv: inconsistent shapes");
  return RunConv(pool, x, k, sh, sw, pt, pl, e, y);
}

// ---------------------------------------------------------------------- kernel gradient

// dk[tap (i, j), R rows of ci from c0, C vectors of co from o0] += one image's products.
template <int R, int C>
struct KernelGradTile {
  static void Run(const Geometry& d, const float* x, const float* g, int64_t i, int64_t j,
                  int64_t c0, int64_t o0, float* dk) {
    int64_t h_lo, h_hi, w_lo, w_hi;
    ValidRange(i, d.pt, d.sh, d.h, d.ho, &h_lo, &h_hi);
    ValidRange(j, d.pl, d.sw, d.w, d.wo, &w_lo, &w_hi);
    float* out = dk + ((i * d.kw + j) * d.ci + c0) * d.co + o0;
    Vec acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < C; ++v) acc[r][v] = Load(out + r * d.co + v * kLanes);
    for (int64_t h = h_lo; h < h_hi; ++h) {
      const float* x_row = x + ((h * d.sh + i - d.pt) * d.w) * d.ci + c0;
      const float* g_row = g + (h * d.wo) * d.co + o0;
      for (int64_t w = w_lo; w < w_hi; ++w) {
        const float* xp = x_row + (w * d.sw + j - d.pl) * d.ci;
        Vec gv[C];
        for (int v = 0; v < C; ++v) gv[v] = Load(g_row + w * d.co + v * kLanes);
        for (int r = 0; r < R; ++r) {
          const float xv = xp[r];
          for (int v = 0; v < C; ++v) acc[r][v] += xv * gv[v];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < C; ++v) Store(out + r * d.co + v * kLanes, acc[r][v]);
  }
};
using KernelGradTileFn = void (*)(const Geometry&, const float*, const float*, int64_t,
                                  int64_t, int64_t, int64_t, float*);

void KernelGradImage(const Geometry& d, const float* x, const float* g, float* dk) {
  const auto [cols, max_rows] = TileShape(d.co / kLanes);
  for (int64_t i = 0; i < d.kh; ++i)
    for (int64_t j = 0; j < d.kw; ++j)
      Blocks(d.ci, max_rows, [&](int64_t c0, int rows) {
        const KernelGradTileFn tile = TileFor<KernelGradTileFn, KernelGradTile>(rows, cols);
        for (int64_t o0 = 0; o0 < d.co; o0 += cols * kLanes) tile(d, x, g, i, j, c0, o0, dk);
      });
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> g, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pl, ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || gd[0] != xd[0] ||
      kd[2] != xd[3] || kd[3] != gd[3] || gd[3] % kLanes != 0)
    return ffi::Error::InvalidArgument("shiftjax conv_kernel_grad: inconsistent shapes");
  const Geometry d{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1],
                   sh, sw, pt, pl};
  // The images split into `parts` fixed ranges, each summed into its own buffer, and the
  // buffers added in order: the result does not depend on which thread ran which part.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), d.n));
  std::vector<std::vector<float>> sums(parts, std::vector<float>(dk->element_count(), 0.0f));
  const float *xs = x.typed_data(), *gs = g.typed_data();
  ParallelFor(pool, parts, [&d, &sums, xs, gs, parts](int64_t p) {
    for (int64_t n = p * d.n / parts; n < (p + 1) * d.n / parts; ++n)
      KernelGradImage(d, xs + n * d.h * d.w * d.ci, gs + n * d.ho * d.wo * d.co,
                      sums[p].data());
  });
  float* out = dk->typed_data();
  std::copy(sums[0].begin(), sums[0].end(), out);
  for (int64_t p = 1; p < parts; ++p)
    for (size_t e = 0; e < sums[p].size(); ++e) out[e] += sums[p][e];
  return ffi::Error::Success();
}

}  // namespace

#define SHIFTJAX_CONV_BINDING                                                     \
  ffi::Ffi::Bind()                                                                \
      .Ctx<ffi::ThreadPool>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                               \
      .Attr<int64_t>("sh")                                                        \
      .Attr<int64_t>("sw")                                                        \
      .Attr<int64_t>("pt")                                                        \
      .Attr<int64_t>("pl")                                                        \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShiftjaxConv, Conv, SHIFTJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShiftjaxFusedConv, FusedConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual or empty
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<bool>("relu")
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShiftjaxConvKernelGrad, KernelGrad, SHIFTJAX_CONV_BINDING);
