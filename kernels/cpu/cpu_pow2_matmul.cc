// Matmul by packed zero-free power-of-two weights on the CPU, as an XLA FFI handler:
//
//   y[m, n] = (sum_k x[m, k] * W[k, n]) * scale[n] + bias[n]
//
// W[k, n] is a `bits`-bit code `sign << (bits - 1) | index` meaning
// (-1)^sign * 2^(e0 + index); a uint32 word holds the codes of rows k = w*P .. w*P + P - 1
// (P = 32 / bits) of one column, code j in bits [j*bits, (j+1)*bits). Two layouts of the
// words, told apart by packed's rank:
//   words  packed[w, n], [W, N] (the file's and the XLA and Pallas paths' layout);
//   tiled  packed[t, w, c], [T, W, TW]: column n = t*TW + c, each tile of TW columns one
//          contiguous block (kernels/cpu/layout.py converts once, at load). Then scale,
//          bias and y cover T*TW columns (N padded to whole tiles by the caller).
//
// The weights are decoded in registers, never written to memory as floats at small M:
//   AVX-512: a 16-entry (5 bits: 32-entry) table of the code values held in one (two)
//     registers, indexed with vpermps (vpermt2ps) by the word shifted right by j*bits.
//     vpermps reads only the low 4 bits of each lane, so no mask is needed: entry i of
//     the table is the value of code i mod 2^bits (the bits above a code belong to the
//     next one).
//   AVX2: the float's bits assembled as sign << 31 | (127 + e0 + index) << 23.
//   Scalar (no x86-64 vector unit): a table of the 2^bits values.
// The path is chosen at run time (the library is built with -march=native, but the
// AVX-512 functions carry their own target attribute, so it also builds for AVX2-only
// machines).
//
// Regimes (AVX-512):
//   M <= 16: one pass over the packed words with all M rows' accumulators in registers
//     (R rows x C vectors of 16 columns): a word vector is decoded once per code and
//     used by every row. At M = 1 each packed word is read once.
//   bfloat16 x, AVX512-BF16: the same tiles and panels with codes decoded two at a time
//     into bfloat16 pairs and multiplied by vdpbf16ps (two products per lane).
//   M > 16: a panel of kc x 64 weights is decoded once into an L2-resident float buffer,
//     then a 6 x 64 register-blocked float microkernel runs over all M rows.
// Threads: the XLA intra-op pool, over blocks of output columns (tiled: whole tiles).
//
// Summation order: every path sums each output's K products in order k = 0, 1, ...,
// K - 1 into one float32 accumulator (a product by a power of two is exact, so a fused
// multiply-add rounds exactly as a multiply then an add); then y * scale, then + bias,
// each rounded. All paths and thread counts give bit-identical results, except the
// bfloat16 pair path, which adds two products at a time.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SHIFTJAX_X86 1
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using shiftjax_cpu::ParallelFor;

namespace {


// One call's operands. xt is x transposed and zero-padded, xt[k * m + r] = x[r, k] for
// k < K, 0 for K <= k < words * P: the padding codes of the last word meet x == 0.
struct Problem {
  const float* xt;
  // The bfloat16 pair path's x instead of xt: xp[(w * P/2 + i) * m + r] holds x[r, k] for
  // k = w*P + i (low half) and k = w*P + P/2 + i (high half) as bfloat16.
  const uint32_t* xp;
  const uint32_t* packed;  // [words, n], or tiled [n / tile, words, tile]
  float* y;                // [m, n]
  int64_t m, n, words;
  int64_t tile;    // columns per tile; 0: the words layout
  int64_t stride;  // uint32 between two rows of words of a column: n, or tile
  int bits, e0;
};

// Word row 0 of column n0; row w is w * p.stride further. A run of columns read from one
// pointer must not cross a tile (in the tiled layout tasks are whole tiles, and every
// block a task reads, 16 to 128 columns, divides the tile).
inline const uint32_t* WordsAt(const Problem& p, int64_t n0) {
  if (p.tile == 0) return p.packed + n0;
  return p.packed + (n0 / p.tile) * p.words * p.tile + n0 % p.tile;
}

// The tiled layout's tile is a multiple of this many columns: every block a task reads
// (16-128 register-tile columns, 64 panel columns, 16 AVX2 columns) divides it.
constexpr int64_t kTileMultiple = 128;

// kAvx512Bf16: kAvx512, plus bfloat16 dot products (vdpbf16ps) for bfloat16 x.
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

// The float32 bit pattern of a code's value.
inline uint32_t CodeBits(uint32_t code, int bits, int e0) {
  const uint32_t sign = (code >> (bits - 1)) & 1;
  const uint32_t index = code & ((1u << (bits - 1)) - 1);
  return sign << 31 | (127 + e0 + index) << 23;
}

inline float CodeValue(uint32_t code, int bits, int e0) {
  const uint32_t pattern = CodeBits(code, bits, e0);
  float v;
  std::memcpy(&v, &pattern, sizeof v);
  return v;
}

// y[:, n0:n1] = y * scale + bias, the multiply and the add each rounded (as XLA's
// epilogue): GCC would otherwise contract them into one fused multiply-add.
__attribute__((optimize("fp-contract=off"))) void Epilogue(
    const Problem& p, const float* scale, const float* bias, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < p.m; ++r) {
    float* row = p.y + r * p.n;
    for (int64_t c = n0; c < n1; ++c) row[c] = row[c] * scale[c] + bias[c];
  }
}

