"""What the Pallas kernel bodies share: decoding packed words in registers, their refs'
order and the scale/bias epilogue. Runs inside a kernel, on Pallas refs and the values
loaded from them.

The kernels decode codes where they use them, from the packed words in registers/VMEM: a
shift and a mask pick code ``j`` of every word, the float's bits are assembled as
``sign << 31 | (127 + e0 + index) << 23`` and bitcast (no table, no multiply), as
``shiftjax.codes.decode`` does outside a kernel. ``decode_slot`` spells the assembly out
rather than calling it: the order of its ops is what the kernels' machine code was
measured with (benchmarks/gpu_kernel_sass.py).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from shiftjax import codes as codes_lib

_F32 = codes_lib.float_layout(jnp.float32)
_BF16 = codes_lib.float_layout(jnp.bfloat16)


def decode_slot(words: jax.Array, j: int, bits: int, e0: int, dtype) -> jax.Array:
  """Decodes code ``j`` of every uint32 word into ``dtype`` (float32 or bfloat16).

  ``sign << 31 | (127 + e0 + index) << 23`` is the float32 pattern of
  ``(-1)**sign * 2**(e0 + index)``; float32 -> bfloat16 of a power of two is exact.
  """
  code = (words >> jnp.uint32(j * bits)) & jnp.uint32((1 << bits) - 1)
  sign = code >> jnp.uint32(bits - 1)
  index = code & jnp.uint32((1 << (bits - 1)) - 1)
  pattern = (sign << jnp.uint32(31)) | (
      (index + jnp.uint32(_F32.bias + e0)) << jnp.uint32(_F32.mantissa_bits))
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
  p = codes_lib.codes_per_word(bits)
  half = p // 2
  # Constants are Python ints folded here: Triton's lowering takes no ops on constants.
  if half * bits != 16:  # 3 and 5 bits: codes half.. start at bit 15
    low = jnp.uint32((1 << (half * bits)) - 1)
    words = (words & low) | ((words << jnp.uint32(1)) & jnp.uint32(0xFFFF0000))
  at = i * bits  # the low code's first bit; the high code's is at + 16
  both = 0x00010001  # a 16-bit value in both halves
  mantissa = _BF16.mantissa_bits
  sign_mask = jnp.uint32(0x8000 * both)
  index_mask = jnp.uint32((((1 << (bits - 1)) - 1) << mantissa) * both)
  exponent = jnp.uint32(((_BF16.bias + e0) << mantissa) * both)
  sign_shift = 16 - at - bits  # the sign bit (at + bits - 1) -> bit 15
  index_shift = mantissa - at  # the index (bit at) -> bit 7
  shift = lambda v, s: v << jnp.uint32(s) if s >= 0 else v >> jnp.uint32(-s)
  sign = shift(words, sign_shift) & sign_mask
  index = shift(words, index_shift) & index_mask
  return (sign | index) + exponent


def split_refs(refs, has_scale, has_bias, n_out_scratch):
  """``(x_ref, w_ref, s_ref | None, b_ref | None, outputs and scratch)`` from a kernel's
  refs: the operands in ``pallas_call`` order, scale and bias only where given."""
  x_ref, w_ref = refs[:2]
  i = 2
  s_ref = b_ref = None
  if has_scale:
    s_ref, i = refs[i], i + 1
  if has_bias:
    b_ref, i = refs[i], i + 1
  return x_ref, w_ref, s_ref, b_ref, refs[i:i + n_out_scratch]


def apply_epilogue(acc, s_ref, b_ref):
  """``acc * scale + bias`` inside a kernel, either left out when its ref is None."""
  if s_ref is not None:
    acc = acc * s_ref[...]
  if b_ref is not None:
    acc = acc + b_ref[...]
  return acc
