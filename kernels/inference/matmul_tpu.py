"""``pow2_matmul``'s TPU (Mosaic) kernel.

Grid ``(M/bm, N/bn, K/bk)``, the K axis ``"arbitrary"``: a float32 VMEM accumulator
zeroed at ``k == 0``, ``P`` dots of ``x_t[j] @ W_j`` per step (``W_j`` code ``j`` of every
word, ``decode_slot``) and the scale/bias epilogue at the last k step, as jax's own
Pallas TPU matmul. The operands come laid out and padded by ``matmul_pallas``.
"""

from __future__ import annotations

import functools

from jax.experimental import pallas as pl
import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax.kernels.inference.in_kernel import apply_epilogue
from shiftjax.kernels.inference.in_kernel import decode_slot
from shiftjax.kernels.inference.in_kernel import split_refs
from shiftjax.kernels.inference.matmul_xla import dot_precision


def _tpu_kernel(*refs, bits, e0, has_scale, has_bias):
  """Grid (i, j, k): x_ref [P, bm, bkw], w_ref [bkw, bn] uint32, o_ref [bm, bn] f32,
  acc_ref [bm, bn] f32 VMEM scratch."""
  x_ref, w_ref, s_ref, b_ref, (o_ref, acc_ref) = split_refs(refs, has_scale, has_bias, 2)
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  words = w_ref[...]
  acc = acc_ref[...]
  for j in range(codes_lib.codes_per_word(bits)):
    w_j = decode_slot(words, j, bits, e0, x_ref.dtype)
    acc += jnp.dot(x_ref[j], w_j, precision=dot_precision(x_ref.dtype),
                   preferred_element_type=jnp.float32)
  acc_ref[...] = acc

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = apply_epilogue(acc_ref[...], s_ref, b_ref).astype(o_ref.dtype)


def tpu_call(*, bits, e0, tiles, padded, has_scale, has_bias, out_shape, cost, interpret):
  """The ``pallas_call`` of the TPU kernel over ``(x_t [P, Mp, Wp], words [Wp, Np],
  scale?, bias?)``; ``tiles`` is ``(bm, bn, bkw)``, ``padded`` is ``(Mp, Np, Wp)``."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  bm, bn, bkw = tiles
  mp, np_, wp = padded
  p = codes_lib.codes_per_word(bits)
  in_specs = [pl.BlockSpec((p, bm, bkw), lambda i, j, kk: (0, i, kk)),
              pl.BlockSpec((bkw, bn), lambda i, j, kk: (kk, j))]
  in_specs += [pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))] * (has_scale + has_bias)
  return pl.pallas_call(
      functools.partial(_tpu_kernel, bits=bits, e0=e0, has_scale=has_scale,
                        has_bias=has_bias),
      out_shape=out_shape,
      grid=(mp // bm, np_ // bn, wp // bkw),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name=f"pow2_matmul_{bits}bit",
  )