// ------------------------------------------------------------------------------ scalar

constexpr int64_t kScalarBlock = 64;  // columns per task

template <int Bits>
void ScalarBlock(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int P = 32 / Bits;
  float table[1 << Bits];
  for (uint32_t c = 0; c < (1u << Bits); ++c) table[c] = CodeValue(c, Bits, p.e0);
  for (int64_t r = 0; r < p.m; ++r) {
    float* y = p.y + r * p.n;
    for (int64_t c = n0; c < n1; ++c) y[c] = 0.0f;
    for (int64_t w = 0; w < p.words; ++w) {
      const uint32_t* words = WordsAt(p, n0) + w * p.stride - n0;  // words[c], c in [n0, n1)
      for (int j = 0; j < P; ++j) {
        const float x = p.xt[(w * P + j) * p.m + r];
        for (int64_t c = n0; c < n1; ++c)
          y[c] += x * table[(words[c] >> (j * Bits)) & ((1u << Bits) - 1)];
      }
    }
  }
}

#if SHIFTJAX_X86

// ------------------------------------------------------------------------------- AVX2
// Decode by bit assembly: 6 integer operations per 8 weights. 16 columns (2 vectors) by
// up to 4 rows per register tile; the fallback for machines without AVX-512.

#define SHIFTJAX_AVX2 __attribute__((target("avx2,fma")))

constexpr int kAvx2Rows = 4;
constexpr int64_t kAvx2Block = 16;

template <int Bits, int J>
SHIFTJAX_AVX2 inline __m256 Avx2Decode(__m256i words, __m256i exponent_bias) {
  constexpr int kShift = J * Bits;  // the code's first bit
  constexpr int kIndexBits = Bits - 1;
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(words, 31 - kShift - kIndexBits),
                                        _mm256_set1_epi32(INT32_MIN));
  __m256i index = kShift <= 23 ? _mm256_slli_epi32(words, 23 - kShift)
                               : _mm256_srli_epi32(words, kShift - 23);
  index = _mm256_and_si256(index, _mm256_set1_epi32(((1 << kIndexBits) - 1) << 23));
  return _mm256_castsi256_ps(
      _mm256_or_si256(sign, _mm256_add_epi32(index, exponent_bias)));
}

template <int Bits, int R, int J>
SHIFTJAX_AVX2 inline void Avx2Step(const __m256i (&words)[2], const float* x, int64_t m,
                                   __m256i bias, __m256 (&acc)[R][2]) {
  if constexpr (J < 32 / Bits) {
    for (int c = 0; c < 2; ++c) {
      const __m256 wv = Avx2Decode<Bits, J>(words[c], bias);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + J * m + r), wv, acc[r][c]);
    }
    Avx2Step<Bits, R, J + 1>(words, x, m, bias, acc);
  }
}

