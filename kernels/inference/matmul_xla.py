"""``pow2_matmul``'s XLA path: unpack and decode the weights (``shiftjax.codes``), then
``lax.dot``. The CPU fallback, and the reference the native and Pallas kernels are tested
against; its epilogue and dot precision are shared with them."""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from shiftjax import codes as codes_lib


def dot_precision(dtype):
  """The precision of a dot of ``dtype`` operands: float32 x gets a true float32 product
  on every platform (TPU's default is bf16 passes, Triton's would be TF32); bfloat16 x is
  exact in one pass."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def xla_epilogue(y, scale, bias):
  """``y * scale + bias`` with either left out when None (the XLA paths' epilogue)."""
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


@functools.partial(jax.jit, static_argnames=("bits", "e0", "k"))
def xla_matmul(x2, packed, scale, bias, *, bits, e0, k):
  """``x2 [M, K] @ decode(packed) * scale + bias``, float32 ``[M, N]``."""
  fmt = codes_lib.CodeFormat(bits=bits, e0=e0)
  w = codes_lib.decode(codes_lib.unpack(packed, bits, k), fmt, x2.dtype)
  y = jnp.dot(x2, w, precision=dot_precision(x2.dtype),
              preferred_element_type=jnp.float32)
  return xla_epilogue(y, scale, bias)
