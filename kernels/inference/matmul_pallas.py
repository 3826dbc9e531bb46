"""What ``pow2_matmul``'s two Pallas kernels share: the operands' layout and padding,
and the call of the TPU (``matmul_tpu``) or GPU (``matmul_gpu``) kernel on them.

Each kernel sums ``P`` dots of ``x[:, k = w * P + j] @ W_j`` per K step into a float32
accumulator, ``W_j`` code ``j`` of every packed word decoded in registers
(``in_kernel``). To give each of those dots a contiguous operand, ``x`` is re-laid out
once per call to ``x_t[j, m, w] = x[m, w * P + j]`` (an activation-sized XLA transpose,
cheap next to the weights for the small-M inference shapes the kernel is for).

Two grids, because GPU and TPU Pallas differ in how a reduction over K may be written:
TPU walks K on a grid axis, GPU in a loop inside each program (see their modules).

Padding: shapes that are not multiples of the blocks are zero-padded (x along K, and
along M on TPU; words along K and N, scale/bias along N) and the output sliced; on GPU x
and the output keep their M rows (``matmul_gpu``). A padded k row holds code 0
(``+2**e0``, finite) against x == 0 and so adds exactly 0. Padding the words copies the
weights on every call: pick N and K (or export pre-padded weights) so that the blocks
divide them; the defaults prefer blocks that divide the shape.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax.kernels.inference.matmul_gpu import gpu_call
from shiftjax.kernels.inference.matmul_tpu import tpu_call
from shiftjax.kernels.inference.matmul_xla import xla_epilogue


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def _pad_to(a, shape):
  if tuple(a.shape) == tuple(shape):
    return a
  return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


@functools.partial(jax.jit, static_argnames=(
    "bits", "e0", "k", "platform", "interpret", "blocks"))
def pallas_matmul(x2, packed, scale, bias, *, bits, e0, k, platform, interpret, blocks):
  """``x2 [M, K] @ decode(packed) * scale + bias``, float32 ``[M, N]``, on the Pallas
  kernel of ``platform`` with the checked tiles ``blocks`` (``tiling.resolve_blocks``)."""
  m = x2.shape[0]
  n = packed.shape[1]
  p = codes_lib.codes_per_word(bits)
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

  common = dict(bits=bits, e0=e0, padded=(mp, np_, wp), has_scale=has_scale,
                has_bias=has_bias, out_shape=out_shape, cost=cost, interpret=interpret)
  if platform == "tpu":
    call = tpu_call(tiles=(bm, bn, bkw), **common)
  else:
    call = gpu_call(blocks=blocks, m=m, **common)
  y = call(*operands)
  if split > 1:
    return xla_epilogue(jnp.sum(y[:, :, :n], axis=0), scale, bias)  # padding unread
  return y[:m, :n] if (rows, np_) != (m, n) else y