template <int Bits, int R>
SHIFTJAX_AVX2 void Avx2Tile(const Problem& p, int64_t r0, int64_t n0) {
  constexpr int P = 32 / Bits;
  __m256i mask[2];
  for (int c = 0; c < 2; ++c) {
    const int64_t valid = std::clamp<int64_t>(p.n - n0 - 8 * c, 0, 8);
    mask[c] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  const __m256i bias = _mm256_set1_epi32((127 + p.e0) << 23);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t w = 0; w < p.words; ++w) {
    const uint32_t* row = WordsAt(p, n0) + w * p.stride;
    __m256i words[2];
    for (int c = 0; c < 2; ++c)
      words[c] = _mm256_maskload_epi32(reinterpret_cast<const int*>(row + 8 * c), mask[c]);
    Avx2Step<Bits, R, 0>(words, p.xt + w * P * p.m + r0, p.m, bias, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c)
      _mm256_maskstore_ps(p.y + (r0 + r) * p.n + n0 + 8 * c, mask[c], acc[r][c]);
}

template <int Bits>
SHIFTJAX_AVX2 void Avx2Block(const Problem& p, int64_t n0) {
  using Tile = void (*)(const Problem&, int64_t, int64_t);
  static constexpr Tile kTiles[] = {Avx2Tile<Bits, 1>, Avx2Tile<Bits, 2>, Avx2Tile<Bits, 3>,
                                    Avx2Tile<Bits, 4>};
  for (int64_t r0 = 0; r0 < p.m; r0 += kAvx2Rows)
    kTiles[std::min<int64_t>(kAvx2Rows, p.m - r0) - 1](p, r0, n0);
}

// ----------------------------------------------------------------------------- AVX-512

#define SHIFTJAX_AVX512 __attribute__((target("avx512f,fma")))

// The code values, entry i = value of code i mod 2^bits: lo holds entries 0..15, hi
// 16..31 (5-bit codes only).
struct Table {
  __m512 lo, hi;
};

SHIFTJAX_AVX512 inline Table MakeTable(int bits, int e0) {
  alignas(64) float values[32];
  for (uint32_t i = 0; i < 32; ++i) values[i] = CodeValue(i & ((1u << bits) - 1), bits, e0);
  return {_mm512_load_ps(values), _mm512_load_ps(values + 16)};
}

// Code j of each lane's word, as floats.
template <int Bits, int J>
SHIFTJAX_AVX512 inline __m512 Decode(__m512i words, const Table& t) {
  const __m512i index = J == 0 ? words : _mm512_srli_epi32(words, J * Bits);
  if constexpr (Bits == 5) return _mm512_permutex2var_ps(t.lo, index, t.hi);
  return _mm512_permutexvar_ps(index, t.lo);
}

// Masks of the 16-column vectors c = 0 .. C - 1 starting at column n0 (0 from column n).
template <int C>
SHIFTJAX_AVX512 inline void ColumnMasks(int64_t n, int64_t n0, __mmask16 (&mask)[C]) {
  for (int c = 0; c < C; ++c) {
    const int64_t valid = std::clamp<int64_t>(n - n0 - 16 * c, 0, 16);
    mask[c] = static_cast<__mmask16>((1u << valid) - 1);
  }
}

// Rows of packed words prefetched ahead of the one being used: the column block reads
// one short run of each row (C * 64 bytes, 32 KiB apart at N = 8192), a pattern the
// hardware prefetchers follow late. Not further: rows 4 KiB apart (times any power of
// two) share the L1 cache's sets, 8 ways on Zen 4: at 8 rows ahead the prefetched lines
// were evicted before use (M = 1, K = N = 8192, 4 bits: 3.5 ms against 2.4 ms at 4).
constexpr int64_t kPrefetchRows = 4;

// The small-M register tiles (M <= 16): rows r0 .. r0 + R - 1, columns n0 .. n0 + 16 C - 1,
// all of K. The float32 path's step: code J of each word, times x, into the accumulators.
template <int Bits, int R, int C, int J>
SHIFTJAX_AVX512 inline void DirectStep(const __m512i (&words)[C], const float* x, int64_t m,
                                       const Table& t, __m512 (&acc)[R][C]) {
  if constexpr (J < 32 / Bits) {
    for (int c = 0; c < C; ++c) {
      const __m512 wv = Decode<Bits, J>(words[c], t);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(x[J * m + r]), wv, acc[r][c]);
    }
    DirectStep<Bits, R, C, J + 1>(words, x, m, t, acc);
  }
}

// The bfloat16 pair path (bfloat16 x): vdpbf16ps multiplies two bfloat16 pairs
// per float32 lane and adds both products to the lane, so one instruction does the work
// of two fused multiply-adds, and one vpermw decodes 32 codes (16-bit lanes). A lane's
// pair is codes i and P/2 + i of its word: the word shifted right by i * bits puts code i
// in the low 16 bits and code P/2 + i in the high 16 bits (for 3 and 5 bits once the
// upper codes are moved up one bit), and vpermw reads the low 5 bits of each half. The
// products are exact (a bfloat16 times a power of two); the sums run in pairs, so this
// path agrees with the others to float32 rounding, not bit for bit.
#define SHIFTJAX_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,fma")))

// The bfloat16 values of the codes, entry e = code e mod 2^bits (32 entries of 16 bits).
SHIFTJAX_AVX512BF16 inline __m512i PairTable(int bits, int e0) {
  alignas(64) uint16_t values[32];
  for (uint32_t e = 0; e < 32; ++e)
    values[e] = static_cast<uint16_t>(CodeBits(e & ((1u << bits) - 1), bits, e0) >> 16);
  return _mm512_load_si512(values);
}

