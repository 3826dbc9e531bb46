"""Matmul by packed zero-free power-of-two weights: ``y = x @ decode(packed) * scale + bias``.

Weight format (see ``shiftjax.codes``): ``W[K, N]`` holds N-bit codes
``sign << (bits - 1) | index`` standing for ``(-1)**sign * 2**(e0 + index)``; every one
of the ``2**bits`` codes is a value (DenseShift), ``bits`` in 2..5. ``W`` is packed along
the contraction axis: ``P = 32 // bits`` consecutive k's per uint32 word, code ``j`` of a
word in bits ``[j * bits, (j + 1) * bits)``, so ``packed`` is ``uint32[ceil(K / P), N]``
with the last word zero-padded.

Backends:
  * ``'xla'``: unpack + decode (bit assembly) + ``lax.dot``. The CPU fallback, and the
    reference the native and Pallas kernels are tested against.
  * ``'native'``: the C++ CPU kernel (``shiftjax.kernels.cpu.native``,
    ``cpu_pow2_matmul.cc``): decodes the words in vector registers (a 16-entry in-register
    table on AVX-512, bit assembly on AVX2) and reads each packed word once at small M;
    4-bit weights at M = 1 run several times faster than a float32 dot (docs/cpu_kernel.md).
    It sums each output's products in order of k (bfloat16 x on AVX512-BF16: two at a
    time), XLA's dot in its own blocked order: the two agree to float32 rounding of the
    sums (within ``2 K 2**-24 sum |x| |w|``), not bit for bit.
  * ``'pallas'``: the Pallas kernel compiled for ``platform`` (``'gpu'``: Triton,
    ``'tpu'``: Mosaic), default the platform of ``jax.default_backend()``.
  * ``'pallas_interpret'``: the same kernel run by the Pallas interpreter (any machine).
  * ``None``: ``'pallas'`` on GPU/TPU (or when ``platform`` is given); on CPU
    ``'native'`` where the native kernels are available (built, not
    ``native.disabled()``), else ``'xla'``. ``resolve_backend`` calls both CPU paths
    ``'xla'`` (pow2_conv's and deploy's "decode on the CPU" branch); only an explicit
    ``backend='xla'`` keeps ``pow2_matmul`` off the native kernel.

The kernels decode codes where they use them, from the packed words in registers/VMEM: a
shift and a mask pick code ``j`` of every word, the float's bits are assembled as
``sign << 31 | (127 + e0 + index) << 23`` and bitcast (no table, no multiply), and ``P``
dots of ``x[:, k = w * P + j] @ W_j`` are summed into a float32 accumulator. To give each
of those dots a contiguous operand, ``x`` is re-laid out once per call to
``x_t[j, m, w] = x[m, w * P + j]`` (an activation-sized XLA transpose, cheap next to the
weights for the small-M inference shapes the kernel is for).

Two grids, because GPU and TPU Pallas differ in how a reduction over K may be written:
  * TPU (Mosaic): grid ``(M/bm, N/bn, K/bk)``, the K axis ``"arbitrary"``; a float32 VMEM
    accumulator zeroed at ``k == 0`` and the scale/bias epilogue at the last k step.
  * GPU (Triton): every Pallas grid axis runs in parallel on GPU (no ordered revisits of an
    output block, no scratch memory), so the grid is ``(M/bm, N/bn, split_k)`` and each
    program loops over its part of K with ``lax.fori_loop``, the accumulator in
    registers; with ``split_k > 1`` the parts' float32 partial products are summed in XLA
    (``Blocks``). Triton is selected
    explicitly with ``jax.experimental.pallas.triton.CompilerParams``: the default GPU
    lowering of jax 0.10 is Mosaic GPU, which cannot lower this dot.

Three ways to multiply on GPU (``gpu_dot``), because small M is where shift weights pay
off and there the kernel's cost is the decode:
  * ``'mma_pairs'`` (the default for bfloat16 x): tensor-core dots of weights decoded two
    at a time. Codes ``i`` and ``i + P/2`` of a word become the two bfloat16 halves of one
    32-bit register with the same shifts, masks and add (``decode_pair_bf16``: on sm_90
    about 2.8 instructions per 4-bit weight instead of 5.7 and a float32 -> bfloat16
    pack), and that register is used as it is: the product is computed transposed,
    ``y^T = W^T x^T``, so that the weights are the dot's first operand, whose registers
    hold two bfloat16 adjacent in K; the pair is placed at K ``2 w`` and ``2 w + 1`` of
    the step, and x is re-laid out to match
    (``x_t[i, m, 2 w + h] = x[m, w * P + h * P / 2 + i]``). On sm_90 this halves the K
    loop's decode instructions (benchmarks/gpu_kernel_sass.py).
  * ``'mma'`` (the default for float32 x): one code at a time (``decode_slot``), ``P``
    tensor-core dots per K step of ``x_t[j] @ W_j``, the decoded float32 converted to x's
    dtype.
  Tensor-core dots take at least 16 rows of x: at M = 1 the tile has 16 rows, 15 of
  them past x's end (masked: neither read nor written).
  * ``'fma'``: CUDA-core multiply-adds into a float32 accumulator
    ``acc[bm, bk_words, bn] += x_j[:, :, None] * W_j[None]``, reduced over its middle
    axis once after the K loop. No row minimum (a tile of 1 row for M = 1), no operand
    layout conversion; every weight costs its decode and one multiply-add per row of x, so
    it is for M of a few rows. The accumulator lives in registers: ``bm * bk_words * bn``
    is capped at ``FMA_MAX_ACCUMULATOR`` floats.

Output: always float32 ``[..., N]`` (float32 accumulation and float32 scale/bias; cast it
yourself if the next layer wants bfloat16).

Padding: shapes that are not multiples of the blocks are zero-padded (x along K, and
along M on TPU; words along K and N, scale/bias along N) and the output sliced. On GPU
x and the output keep their M rows: the last M tile may overhang both, its rows past
x's end masked loads and stores, so that no call copies x to whole tiles or slices the
output's rows (at split_k 1 and a dividing N tile the kernel's output is the result).
A padded k row holds code 0 (``+2**e0``, finite) against x == 0 and so adds exactly 0.
Padding the words copies the weights on every call: pick N and K (or export pre-padded
weights) so that the blocks divide them; the defaults prefer blocks that divide the
shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax.kernels.cpu import native

SUPPORTED_BITS = (2, 3, 4, 5)
BACKENDS = (None, "xla", "native", "pallas", "pallas_interpret")
PLATFORMS = ("gpu", "tpu")
GPU_DOTS = ("mma", "fma", "mma_pairs")
# The 'fma' accumulator's floats per program: 32 registers per thread at 4 warps.
FMA_MAX_ACCUMULATOR = 4096
X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_F32_MANTISSA_BITS = 23
_F32_EXPONENT_BIAS = 127


codes_per_word = codes_lib.codes_per_word  # re-exported: kernels speak in packed words


# ----------------------------------------------------------------------------------------
# Argument checks (plain Python, before anything is traced).


def check_format(bits, e0) -> codes_lib.CodeFormat:
  """Checks ``bits`` and ``e0`` of a zero-free format this kernel supports."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      bits not in SUPPORTED_BITS):
    raise ValueError(
        f"pow2_matmul supports zero-free codes of 2..5 bits, got bits={bits!r}")
  if isinstance(e0, bool) or not isinstance(e0, (int, np.integer)):
    raise ValueError(f"e0 must be a Python integer exponent offset, got {e0!r}")
  top = int(e0) + (1 << (bits - 1)) - 1
  # bfloat16 shares float32's exponent range, so one check covers both.
  if int(e0) < 1 - _F32_EXPONENT_BIAS or top > _F32_EXPONENT_BIAS:
    raise ValueError(
        f"e0={e0} with {bits}-bit codes spans exponents {e0}..{top}, which are not all "
        f"normal float32/bfloat16 exponents ({1 - _F32_EXPONENT_BIAS}.."
        f"{_F32_EXPONENT_BIAS})")
  return codes_lib.CodeFormat(bits=int(bits), e0=int(e0))


