"""The Pallas matmul's tiles: ``Blocks``, the defaults (``default_blocks``) and the checks
of a given ``Blocks`` against the platform it compiles for (``resolve_blocks``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib

GPU_DOTS = ("mma", "fma", "mma_pairs")
# The 'fma' accumulator's floats per program: 32 registers per thread at 4 warps.
FMA_MAX_ACCUMULATOR = 4096


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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
  (CUDA-core multiply-adds); see ``matmul_gpu``. ``num_warps``, ``num_stages`` (GPU
  only): Triton's warps per program and software-pipeline depth (None: Triton's 3).

  Frozen, so that it is a static argument of ``jax.jit``; a bad field raises a
  ValueError naming it when the value is made.
  """
  m: int
  n: int
  k_words: int
  split_k: int = 1
  dot: str = "mma"
  num_warps: int = 4
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("m", "n", "k_words", "split_k", "num_warps", "num_stages"):
      v = getattr(self, name)
      if (v is not None or name != "num_stages") and not (_is_int(v) and v > 0):
        raise ValueError(f"Blocks.{name} must be a positive integer, got {v!r}")
    if self.dot not in GPU_DOTS:
      raise ValueError(f"Blocks.dot must be one of {GPU_DOTS}, got {self.dot!r}")


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
  """Default tiles for an [m, k] @ [k, n] product on ``platform`` (``'gpu'`` or
  ``'tpu'``); ``dot`` is the GPU multiply (``GPU_DOTS``; None:
  ``default_dot(x_dtype)``)."""
  words = -(-k // codes_lib.codes_per_word(bits))
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
    x_row_bytes = codes_lib.codes_per_word(bits) * bm * jnp.dtype(x_dtype).itemsize
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
  x_row_bytes = codes_lib.codes_per_word(bits) * bm * jnp.dtype(x_dtype).itemsize
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


def resolve_blocks(blocks: Blocks | None, m: int, n: int, k: int, bits: int, x_dtype,
                   platform: str, interpret: bool) -> Blocks:
  """``blocks`` (None: ``default_blocks``) after checking it against ``platform``'s
  rules and x's dtype; ValueError naming the field otherwise. The interpreter takes any
  tile (small tiles keep CPU tests small)."""
  if blocks is None:
    return default_blocks(m, n, k, bits, x_dtype, platform)
  if not isinstance(blocks, Blocks):
    raise ValueError(f"blocks must be a Blocks (or None), got {blocks!r}")
  b = blocks
  if platform != "gpu" and b.dot != "mma":
    raise ValueError(f"Blocks.dot={b.dot!r} is for the GPU kernel only; the {platform} "
                     f"kernel multiplies with its own dot (use 'mma')")
  if b.dot == "mma_pairs" and jnp.dtype(x_dtype) != jnp.bfloat16:
    raise ValueError(
        f"Blocks.dot='mma_pairs' decodes the weights as bfloat16 pairs and multiplies "
        f"bfloat16 x; x is {jnp.dtype(x_dtype)} (use dot='mma' or cast x)")
  if platform != "gpu" and b.split_k != 1:
    raise ValueError(f"Blocks.split_k={b.split_k} is for the GPU kernel only; the "
                     f"{platform} kernel walks K on its grid (use 1)")
  if interpret:
    return b
  words = -(-k // codes_lib.codes_per_word(bits))
  if platform == "gpu" and (b.num_warps & (b.num_warps - 1) or b.num_warps > 32):
    raise ValueError(
        f"Blocks.num_warps must be a power of two <= 32 (Triton), got {b.num_warps}")
  if platform == "gpu" and b.dot == "fma":
    for name, v in (("m", b.m), ("n", b.n), ("k_words", b.k_words)):
      if v & (v - 1):
        raise ValueError(f"on GPU (Triton) Blocks.{name} must be a power of two, got {v}")
    if b.m * b.k_words * b.n > FMA_MAX_ACCUMULATOR:
      raise ValueError(
          f"Blocks.dot='fma' accumulates m * k_words * n = {b.m} * {b.k_words} * {b.n} = "
          f"{b.m * b.k_words * b.n} floats in registers; keep it <= "
          f"{FMA_MAX_ACCUMULATOR}")
  elif platform == "gpu":
    for name, v in (("m", b.m), ("n", b.n), ("k_words", b.k_words)):
      if v < 16 or v & (v - 1):
        raise ValueError(
            f"on GPU (Triton) Blocks.{name} must be a power of two >= 16, got {v}")
  else:
    for name, v, dim, align in (("m", b.m, m, 8), ("n", b.n, n, 128),
                                ("k_words", b.k_words, words, 128)):
      if v < dim and v % align:
        raise ValueError(
            f"on TPU Blocks.{name}={v} must be a multiple of {align} (TPU blocks are "
            f"multiples of (8, 128)) or cover the whole dimension ({dim})")
  return b