// Codes P/2 .. P-1 of each word moved to start at bit 16 (3 and 5 bits: from bit 15).
template <int Bits>
SHIFTJAX_AVX512BF16 inline __m512i PairWords(__m512i words) {
  constexpr int kLowBits = 32 / Bits / 2 * Bits;
  if constexpr (kLowBits == 16) return words;
  const __m512i low = _mm512_set1_epi32((1 << kLowBits) - 1);
  // bits of low from words, the others from words << 1
  return _mm512_ternarylogic_epi32(low, words, _mm512_slli_epi32(words, 1), 0xCA);
}

template <int Bits, int R, int C, int I>
SHIFTJAX_AVX512BF16 inline void PairStep(const __m512i (&words)[C], const uint32_t* x,
                                         int64_t m, __m512i table, __m512 (&acc)[R][C]) {
  if constexpr (I < 32 / Bits / 2) {
    for (int c = 0; c < C; ++c) {
      const __m512i index = I == 0 ? words[c] : _mm512_srli_epi32(words[c], I * Bits);
      const __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(index, table);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbf16_ps(
            acc[r][c], wv, (__m512bh)_mm512_set1_epi32(static_cast<int>(x[I * m + r])));
    }
    PairStep<Bits, R, C, I + 1>(words, x, m, table, acc);
  }
}

// The large-M path (M > 16): a panel of kPanelK rows of k by 64 columns decoded once into
// an L2-resident buffer, then a register-blocked microkernel over all M rows.
constexpr int kPanelVectors = 4;  // 64 columns
constexpr int64_t kPanelBlock = 16 * kPanelVectors;
constexpr int kPanelRows = 6;          // 6 x 4 accumulators
constexpr int64_t kPanelK = 256;       // rows of k per panel (rounded up to whole words)

// panel[(w - w0) * P + j][0 .. 63] = decoded code j of packed[w, n0 .. n0 + 63].
template <int Bits, int J>
SHIFTJAX_AVX512 inline void DecodeWord(const __m512i (&words)[kPanelVectors], const Table& t,
                                       float* out) {
  if constexpr (J < 32 / Bits) {
    for (int c = 0; c < kPanelVectors; ++c)
      _mm512_store_ps(out + J * kPanelBlock + 16 * c, Decode<Bits, J>(words[c], t));
    DecodeWord<Bits, J + 1>(words, t, out);
  }
}

// The bfloat16 pair path's panel: bfloat16 pairs (uint32, rows q = (w - w0) * P/2 + i).
template <int Bits, int I>
SHIFTJAX_AVX512BF16 inline void DecodePairWord(const __m512i (&words)[kPanelVectors],
                                               __m512i table, uint32_t* out) {
  if constexpr (I < 32 / Bits / 2) {
    for (int c = 0; c < kPanelVectors; ++c) {
      const __m512i index = I == 0 ? words[c] : _mm512_srli_epi32(words[c], I * Bits);
      _mm512_store_si512(out + I * kPanelBlock + 16 * c,
                         _mm512_permutexvar_epi16(index, table));
    }
    DecodePairWord<Bits, I + 1>(words, table, out);
  }
}

// The register tile loop both small-M paths share (RegisterTile): Path says how x is laid
// out and how a vector of words is decoded and multiplied in.
//   Path::Table           the decode table's type
//   Path::MakeTable(e0)   the table
//   Path::kRowsPerWord    rows of Path::X per word of codes
//   Path::Xs(p)           x in the path's layout, [word rows][m]
//   Path::Load(words)     the loaded words as Step wants them
//   Path::Step<R, C>      all codes of C word vectors into R x C accumulators
// and for the panels (PanelTile, PanelBlock):
//   Path::Panel           a decoded panel's element; Path::DecodeRows writes a word
//                         vector's kRowsPerWord rows
//   Path::LoadPanel, Path::Broadcast, Path::Madd   the microkernel's load of 16 panel
//                         elements, broadcast of one x, and multiply-add
// Compiled for the bfloat16 pair path's target (avx512f, avx512bw, avx512bf16), the widest
// of the two, so that either Path's steps inline into it: the float32 path's instances
// emit no bfloat16 instruction (nothing in them is bfloat16), but the compiler may use
// AVX512BW mask moves, so 'avx512' requires avx512bw too (every AVX-512 CPU but Xeon Phi).
template <int Bits>
struct FloatPath {
  static constexpr int kCodesPerWord = 32 / Bits;
  using Table = ::Table;
  using X = float;
  static constexpr int kRowsPerWord = 32 / Bits;
  SHIFTJAX_AVX512 static Table MakeTable(int e0) { return ::MakeTable(Bits, e0); }
  static const X* Xs(const Problem& p) { return p.xt; }
  SHIFTJAX_AVX512 static inline __m512i Load(__m512i words) { return words; }
  template <int R, int C>
  SHIFTJAX_AVX512 static inline void Step(const __m512i (&words)[C], const X* x, int64_t m,
                                          const Table& t, __m512 (&acc)[R][C]) {
    DirectStep<Bits, R, C, 0>(words, x, m, t, acc);
  }  // The panels: decoded float32 weights, one row per code.
  using Panel = float;
  using PanelVec = __m512;
  SHIFTJAX_AVX512 static inline void DecodeRows(const __m512i (&words)[kPanelVectors],
                                                const Table& t, Panel* out) {
    DecodeWord<Bits, 0>(words, t, out);
  }
  SHIFTJAX_AVX512 static inline PanelVec LoadPanel(const Panel* v) { return _mm512_load_ps(v); }
  SHIFTJAX_AVX512 static inline PanelVec Broadcast(X x) { return _mm512_set1_ps(x); }
  SHIFTJAX_AVX512 static inline __m512 Madd(__m512 acc, PanelVec w, PanelVec x) {
    return _mm512_fmadd_ps(x, w, acc);
  }
};

