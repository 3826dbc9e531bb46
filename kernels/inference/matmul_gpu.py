"""``pow2_matmul``'s GPU (Triton) kernels.

Every Pallas grid axis runs in parallel on GPU (no ordered revisits of an output block,
no scratch memory), so the grid is ``(M/bm, N/bn, split_k)`` and each program loops over
its part of K with ``lax.fori_loop``, the accumulator in registers; with ``split_k > 1``
the parts' float32 partial products are summed in XLA (``Blocks``). Triton is selected
explicitly with ``jax.experimental.pallas.triton.CompilerParams``: the default GPU
lowering of jax 0.10 is Mosaic GPU, which cannot lower this dot.

Three ways to multiply (``Blocks.dot``), because small M is where shift weights pay off
and there the kernel's cost is the decode:
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

x and the output keep their M rows: the last M tile may overhang both, its rows past x's
end masked loads and stores, so that no call copies x to whole tiles or slices the
output's rows (at split_k 1 and a dividing N tile the kernel's output is the result).
"""

from __future__ import annotations

import functools

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax.kernels.inference.in_kernel import apply_epilogue
from shiftjax.kernels.inference.in_kernel import decode_pair_bf16
from shiftjax.kernels.inference.in_kernel import decode_slot
from shiftjax.kernels.inference.in_kernel import split_refs
from shiftjax.kernels.inference.matmul_xla import dot_precision
from shiftjax.kernels.inference.tiling import Blocks
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


def _k_loop(refs, *, has_scale, has_bias, k_words, num_k, m, acc_shape, step, finish):
  """The GPU kernels' frame: ``num_k`` steps of ``acc = step(acc, words, start, load_x)``
  (``words`` the step's uint32 ``[k_words, bn]`` tile, ``start`` its first word row,
  ``load_x`` the masked x loader), the float32 accumulator of ``acc_shape(bm, bn)`` in
  registers; then ``finish(acc)`` ``[bm, bn]``, with scale and bias, stored to the
  output's real rows."""
  x_ref, w_ref, s_ref, b_ref, (o_ref,) = split_refs(refs, has_scale, has_bias, 1)
  bm, bn = o_ref.shape
  load_x = _x_rows_loader(x_ref, m)

  def body(i, acc):
    start = pl.multiple_of(i * k_words, k_words)
    return step(acc, w_ref[pl.ds(start, k_words), :], start, load_x)

  acc = lax.fori_loop(0, num_k, body, jnp.zeros(acc_shape(bm, bn), jnp.float32))
  _store_rows(o_ref, apply_epilogue(finish(acc), s_ref, b_ref).astype(o_ref.dtype), m)


def _gpu_kernel(*refs, bits, e0, k_words, **frame):
  """Grid (i, j): x_ref [P, bm, Kw], w_ref [Kw, bn] uint32, o_ref [bm, bn] f32; the
  program walks K in steps of ``k_words`` words with the accumulator in registers."""
  dtype = refs[0].dtype

  def step(acc, words, start, load_x):
    for j in range(codes_lib.codes_per_word(bits)):
      w_j = decode_slot(words, j, bits, e0, dtype)
      x_j = load_x(j, start, k_words)
      acc += jnp.dot(x_j, w_j, precision=dot_precision(dtype),
                     preferred_element_type=jnp.float32)
    return acc

  _k_loop(refs, k_words=k_words, acc_shape=lambda bm, bn: (bm, bn), step=step,
          finish=lambda acc: acc, **frame)