def resolve_backend(backend, platform) -> tuple[str, str | None]:
  """(``'xla'`` | ``'native'`` | ``'pallas'`` | ``'pallas_interpret'``, ``'gpu'`` |
  ``'tpu'`` | None). None on CPU gives ``'xla'``, the CPU path (``pow2_matmul`` runs the
  native kernel there when it can; module docstring)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "native":
    if platform is not None or jax.default_backend() != "cpu":
      raise ValueError(
          f"backend='native' is the CPU kernel; got platform={platform!r} with default "
          f"backend {jax.default_backend()!r}")
    return backend, None
  if platform is not None:
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform not in PLATFORMS:
      raise ValueError(
          f"platform must be 'gpu' (or 'cuda') or 'tpu', got {platform!r}")
  default = jax.default_backend()
  default = {"cuda": "gpu", "rocm": "gpu"}.get(default, default)
  if backend is None:
    if platform is not None:
      backend = "pallas"
    else:
      backend = "pallas" if default in PLATFORMS else "xla"
  if backend == "xla":
    return backend, None
  if platform is None:
    if backend == "pallas_interpret":
      platform = "tpu"  # the kernel with the K grid axis; both run in interpret mode
    elif default in PLATFORMS:
      platform = default
    else:
      raise ValueError(
          f"backend='pallas' compiles for a GPU or TPU but the default backend is "
          f"{jax.default_backend()!r}: pass platform='gpu' or 'tpu' (to lower or "
          f"export for it), or use backend='pallas_interpret' or 'xla' on this machine")
  return backend, platform


def _check_operands(x, packed, bits, scale, bias, k) -> tuple[int, int]:
  """Returns (K, N) after checking shapes and dtypes."""
  x_dtype = jnp.dtype(x.dtype)
  if x_dtype not in X_DTYPES:
    raise ValueError(f"x must be float32 or bfloat16, got {x_dtype}")
  if x.ndim < 1:
    raise ValueError("x must have a contraction axis: shape [..., K], got a scalar")
  if packed.ndim != 2:
    raise ValueError(
        f"packed weights must be uint32[ceil(K / {codes_per_word(bits)}), N], got shape "
        f"{tuple(packed.shape)}")
  if jnp.dtype(packed.dtype) != jnp.uint32:
    raise ValueError(f"packed weights must be uint32 words, got {packed.dtype}")
  kx = x.shape[-1]
  if k is None:
    k = kx
  elif k != kx:
    raise ValueError(f"k={k} but x has {kx} columns (shape {tuple(x.shape)})")
  p = codes_per_word(bits)
  words, n = packed.shape
  if words != -(-k // p):
    raise ValueError(
        f"x has K={k}, which packs {bits}-bit codes into ceil({k}/{p})={-(-k // p)} "
        f"words, but packed has {words} words (shape {tuple(packed.shape)})")
  check_epilogue(scale, bias, n)
  return k, n


def check_epilogue(scale, bias, n: int) -> None:
  """``scale`` and ``bias``, where given, are one value per output channel (``[n]``): a
  wrong shape would otherwise broadcast silently."""
  for name, v in (("scale", scale), ("bias", bias)):
    if v is not None and tuple(v.shape) != (n,):
      raise ValueError(f"{name} must have shape ({n},) (one per output channel), got "
                       f"{tuple(v.shape)}")


# ----------------------------------------------------------------------------------------
# Decoding by bit assembly (shared by the kernels and the XLA path).


def decode_slot(words: jax.Array, j: int, bits: int, e0: int, dtype) -> jax.Array:
  """Decodes code ``j`` of every uint32 word into ``dtype`` (float32 or bfloat16).

  ``sign << 31 | (127 + e0 + index) << 23`` is the float32 pattern of
  ``(-1)**sign * 2**(e0 + index)``; float32 -> bfloat16 of a power of two is exact.
  """
  code = (words >> jnp.uint32(j * bits)) & jnp.uint32((1 << bits) - 1)
  sign = code >> jnp.uint32(bits - 1)
  index = code & jnp.uint32((1 << (bits - 1)) - 1)
  pattern = (sign << jnp.uint32(31)) | (
      (index + jnp.uint32(_F32_EXPONENT_BIAS + e0)) << jnp.uint32(_F32_MANTISSA_BITS))
  value = lax.bitcast_convert_type(pattern, jnp.float32)
  return value if jnp.dtype(dtype) == jnp.float32 else value.astype(dtype)


def decode_pair_bf16(words: jax.Array, i: int, bits: int, e0: int) -> jax.Array:
  """Decodes codes ``i`` and ``i + P/2`` of every uint32 word at once, as two bfloat16
  bit patterns in one uint32: code ``i`` in the low 16 bits, code ``i + P/2`` in the
  high 16 (``P = codes_per_word(bits)``; even for every supported width).

  A bfloat16 power of two is ``sign << 15 | (127 + e0 + index) << 7``: both halves are
  assembled with the same 32-bit shifts, masks and add (no carry crosses bit 16, the
  exponent stays below 255): on sm_90, about 2.8 machine instructions per 4-bit weight
  against 5.7 for one code at a time (benchmarks/gpu_kernel_sass.py). For 3 and 5 bits
  the high code starts 15 bits above the low one, not 16: the word's upper codes are
  first moved up one bit.
  """
  p = codes_per_word(bits)
  half = p // 2
  # Constants are Python ints folded here: Triton's lowering takes no ops on constants.
  if half * bits != 16:  # 3 and 5 bits: codes half.. start at bit 15
    low = jnp.uint32((1 << (half * bits)) - 1)
    words = (words & low) | ((words << jnp.uint32(1)) & jnp.uint32(0xFFFF0000))
  at = i * bits  # the low code's first bit; the high code's is at + 16
  both = 0x00010001  # a 16-bit value in both halves
  sign_mask = jnp.uint32(0x8000 * both)
  index_mask = jnp.uint32((((1 << (bits - 1)) - 1) << 7) * both)
  exponent = jnp.uint32(((_F32_EXPONENT_BIAS + e0) << 7) * both)
  sign_shift = 16 - at - bits  # the sign bit (at + bits - 1) -> bit 15
  index_shift = 7 - at  # the index (bit at) -> bit 7
  shift = lambda v, s: v << jnp.uint32(s) if s >= 0 else v >> jnp.uint32(-s)
  sign = shift(words, sign_shift) & sign_mask
  index = shift(words, index_shift) & index_mask
  return (sign | index) + exponent


def unpack_codes(packed: jax.Array, bits: int, k: int) -> jax.Array:
  """uint32[ceil(K/P), N] words -> uint32[K, N] codes (code j of word w is row w*P + j)."""
  p = codes_per_word(bits)
  shifts = jnp.arange(p, dtype=jnp.uint32) * jnp.uint32(bits)
  codes = (packed[:, None, :] >> shifts[None, :, None]) & jnp.uint32((1 << bits) - 1)
  return codes.reshape(-1, packed.shape[1])[:k]


def _dot_precision(dtype):
  # float32 x gets a true float32 product on every platform (TPU's default is bf16
  # passes, Triton's would be TF32); bfloat16 x is exact in one pass.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------------------
# XLA path.


@functools.partial(jax.jit, static_argnames=("bits", "e0", "k"))
def _xla_matmul(x2, packed, scale, bias, *, bits, e0, k):
  fmt = codes_lib.CodeFormat(bits=bits, e0=e0)
  w = codes_lib.decode(unpack_codes(packed, bits, k), fmt, x2.dtype)
  y = jnp.dot(x2, w, precision=_dot_precision(x2.dtype),
              preferred_element_type=jnp.float32)
  return xla_epilogue(y, scale, bias)


# The native kernel's call, jitted apart from the XLA path's: which of the two runs is
# decided outside any jit (``_cpu_backend``), so a trace never keeps a choice made while
# the native kernels were available (see ``native.disabled``).
_native_matmul = jax.jit(native.pow2_matmul, static_argnames=("bits", "e0", "k", "isa"))


def _cpu_backend(x2, packed, bits, explicit: bool) -> str:
  """``'native'`` where the native kernel takes these operands, else ``'xla'``; with
  ``backend='native'`` asked for explicitly, a ValueError instead of the fallback."""
  if native.supports_pow2_matmul(x2, packed, bits):
    return "native"
  if explicit:
    raise ValueError(
        f"backend='native' but the native CPU kernels are not available (no C++ compiler, "
        f"SHIFTJAX_NATIVE=0, native.disabled(), or not the CPU backend: "
        f"{jax.default_backend()!r})")
  return "xla"


def xla_epilogue(y, scale, bias):
  """``y * scale + bias`` with either left out when None (the XLA paths' epilogue)."""
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


# ----------------------------------------------------------------------------------------
# Block sizes.


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Kernel tile: ``m`` rows of x, ``n`` output channels, ``k_words`` packed word rows
  (``k_words * codes_per_word(bits)`` contraction steps) per grid step / loop step.

  ``split_k`` (GPU only): K is cut into that many equal parts, each a program of its own
  writing a float32 partial product; XLA sums the parts and applies scale and bias. At
  small M the product is a weight stream with too few (M, N) tiles to keep every SM
  reading: splitting K multiplies the programs without reading any weight twice.

  ``dot`` (GPU only): ``'mma_pairs'`` (tensor-core dots, weights decoded in bfloat16
  pairs; bfloat16 x), ``'mma'`` (tensor-core dots, one code at a time) or ``'fma'``
  (CUDA-core multiply-adds); see the module docstring. ``num_warps`` (GPU only): warps
  per program.
  """
  m: int
  n: int
  k_words: int
  split_k: int = 1
  dot: str = "mma"
  num_warps: int = 4


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _largest_dividing(dim: int, candidates: Sequence[int]) -> int | None:
  for c in candidates:
    if dim % c == 0:
      return c
  return None


def _pow2_at_least(v: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(v, 1))))


def default_dot(x_dtype) -> str:
  """The GPU multiply ``pow2_matmul`` uses unless told: bfloat16 x takes the pair decode
  (``'mma_pairs'``), float32 x one code at a time (``'mma'``)."""
  return "mma_pairs" if jnp.dtype(x_dtype) == jnp.bfloat16 else "mma"


def default_blocks(m: int, n: int, k: int, bits: int, x_dtype, platform: str,
                   dot: str | None = None) -> Blocks:
  """Default tiles for an [m, k] @ [k, n] product (see the module docstring); ``dot``
  is the GPU multiply (``GPU_DOTS``; None: ``default_dot(x_dtype)``)."""
  words = -(-k // codes_per_word(bits))
  dot = dot or default_dot(x_dtype)
  if platform == "gpu" and dot == "fma":
    # x's rows (no tensor-core minimum), at most 16 (more rows are the tensor cores'
    # job); the accumulator [bm, bkw, bn] within FMA_MAX_ACCUMULATOR floats, as many K
    # words per step as that leaves (<= 32, so that K splits into 8 parts at K = 4096).
    bm = min(16, _pow2_at_least(m))
    bn_choices = (64, 32, 16) if bm <= 4 else (32, 16)
    bn = _largest_dividing(n, bn_choices) or bn_choices[0]
    fit = max(1, min(32, FMA_MAX_ACCUMULATOR // (bm * bn)))
    fits = [c for c in (32, 16, 8, 4, 2, 1) if c <= fit]
    # A dividing tile saves padding the words, but not at the cost of tiny K steps.
    bkw = _largest_dividing(words, [c for c in fits if c >= min(8, fit)]) or fits[0]
    return Blocks(bm, bn, bkw, _default_split_k(m, -(-m // bm) * -(-n // bn), words, bkw),
                  "fma")
  if platform == "gpu":
    # Triton: power-of-two tiles, >= 16 per dot dimension. The figures below are from
    # the sm_90 machine code (benchmarks/gpu_kernel_sass.py), not yet from timings.
    # * Every (M, N) tile reads its x rows once, so x crosses L2 N / bn times: at M = 16
    #   and bn = 32 that is twice the packed weights. bn = 64 halves it; small M gets
    #   its programs from split_k instead of narrow tiles.
    # * Each loop step loads a [bk_words, bn] word tile and P x tiles [bm, bk_words] (the
    #   dot operands Triton stages in shared memory, num_stages deep): those P tiles
    #   within 32 KiB per stage, and bk_words <= 32 at bn = 64 (128 registers per
    #   thread, 4 programs per SM, for either tensor-core multiply; 130 for the pair
    #   kernel at M = 1, 3 per SM; 64 words at bn = 32 take 168, 3 per SM).
    # * A 64 x 128 accumulator at 4 warps needs 255 registers and spills (the pair
    #   kernel 24 B per thread in the K loop); 8 warps hold it in 171 (pairs) or 240
    #   (one code at a time).
    bm = min(64, max(16, _pow2_at_least(m)))
    bn_target = 64 if m <= 64 else 128
    bn = _largest_dividing(n, [c for c in (128, 64, 32, 16) if c <= bn_target]) or (
        bn_target)
    x_row_bytes = codes_per_word(bits) * bm * jnp.dtype(x_dtype).itemsize
    fits = [c for c in (32, 16) if c * x_row_bytes <= 32 << 10] or [16]
    bkw = _largest_dividing(words, fits) or fits[0]
    warps = 8 if bm * bn >= 64 * 128 else 4
    return Blocks(bm, bn, bkw, _default_split_k(m, -(-m // bm) * -(-n // bn), words, bkw),
                  dot, warps)
  # TPU (Mosaic): the last two dims of every block are multiples of (8, 128) or the
  # whole array dim. Whole dims when small (no padding, no weight copy); otherwise
  # lane-aligned tiles that divide the shape when possible.
  bm = m if m <= 256 else 256
  bn = n if n <= 512 else (_largest_dividing(n, (512, 256, 128)) or 256)
  # The x block holds P * bm * bk_words elements and the word block bk_words * bn words;
  # keep each within 2 MiB (both are double buffered, next to the accumulator and output
  # tiles) so that the default 16 MiB scoped VMEM of v4/v5 holds everything. All of K in
  # one block when it fits (5-bit K = 4096 is 683 words: no aligned tile divides it).
  x_row_bytes = codes_per_word(bits) * bm * jnp.dtype(x_dtype).itemsize
  budget = 2 << 20
  if words * max(x_row_bytes, 4 * bn) <= budget:
    bkw = words
  else:
    fit = budget // max(x_row_bytes, 4 * bn)
    bkw = _largest_dividing(words, [c for c in (512, 256, 128) if c <= fit]) or 128
  return Blocks(bm, bn, bkw)


# SMs of an H100/H200, and the programs a weight-streaming product should launch: two
# per SM, so that one program's memory latency is hidden behind another's loads.
_GPU_SMS = 132
_GPU_TARGET_PROGRAMS = 2 * _GPU_SMS
_MAX_SPLIT_K = 8


def _default_split_k(m: int, tiles: int, words: int, bkw: int) -> int:
  """K parts for the GPU kernel, keeping at least two ``bkw`` steps per part.

  * M <= 16 (a weight stream): the smallest power of two that gives at least
    ``_GPU_TARGET_PROGRAMS`` programs, at most 8.
  * Larger M (one program per SM: large tiles fill the registers or shared memory): 2
    when that still gives at most one program per SM, so that half-empty grids (M = 128,
    N = 4096: 64 tiles) fill the GPU.

  UNVERIFIED on hardware: chosen from the GEMV practice of filling every SM, pending the
  tile sweep of ``benchmarks/gpu_pow2_matmul.py`` on a GPU.
  """
  def room(split):  # each of 2 * split parts would keep two bkw steps
    return split < _MAX_SPLIT_K and words >= 2 * split * 2 * bkw

  split = 1
  if m <= 16:
    while tiles * split < _GPU_TARGET_PROGRAMS and room(split):
      split *= 2
  elif 2 * tiles <= _GPU_SMS and room(split):
    split = 2
  return split


def _resolve_blocks(m, n, k, bits, x_dtype, platform, interpret, block_m, block_n,
                    block_k, split_k=None, gpu_dot=None, num_warps=None) -> Blocks:
  p = codes_per_word(bits)
  if gpu_dot is not None and gpu_dot not in GPU_DOTS:
    raise ValueError(f"gpu_dot must be one of {GPU_DOTS} (or None), got {gpu_dot!r}")
  if platform != "gpu" and gpu_dot not in (None, "mma"):
    raise ValueError(f"gpu_dot={gpu_dot!r} is for the GPU kernel only; the {platform} "
                     f"kernel multiplies with its own dot (use None)")
  if gpu_dot == "mma_pairs" and jnp.dtype(x_dtype) != jnp.bfloat16:  # (GPU: see above)
    raise ValueError(
        f"gpu_dot='mma_pairs' decodes the weights as bfloat16 pairs and multiplies "
        f"bfloat16 x; x is {jnp.dtype(x_dtype)} (use gpu_dot='mma' or cast x)")
  d = default_blocks(m, n, k, bits, x_dtype, platform, gpu_dot)
  for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                  ("split_k", split_k), ("num_warps", num_warps)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                          or v <= 0):
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if block_k is not None and block_k % p:
    raise ValueError(
        f"block_k={block_k} must be a multiple of the {p} codes per uint32 word of "
        f"{bits}-bit codes (so that no word straddles two blocks)")
  if platform != "gpu" and split_k not in (None, 1):
    raise ValueError(f"split_k={split_k} is for the GPU kernel only; the {platform} kernel "
                     f"walks K on its grid (use 1 or None)")
  b = Blocks(int(block_m) if block_m else d.m, int(block_n) if block_n else d.n,
             int(block_k) // p if block_k else d.k_words,
             int(split_k) if split_k else d.split_k,  # default_blocks: 1 off the GPU
             d.dot, int(num_warps) if num_warps else d.num_warps)
  if interpret:
    return b  # the interpreter takes any tile; small tiles keep CPU tests small
  words = -(-k // p)
  if platform == "gpu" and (b.num_warps & (b.num_warps - 1) or b.num_warps > 32):
    raise ValueError(f"num_warps must be a power of two <= 32 (Triton), got {b.num_warps}")
  if platform == "gpu" and b.dot == "fma":
    for name, v in (("block_m", b.m), ("block_n", b.n),
                    ("block_k / codes_per_word", b.k_words)):
      if v & (v - 1):
        raise ValueError(f"on GPU (Triton) {name} must be a power of two, got {v}")
    if b.m * b.k_words * b.n > FMA_MAX_ACCUMULATOR:
      raise ValueError(
          f"gpu_dot='fma' accumulates block_m * block_k / codes_per_word * block_n = "
          f"{b.m} * {b.k_words} * {b.n} = {b.m * b.k_words * b.n} floats in registers; "
          f"keep it <= {FMA_MAX_ACCUMULATOR}")
  elif platform == "gpu":
    for name, v, lo in (("block_m", b.m, 16), ("block_n", b.n, 16),
                        ("block_k / codes_per_word", b.k_words, 16)):
      if v < lo or v & (v - 1):
        raise ValueError(
            f"on GPU (Triton) {name} must be a power of two >= {lo}, got {v}")
  else:
    for name, v, dim, align in (("block_m", b.m, m, 8), ("block_n", b.n, n, 128),
                                ("block_k / codes_per_word", b.k_words, words, 128)):
      if v < dim and v % align:
        raise ValueError(
            f"on TPU {name}={v} must be a multiple of {align} (TPU blocks are multiples "
            f"of (8, 128)) or cover the whole dimension ({dim})")
  return b


# ----------------------------------------------------------------------------------------
# Pallas kernels.


def _split_refs(refs, has_scale, has_bias, n_out_scratch):
  x_ref, w_ref = refs[:2]
  i = 2
  s_ref = b_ref = None
  if has_scale:
    s_ref, i = refs[i], i + 1
  if has_bias:
    b_ref, i = refs[i], i + 1
  return x_ref, w_ref, s_ref, b_ref, refs[i:i + n_out_scratch]


def _apply_epilogue(acc, s_ref, b_ref):
  if s_ref is not None:
    acc = acc * s_ref[...]
  if b_ref is not None:
    acc = acc + b_ref[...]
  return acc


def _tpu_kernel(*refs, bits, e0, has_scale, has_bias):
  """Grid (i, j, k): x_ref [P, bm, bkw], w_ref [bkw, bn] uint32, o_ref [bm, bn] f32,
  acc_ref [bm, bn] f32 VMEM scratch."""
  x_ref, w_ref, s_ref, b_ref, (o_ref, acc_ref) = _split_refs(
      refs, has_scale, has_bias, 2)
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  words = w_ref[...]
  acc = acc_ref[...]
  for j in range(codes_per_word(bits)):
    w_j = decode_slot(words, j, bits, e0, x_ref.dtype)
    acc += jnp.dot(x_ref[j], w_j, precision=_dot_precision(x_ref.dtype),
                   preferred_element_type=jnp.float32)
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = _apply_epilogue(acc_ref[...], s_ref, b_ref).astype(o_ref.dtype)


def _real_rows(bm, m):
  """``[bm, 1]`` bool: which rows of this program's M tile are among x's ``m`` rows."""
  rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  return rows < m


def _x_rows_loader(x_ref, m):
  """``load(j, start, k_words)`` -> ``x_ref[j, :, start:start + k_words]`` (``[bm,
  k_words]``) for the GPU kernels. Rows of the tile past x's ``m`` rows (where the last
  tile overhangs x, e.g. 15 of the 16 rows a tensor-core dot takes at M = 1) are masked:
  zero, and not read (they lie outside x's buffer). Every (M, N) tile reads its x rows
  once per output-column tile, so reading zero rows would multiply that traffic by
  ``bm / m``.
  """
  bm = x_ref.shape[1]
  real = _real_rows(bm, m)

  def load(j, start, k_words):
    # An array index: the interpreter's masked-load rule does not take a Python int.
    ref = x_ref.at[jnp.int32(j), :, pl.ds(start, k_words)]
    if m % bm == 0:  # no tile overhangs x
      return ref[...]
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    # All True on the tiles before the last: one kernel for every tile.
    return pltriton.load(ref, mask=jnp.broadcast_to(real, (bm, k_words)),
                         other=jnp.zeros((), x_ref.dtype))

  return load


def _store_rows(o_ref, value, m):
  """``o_ref[...] = value`` for the GPU kernels, with the rows past x's ``m`` rows not
  written: the output has ``m`` rows, so an overhanging tile's last rows lie outside it.
  At M = 1 a 16-row tile so writes one float32 row, not sixteen (with ``split_k`` 8 at
  K = N = 4096, sixteen rows were 1.9 MiB of writes next to 8 MiB of packed weights).
  """
  bm = o_ref.shape[0]
  if m % bm == 0:
    o_ref[...] = value
    return
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  pltriton.store(o_ref, value, mask=jnp.broadcast_to(_real_rows(bm, m), value.shape))


def _gpu_kernel(*refs, bits, e0, has_scale, has_bias, k_words, num_k, m):
  """Grid (i, j): x_ref [P, bm, Kw], w_ref [Kw, bn] uint32, o_ref [bm, bn] f32; the
  program walks K in steps of ``k_words`` words with the accumulator in registers."""
  x_ref, w_ref, s_ref, b_ref, (o_ref,) = _split_refs(refs, has_scale, has_bias, 1)
  bm, bn = o_ref.shape
  load_x = _x_rows_loader(x_ref, m)

  def body(step, acc):
    start = pl.multiple_of(step * k_words, k_words)
    words = w_ref[pl.ds(start, k_words), :]
    for j in range(codes_per_word(bits)):
      w_j = decode_slot(words, j, bits, e0, x_ref.dtype)
      x_j = load_x(j, start, k_words)
      acc += jnp.dot(x_j, w_j, precision=_dot_precision(x_ref.dtype),
                     preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, num_k, body, jnp.zeros((bm, bn), jnp.float32))
  _store_rows(o_ref, _apply_epilogue(acc, s_ref, b_ref).astype(o_ref.dtype), m)


def _gpu_pairs_kernel(*refs, bits, e0, has_scale, has_bias, k_words, num_k, m):
  """Grid (i, j): x_ref [P/2, bm, 2 Kw] bfloat16 (pair-interleaved), w_ref [Kw, bn]
  uint32, o_ref [bm, bn] f32. The transposed product ``acc_t[bn, bm] += W_pair^T
  x_pair^T``: the weights are the tensor cores' A operand, whose registers hold two
  bfloat16 adjacent in K, so each word's decoded pair (``decode_pair_bf16``) is one
  operand register, code ``i`` at K ``2 w`` and code ``i + P/2`` at ``2 w + 1``."""
  x_ref, w_ref, s_ref, b_ref, (o_ref,) = _split_refs(refs, has_scale, has_bias, 1)
  bm, bn = o_ref.shape
  load_x = _x_rows_loader(x_ref, m)

  def body(step, acc):
    start = pl.multiple_of(step * k_words, k_words)
    words_t = w_ref[pl.ds(start, k_words), :].T  # [bn, Kw]
    for i in range(codes_per_word(bits) // 2):
      pairs = decode_pair_bf16(words_t, i, bits, e0)
      low = lax.bitcast_convert_type(pairs.astype(jnp.uint16), jnp.bfloat16)
      high = lax.bitcast_convert_type((pairs >> jnp.uint32(16)).astype(jnp.uint16),
                                      jnp.bfloat16)
      w_t = jnp.stack([low, high], axis=-1).reshape(bn, 2 * k_words)
      x_i = load_x(i, 2 * start, 2 * k_words)  # [bm, 2 Kw]
      acc += lax.dot_general(w_t, x_i, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, num_k, body, jnp.zeros((bn, bm), jnp.float32))
  _store_rows(o_ref, _apply_epilogue(acc.T, s_ref, b_ref).astype(o_ref.dtype), m)


def _gpu_fma_kernel(*refs, bits, e0, has_scale, has_bias, k_words, num_k, m):
  """The GPU kernel's CUDA-core variant (refs as ``_gpu_kernel``): products summed into
  a [bm, k_words, bn] float32 accumulator, reduced over k once after the loop."""
  x_ref, w_ref, s_ref, b_ref, (o_ref,) = _split_refs(refs, has_scale, has_bias, 1)
  bm, bn = o_ref.shape
  load_x = _x_rows_loader(x_ref, m)

  def body(step, acc):
    start = pl.multiple_of(step * k_words, k_words)
    words = w_ref[pl.ds(start, k_words), :]
    for j in range(codes_per_word(bits)):
      # float32 products with a power of two are exact: the sums of a float32 dot.
      w_j = decode_slot(words, j, bits, e0, jnp.float32)
      if bm == 1:
        x_j = x_ref[j, 0, pl.ds(start, k_words)].astype(jnp.float32)
        acc += x_j[:, None] * w_j
      else:
        x_j = load_x(j, start, k_words).astype(jnp.float32)
        acc += x_j[:, :, None] * w_j[None, :, :]
    return acc

  shape = (k_words, bn) if bm == 1 else (bm, k_words, bn)
  acc = lax.fori_loop(0, num_k, body, jnp.zeros(shape, jnp.float32))
  y = jnp.sum(acc, axis=0)[None] if bm == 1 else jnp.sum(acc, axis=1)
  _store_rows(o_ref, _apply_epilogue(y, s_ref, b_ref).astype(o_ref.dtype), m)


def _pad_to(a, shape):
  if tuple(a.shape) == tuple(shape):
    return a
  return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


@functools.partial(jax.jit, static_argnames=(
    "bits", "e0", "k", "platform", "interpret", "blocks", "num_stages"))
def _pallas_matmul(x2, packed, scale, bias, *, bits, e0, k, platform, interpret, blocks,
                   num_stages):
  m = x2.shape[0]
  n = packed.shape[1]
  p = codes_per_word(bits)
  words = packed.shape[0]
  split = blocks.split_k
  if platform == "gpu":  # Triton tiles are powers of two: always pad to whole tiles
    bm, bn, bkw = blocks.m, blocks.n, blocks.k_words
  else:  # a tile at least as large as the dim means "the whole dim", unpadded
    bm = min(blocks.m, m)
    bn = min(blocks.n, n)
    bkw = min(blocks.k_words, words)
  # Every K part holds a whole number of bkw steps (zero words pad the last ones).
  mp, np_, wp = _round_up(m, bm), _round_up(n, bn), _round_up(words, bkw * split)
  # The GPU kernels mask the rows past m (loads and stores): x and the output keep m rows
  # and the last M tile overhangs them. The TPU kernel has no masks: it pads to mp.
  rows = m if platform == "gpu" else mp

  pairs = platform == "gpu" and blocks.dot == "mma_pairs"
  x_padded = _pad_to(x2, (rows, wp * p))  # zero rows/columns for the padding
  if pairs:  # x_t[i, m, 2 w + h] = x[m, w * P + h * P/2 + i]
    x_t = x_padded.reshape(rows, wp, 2, p // 2).transpose(3, 0, 1, 2)
    x_t = x_t.reshape(p // 2, rows, 2 * wp)
  else:  # x_t[j, m, w] = x[m, w * P + j]
    x_t = x_padded.reshape(rows, wp, p).transpose(2, 0, 1)
  w = _pad_to(packed, (wp, np_))
  operands = [x_t, w]
  has_scale, has_bias = scale is not None, bias is not None
  for v, fill in ((scale, 1.0), (bias, 0.0)):
    if v is not None:
      v = v.astype(jnp.float32).reshape(1, n)
      if np_ != n:
        v = jnp.pad(v, ((0, 0), (0, np_ - n)), constant_values=fill)
      operands.append(v)

  cost = pl.CostEstimate(
      flops=2 * mp * np_ * wp * p, transcendentals=0,
      bytes_accessed=int(x_t.size * x_t.dtype.itemsize * (np_ // bn)
                         + w.size * 4 * (mp // bm) + split * rows * np_ * 4))
  out_shape = jax.ShapeDtypeStruct((rows, np_), jnp.float32)
  if split > 1:  # partial products; scale and bias after their sum
    operands, has_scale, has_bias = operands[:2], False, False
    out_shape = jax.ShapeDtypeStruct((split, rows, np_), jnp.float32)

  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    grid = (mp // bm, np_ // bn, wp // bkw)
    in_specs = [pl.BlockSpec((p, bm, bkw), lambda i, j, kk: (0, i, kk)),
                pl.BlockSpec((bkw, bn), lambda i, j, kk: (kk, j))]
    in_specs += [pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))] * (has_scale + has_bias)
    call = pl.pallas_call(
        functools.partial(_tpu_kernel, bits=bits, e0=e0, has_scale=has_scale,
                          has_bias=has_bias),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name=f"pow2_matmul_{bits}bit",
    )
  else:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    part = wp // split  # words per K part
    grid = (mp // bm, np_ // bn, split)
    x_block = (p // 2, bm, 2 * part) if pairs else (p, bm, part)
    in_specs = [pl.BlockSpec(x_block, lambda i, j, t: (0, i, t)),
                pl.BlockSpec((part, bn), lambda i, j, t: (t, j))]
    in_specs += [pl.BlockSpec((1, bn), lambda i, j, t: (0, j))] * (has_scale + has_bias)
    out_spec = (pl.BlockSpec((None, bm, bn), lambda i, j, t: (t, i, j)) if split > 1
                else pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)))
    kernel = {"fma": _gpu_fma_kernel, "mma_pairs": _gpu_pairs_kernel}.get(
        blocks.dot, _gpu_kernel)
    call = pl.pallas_call(
        functools.partial(kernel, bits=bits, e0=e0, has_scale=has_scale,
                          has_bias=has_bias, k_words=bkw, num_k=part // bkw, m=m),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        # Selects the Triton lowering (jax 0.10 defaults to Mosaic GPU).
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=num_stages),
        cost_estimate=cost,
        interpret=interpret,
        name=f"pow2_matmul_{bits}bit",
    )
  y = call(*operands)
  if split > 1:
    return xla_epilogue(jnp.sum(y[:, :, :n], axis=0), scale, bias)  # padding unread
  return y[:m, :n] if (rows, np_) != (m, n) else y


# ----------------------------------------------------------------------------------------
# Public entry point.


def pow2_matmul(x, packed, *, bits: int, e0: int, scale=None, bias=None,
                k: int | None = None, backend: str | None = None,
                platform: str | None = None, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None,
                split_k: int | None = None, gpu_dot: str | None = None,
                num_warps: int | None = None, num_stages: int | None = None):
  """``x @ decode(packed) * scale + bias`` with packed zero-free power-of-two weights.

  Args:
    x: float32 or bfloat16 ``[..., K]``.
    packed: uint32 ``[ceil(K / P), N]``, ``P = 32 // bits`` codes per word along K.
    bits: code width, 2..5 (all ``2**bits`` codes are values).
    e0: integer exponent of the smallest magnitude; code index i means ``+-2**(e0+i)``.
    scale: optional float32 ``[N]`` per-output-channel scale (e.g. folded BN).
    bias: optional float32 ``[N]`` per-output-channel bias.
    k: the logical K (optional; must equal ``x.shape[-1]``).
    backend: None, ``'xla'``, ``'native'``, ``'pallas'`` or ``'pallas_interpret'``
      (module docstring): None on CPU runs the native kernel where available.
    platform: ``'gpu'`` or ``'tpu'``: which Pallas kernel; default the default backend's
      (``'tpu'``'s K-grid kernel for ``'pallas_interpret'`` on CPU). Pass it to lower or
      ``jax.export`` for a platform this machine does not have.
    block_m, block_n: tile sizes in rows of x and output channels.
    block_k: tile size along K in codes; a multiple of ``P``.
    split_k: GPU only: K parts run as separate programs, summed in XLA (``Blocks``);
      default ``default_blocks``' choice (more than 1 only at M <= 16).
    gpu_dot: GPU only: ``'mma_pairs'`` (tensor-core dots of weights decoded two per
      register; bfloat16 x only, its default), ``'mma'`` (one code at a time; the default
      for float32 x) or ``'fma'`` (CUDA-core multiply-adds, for M of a few rows); see the
      module docstring.
    num_warps, num_stages: Triton launch parameters (GPU only; default
      ``default_blocks``' warps, 4 or 8, and Triton's 3 stages).
  Returns:
    float32 ``[..., N]``.
  Raises:
    ValueError: on unsupported bits/e0/dtypes, inconsistent shapes, bad tiles or backend,
      before anything is traced.
  """
  check_format(bits, e0)
  bits, e0 = int(bits), int(e0)
  requested = backend
  backend, platform = resolve_backend(backend, platform)
  k, n = _check_operands(x, packed, bits, scale, bias, k)
  lead = tuple(x.shape[:-1])
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  if backend == "native" or (backend == "xla" and requested is None):
    backend = _cpu_backend(x2, packed, bits, explicit=backend == "native")
  if backend == "native":
    y = _native_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k)
  elif backend == "xla":
    y = _xla_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k)
  else:
    interpret = backend == "pallas_interpret"
    blocks = _resolve_blocks(max(m, 1), n, k, bits, x.dtype, platform, interpret,
                             block_m, block_n, block_k, split_k, gpu_dot, num_warps)
    if m == 0 or n == 0:
      y = jnp.zeros((m, n), jnp.float32)
    else:
      y = _pallas_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k,
                         platform=platform, interpret=interpret, blocks=blocks,
                         num_stages=num_stages)
  return y.reshape(lead + (n,))