template <int Bits>
struct PairPath {
  static constexpr int kCodesPerWord = 32 / Bits;
  using Table = __m512i;
  using X = uint32_t;
  static constexpr int kRowsPerWord = 32 / Bits / 2;
  SHIFTJAX_AVX512BF16 static Table MakeTable(int e0) { return PairTable(Bits, e0); }
  static const X* Xs(const Problem& p) { return p.xp; }
  SHIFTJAX_AVX512BF16 static inline __m512i Load(__m512i words) {
    return PairWords<Bits>(words);
  }
  template <int R, int C>
  SHIFTJAX_AVX512BF16 static inline void Step(const __m512i (&words)[C], const X* x,
                                              int64_t m, const Table& t,
                                              __m512 (&acc)[R][C]) {
    PairStep<Bits, R, C, 0>(words, x, m, t, acc);
  }  // The panels: bfloat16 pairs, one row per pair.
  using Panel = uint32_t;
  using PanelVec = __m512bh;
  SHIFTJAX_AVX512BF16 static inline void DecodeRows(const __m512i (&words)[kPanelVectors],
                                                    const Table& t, Panel* out) {
    DecodePairWord<Bits, 0>(words, t, out);
  }
  SHIFTJAX_AVX512BF16 static inline PanelVec LoadPanel(const Panel* v) {
    return (__m512bh)_mm512_load_si512(v);
  }
  SHIFTJAX_AVX512BF16 static inline PanelVec Broadcast(X x) {
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(x));
  }
  SHIFTJAX_AVX512BF16 static inline __m512 Madd(__m512 acc, PanelVec w, PanelVec x) {
    return _mm512_dpbf16_ps(acc, w, x);
  }
};

#define SHIFTJAX_AVX512_TILE SHIFTJAX_AVX512BF16

template <class Path, int R, int C>
SHIFTJAX_AVX512_TILE void RegisterTile(const Problem& p, const typename Path::Table& t,
                                       int64_t r0, int64_t n0, int64_t n1) {
  __mmask16 mask[C];
  ColumnMasks<C>(n1, n0, mask);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint32_t* row = WordsAt(p, n0);
  const typename Path::X* x = Path::Xs(p) + r0;
  for (int64_t w = 0; w < p.words; ++w, row += p.stride, x += Path::kRowsPerWord * p.m) {
    if (p.tile == 0 && w + kPrefetchRows < p.words)  // the tiled layout streams
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * p.stride + 16 * c),
                     _MM_HINT_T0);
    __m512i words[C];
    for (int c = 0; c < C; ++c)
      words[c] = Path::Load(_mm512_maskz_loadu_epi32(mask[c], row + 16 * c));
    Path::template Step<R, C>(words, x, p.m, t, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + n0 + 16 * c, mask[c], acc[r][c]);
}

// Vectors per tile for R rows: R * C accumulators of the 32 registers, at most 8, a power
// of two so that the tiles divide the tiled layout's 128-column multiples.
constexpr int DirectVectors(int rows) {
  const int fit = std::max(1, std::min(8, 24 / rows));
  return fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}
constexpr int kDirectMaxRows = 16;

template <class Path, int R>
SHIFTJAX_AVX512_TILE void TileColumns(const Problem& p, const typename Path::Table& t,
                                      int64_t r0, int64_t n0, int64_t n1) {
  constexpr int C = DirectVectors(R);
  for (int64_t c0 = n0; c0 < n1; c0 += 16 * C) RegisterTile<Path, R, C>(p, t, r0, c0, n1);
}