def _gpu_pairs_kernel(*refs, bits, e0, k_words, **frame):
  """Grid (i, j): x_ref [P/2, bm, 2 Kw] bfloat16 (pair-interleaved), w_ref [Kw, bn]
  uint32, o_ref [bm, bn] f32. The transposed product ``acc_t[bn, bm] += W_pair^T
  x_pair^T``: the weights are the tensor cores' A operand, whose registers hold two
  bfloat16 adjacent in K, so each word's decoded pair (``decode_pair_bf16``) is one
  operand register, code ``i`` at K ``2 w`` and code ``i + P/2`` at ``2 w + 1``."""

  def step(acc, words, start, load_x):
    words_t = words.T  # [bn, Kw]
    bn = words_t.shape[0]
    for i in range(codes_lib.codes_per_word(bits) // 2):
      pairs = decode_pair_bf16(words_t, i, bits, e0)
      low = lax.bitcast_convert_type(pairs.astype(jnp.uint16), jnp.bfloat16)
      high = lax.bitcast_convert_type((pairs >> jnp.uint32(16)).astype(jnp.uint16),
                                      jnp.bfloat16)
      w_t = jnp.stack([low, high], axis=-1).reshape(bn, 2 * k_words)
      x_i = load_x(i, 2 * start, 2 * k_words)  # [bm, 2 Kw]
      acc += lax.dot_general(w_t, x_i, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return acc

  _k_loop(refs, k_words=k_words, acc_shape=lambda bm, bn: (bn, bm), step=step,
          finish=lambda acc: acc.T, **frame)


def _gpu_fma_kernel(*refs, bits, e0, k_words, **frame):
  """The GPU kernel's CUDA-core variant (refs as ``_gpu_kernel``): products summed into
  a [bm, k_words, bn] float32 accumulator, reduced over k once after the loop."""
  x_ref = refs[0]
  bm = x_ref.shape[1]

  def step(acc, words, start, load_x):
    for j in range(codes_lib.codes_per_word(bits)):
      # float32 products with a power of two are exact: the sums of a float32 dot.
      w_j = decode_slot(words, j, bits, e0, jnp.float32)
      if bm == 1:
        x_j = x_ref[j, 0, pl.ds(start, k_words)].astype(jnp.float32)
        acc += x_j[:, None] * w_j
      else:
        x_j = load_x(j, start, k_words).astype(jnp.float32)
        acc += x_j[:, :, None] * w_j[None, :, :]
    return acc

  _k_loop(refs, k_words=k_words, step=step,
          acc_shape=lambda bm, bn: (k_words, bn) if bm == 1 else (bm, k_words, bn),
          finish=lambda acc: jnp.sum(acc, axis=0)[None] if bm == 1 else jnp.sum(acc, axis=1),
          **frame)


def gpu_call(*, bits, e0, blocks: Blocks, padded, m, has_scale, has_bias, out_shape,
             cost, interpret):
  """The ``pallas_call`` of the GPU kernel ``blocks.dot`` selects over ``(x_t, words
  [Wp, Np], scale?, bias?)``: ``x_t`` is ``[P, M, Wp]``, or ``[P/2, M, 2 Wp]`` pair-
  interleaved for ``'mma_pairs'``; ``padded`` is ``(Mp, Np, Wp)``, M padded to whole
  tiles (x itself keeps its ``m`` rows)."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  p = codes_lib.codes_per_word(bits)
  bm, bn, bkw, split = blocks.m, blocks.n, blocks.k_words, blocks.split_k
  mp, np_, wp = padded
  part = wp // split  # words per K part
  x_block = (p // 2, bm, 2 * part) if blocks.dot == "mma_pairs" else (p, bm, part)
  in_specs = [pl.BlockSpec(x_block, lambda i, j, t: (0, i, t)),
              pl.BlockSpec((part, bn), lambda i, j, t: (t, j))]
  in_specs += [pl.BlockSpec((1, bn), lambda i, j, t: (0, j))] * (has_scale + has_bias)
  out_spec = (pl.BlockSpec((None, bm, bn), lambda i, j, t: (t, i, j)) if split > 1
              else pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)))
  kernel = {"fma": _gpu_fma_kernel, "mma_pairs": _gpu_pairs_kernel}.get(
      blocks.dot, _gpu_kernel)
  return pl.pallas_call(
      functools.partial(kernel, bits=bits, e0=e0, has_scale=has_scale,
                        has_bias=has_bias, k_words=bkw, num_k=part // bkw, m=m),
      out_shape=out_shape,
      grid=(mp // bm, np_ // bn, split),
      in_specs=in_specs,
      out_specs=out_spec,
      # Selects the Triton lowering (jax 0.10 defaults to Mosaic GPU).
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      cost_estimate=cost,
      interpret=interpret,
      name=f"pow2_matmul_{bits}bit",
  )