// Columns [n0, n1) of all M (<= 16 per pass) rows on register tiles.
template <class Path, int... R>
SHIFTJAX_AVX512_TILE void TileRows(const Problem& p, int64_t n0, int64_t n1,
                                   std::integer_sequence<int, R...>) {
  using Fn = void (*)(const Problem&, const typename Path::Table&, int64_t, int64_t, int64_t);
  static constexpr Fn kFns[] = {TileColumns<Path, R + 1>...};
  const typename Path::Table t = Path::MakeTable(p.e0);
  for (int64_t r0 = 0; r0 < p.m; r0 += kDirectMaxRows)
    kFns[std::min<int64_t>(kDirectMaxRows, p.m - r0) - 1](p, t, r0, n0, n1);
}

// The columns a small-M task covers: whole tiles of the widest tile M uses.
int64_t DirectBlock(int64_t m) {
  constexpr int kVectors[kDirectMaxRows] = {
      DirectVectors(1),  DirectVectors(2),  DirectVectors(3),  DirectVectors(4),
      DirectVectors(5),  DirectVectors(6),  DirectVectors(7),  DirectVectors(8),
      DirectVectors(9),  DirectVectors(10), DirectVectors(11), DirectVectors(12),
      DirectVectors(13), DirectVectors(14), DirectVectors(15), DirectVectors(16)};
  return 16 * kVectors[std::min<int64_t>(m, kDirectMaxRows) - 1];
}


// y[r0 .. r0 + R, n0 .. n0 + 64] (+)= x[rows q0 .. q0 + rows] @ panel, x in Path's
// layout (float32 xt: one row per k; pairs xp: one per pair of k's).
template <class Path, int R>
SHIFTJAX_AVX512_TILE void PanelTile(const Problem& p, const typename Path::Panel* panel,
                                    int64_t q0, int64_t rows, int64_t r0, int64_t n0,
                                    bool first, const __mmask16 (&mask)[kPanelVectors]) {
  __m512 acc[R][kPanelVectors];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPanelVectors; ++c)
      acc[r][c] = first ? _mm512_setzero_ps()
                        : _mm512_maskz_loadu_ps(mask[c], p.y + (r0 + r) * p.n + n0 + 16 * c);
  const typename Path::X* x = Path::Xs(p) + q0 * p.m + r0;
  for (int64_t q = 0; q < rows; ++q, x += p.m, panel += kPanelBlock) {
    typename Path::PanelVec wv[kPanelVectors];
    for (int c = 0; c < kPanelVectors; ++c) wv[c] = Path::LoadPanel(panel + 16 * c);
    for (int r = 0; r < R; ++r) {
      const typename Path::PanelVec xv = Path::Broadcast(x[r]);
      for (int c = 0; c < kPanelVectors; ++c) acc[r][c] = Path::Madd(acc[r][c], wv[c], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPanelVectors; ++c)
      _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + n0 + 16 * c, mask[c], acc[r][c]);
}

// Columns [n0, n1) of all M rows, 64 columns at a time: decode a panel of kPanelK rows of
// k (whole words), run the 6-row microkernel over all M rows, next panel.
template <class Path>
SHIFTJAX_AVX512_TILE void PanelBlock(const Problem& p, int64_t n0, int64_t n1) {
  using Panel = typename Path::Panel;
  constexpr int kRows = Path::kRowsPerWord;
  constexpr int64_t kWords = (kPanelK + Path::kCodesPerWord - 1) / Path::kCodesPerWord;
  using Fn = void (*)(const Problem&, const Panel*, int64_t, int64_t, int64_t, int64_t, bool,
                      const __mmask16 (&)[kPanelVectors]);
  static constexpr Fn kTiles[] = {PanelTile<Path, 1>, PanelTile<Path, 2>, PanelTile<Path, 3>,
                                  PanelTile<Path, 4>, PanelTile<Path, 5>, PanelTile<Path, 6>};
  // One panel per thread, reused by its tasks (about 64 KiB).
  thread_local std::unique_ptr<Panel[], decltype(&free)> panel(nullptr, &free);
  thread_local size_t panel_size = 0;
  const size_t size = kWords * kRows * kPanelBlock;
  if (panel_size < size) {
    panel.reset(static_cast<Panel*>(aligned_alloc(64, size * sizeof(Panel))));
    panel_size = size;
  }
  const typename Path::Table t = Path::MakeTable(p.e0);
  for (int64_t c0 = n0; c0 < n1; c0 += kPanelBlock) {
    __mmask16 mask[kPanelVectors];
    ColumnMasks<kPanelVectors>(p.n, c0, mask);
    for (int64_t w0 = 0; w0 < p.words; w0 += kWords) {
      const int64_t w1 = std::min(p.words, w0 + kWords);
      for (int64_t w = w0; w < w1; ++w) {
        __m512i words[kPanelVectors];
        for (int c = 0; c < kPanelVectors; ++c)
          words[c] = Path::Load(
              _mm512_maskz_loadu_epi32(mask[c], WordsAt(p, c0) + w * p.stride + 16 * c));
        Path::DecodeRows(words, t, panel.get() + (w - w0) * kRows * kPanelBlock);
      }
      for (int64_t r0 = 0; r0 < p.m; r0 += kPanelRows)
        kTiles[std::min<int64_t>(kPanelRows, p.m - r0) - 1](
            p, panel.get(), w0 * kRows, (w1 - w0) * kRows, r0, c0, w0 == 0, mask);
    }
  }
}

template <int Bits>
SHIFTJAX_AVX512 void Avx512Block(const Problem& p, int64_t n0, int64_t n1) {
  if (p.m <= kDirectMaxRows) {
    TileRows<FloatPath<Bits>>(p, n0, n1, std::make_integer_sequence<int, kDirectMaxRows>());
  } else {
    PanelBlock<FloatPath<Bits>>(p, n0, n1);
  }
}

#endif  // SHIFTJAX_X86

// ----------------------------------------------------------------------------- dispatch

bool Supported(Isa isa) {
#if SHIFTJAX_X86
  if (isa == kAvx512Bf16)
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  if (isa == kAvx512)  // avx512bw: the register tiles' target (RegisterTile)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kScalar;
}

Isa Resolve(Isa isa) {
  if (isa != kAuto) return isa;
  for (Isa best : {kAvx512Bf16, kAvx512, kAvx2})
    if (Supported(best)) return best;
  return kScalar;
}

// Columns per task, and the task's work on [n0, n1).
int64_t BlockColumns(Isa isa, int64_t m) {
#if SHIFTJAX_X86
  if (isa == kAvx512 || isa == kAvx512Bf16)
    return m <= kDirectMaxRows ? DirectBlock(m) : kPanelBlock;
  if (isa == kAvx2) return kAvx2Block;
#endif
  return kScalarBlock;
}

template <int Bits>
void RunBlock(Isa isa, const Problem& p, int64_t n0, int64_t n1) {
#if SHIFTJAX_X86
  if (isa == kAvx512Bf16 && p.xp) {
    if (p.m > kDirectMaxRows) return PanelBlock<PairPath<Bits>>(p, n0, n1);
    return TileRows<PairPath<Bits>>(p, n0, n1,
                                    std::make_integer_sequence<int, kDirectMaxRows>());
  }
  if (isa == kAvx512 || isa == kAvx512Bf16) return Avx512Block<Bits>(p, n0, n1);
  if (isa == kAvx2) {
    for (int64_t c0 = n0; c0 < n1; c0 += kAvx2Block) Avx2Block<Bits>(p, c0);
    return;
  }
#endif
  ScalarBlock<Bits>(p, n0, n1);
}

void Block(int bits, Isa isa, const Problem& p, int64_t n0, int64_t n1) {
  switch (bits) {
    case 2: return RunBlock<2>(isa, p, n0, n1);
    case 3: return RunBlock<3>(isa, p, n0, n1);
    case 4: return RunBlock<4>(isa, p, n0, n1);
    default: return RunBlock<5>(isa, p, n0, n1);
  }
}

// xt[k * m + r] = x[r, k] as float32, zero for k >= K. In blocks of 64 k so that both
// the reads (along a row of x) and the writes (64 rows of xt) stay in the L1 cache.
void Transpose(const ffi::AnyBuffer& x, int64_t m, int64_t k, int64_t rows, float* xt) {
  std::fill(xt + k * m, xt + rows * m, 0.0f);
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  const void* data = x.untyped_data();
  constexpr int64_t kBlock = 64;
  for (int64_t i0 = 0; i0 < k; i0 += kBlock) {
    const int64_t i1 = std::min(k, i0 + kBlock);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t i = i0; i < i1; ++i) {
        float v;
        if (bf16) {  // bfloat16 is the high half of a float32
          const uint32_t bits = uint32_t{static_cast<const uint16_t*>(data)[r * k + i]} << 16;
          std::memcpy(&v, &bits, sizeof v);
        } else {
          v = static_cast<const float*>(data)[r * k + i];
        }
        xt[i * m + r] = v;
      }
    }
  }
}

// The bfloat16 pair path's x: xp[(w * h + i) * m + r] = x[r, w*P + i] | x[r, w*P + h + i]
// << 16 (h = P/2; bfloat16 bits, zero for k >= K).
void PairTranspose(const ffi::AnyBuffer& x, int64_t m, int64_t k, int64_t words, int p,
                   uint32_t* xp) {
  const uint16_t* data = static_cast<const uint16_t*>(x.untyped_data());
  const int half = p / 2;
  for (int64_t w = 0; w < words; ++w) {
    for (int i = 0; i < half; ++i) {
      const int64_t lo = w * p + i, hi = lo + half;
      for (int64_t r = 0; r < m; ++r) {
        const uint32_t a = lo < k ? data[r * k + lo] : 0, b = hi < k ? data[r * k + hi] : 0;
        xp[(w * half + i) * m + r] = a | b << 16;
      }
    }
  }
}

// x [M, K] float32 or bfloat16; packed [W, N] (words) or [T, W, TW] (tiled); scale and
// bias [N] or [T, TW]; y [M, N] or [M, T, TW] (row-major, so y[m, t * TW + c]).
ffi::Error Pow2Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> packed,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, int64_t bits,
                      int64_t e0, int64_t isa_attr, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = packed.dimensions(), yd = y->dimensions();
  if (bits < 2 || bits > 5)
    return ffi::Error::InvalidArgument("shiftjax pow2_matmul: bits must be in 2..5");
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("shiftjax pow2_matmul: x must be float32 or bfloat16");
  const bool tiled = wd.size() == 3;
  if (xd.size() != 2 || (wd.size() != 2 && !tiled) || yd.size() != wd.size())
    return ffi::Error::InvalidArgument(
        "shiftjax pow2_matmul: x and y must be 2-D and packed 2-D (words) or 3-D (tiled; "
        "y then [M, T, TW])");
  const int64_t m = xd[0], k = xd[1], p = 32 / bits;
  const int64_t words = tiled ? wd[1] : wd[0];
  const int64_t tile = tiled ? wd[2] : 0;
  const int64_t n = tiled ? wd[0] * tile : wd[1];
  if (words != (k + p - 1) / p || yd[0] != m ||
      (tiled ? yd[1] != wd[0] || yd[2] != tile : yd[1] != n) ||
      static_cast<int64_t>(scale.element_count()) != n ||
      static_cast<int64_t>(bias.element_count()) != n)
    return ffi::Error::InvalidArgument("shiftjax pow2_matmul: inconsistent shapes");
  if (tiled && tile % kTileMultiple != 0)
    return ffi::Error::InvalidArgument(
        "shiftjax pow2_matmul: the tiled layout's tile must be a multiple of 128 columns");
  const Isa isa = Resolve(static_cast<Isa>(isa_attr));
  if (!Supported(isa))
    return ffi::Error::InvalidArgument("shiftjax pow2_matmul: this CPU lacks that path");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const bool pairs = isa == kAvx512Bf16 && x.element_type() == ffi::DataType::BF16;
  std::vector<float> xt(pairs ? 0 : words * p * m);
  std::vector<uint32_t> xp(pairs ? words * (p / 2) * m : 0);
  if (pairs) {
    PairTranspose(x, m, k, words, p, xp.data());
  } else {
    Transpose(x, m, k, words * p, xt.data());
  }
  const Problem prob{xt.data(), pairs ? xp.data() : nullptr, packed.typed_data(),
                     y->typed_data(), m, n, words, tile, tiled ? tile : n,
                     static_cast<int>(bits), static_cast<int>(e0)};
  if (words == 0) std::fill(prob.y, prob.y + m * n, 0.0f);
  // Tasks: whole tiles (each a contiguous block of words) or, in the words layout, the
  // widest block of columns the path reads at once.
  const int64_t block = tiled ? tile : BlockColumns(isa, m);
  const float *s = scale.typed_data(), *b = bias.typed_data();
  ParallelFor(pool, (n + block - 1) / block, [&](int64_t t) {
    const int64_t n0 = t * block, n1 = std::min(n, n0 + block);
    if (words > 0) Block(static_cast<int>(bits), isa, prob, n0, n1);
    Epilogue(prob, s, b, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShiftjaxPow2Matmul, Pow2Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x [M, K] f32 or bf16
                                  .Arg<ffi::Buffer<ffi::U32>>()   // packed, words or tiled
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [N] / [T, TW]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [N] / [T, TW]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("e0")
                                  .Attr<int64_t>("isa")
                                  .Ret<ffi::Buffer<ffi::F32>>());
