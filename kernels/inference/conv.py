"""NHWC convolution by packed zero-free power-of-two weights.

The HWIO kernel's codes are flattened to ``[kh * kw * I, O]`` (row ``(dy * kw + dx) * I + c``,
i.e. the C-order reshape of HWIO) and packed along that contraction axis like a
``pow2_matmul`` weight. The XLA path decodes the kernel and calls
``lax.conv_general_dilated``; the Pallas path builds image patches in the same
``(dy, dx, c)`` order (im2col) and calls ``pow2_matmul``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax.kernels.inference import matmul as mm


def _pair(v, name) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    v = (v, v)
  v = tuple(v)
  if len(v) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                            and s >= 1 for s in v):
    raise ValueError(f"{name} must be a positive integer or a pair of them, got {v!r}")
  return int(v[0]), int(v[1])


def _padding(padding, in_hw, kernel_hw, strides):
  """'SAME' | 'VALID' | ((lo, hi), (lo, hi)) -> explicit pads, as lax computes them."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got "
                       f"{padding!r}")
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides,
                                                       padding.upper()))
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    pads = ()
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)) with "
                     f"non-negative ints, got {padding!r}")
  return pads


def _im2col(x, kernel_hw, strides, pads):
  """[B, H, W, C] -> [B, Ho, Wo, kh * kw * C] patches, feature order (dy, dx, c)."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  _, hp, wp, _ = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  cols = [x[:, dy:dy + (ho - 1) * sh + 1:sh, dx:dx + (wo - 1) * sw + 1:sw, :]
          for dy in range(kh) for dx in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def pow2_conv(x, packed, *, bits: int, e0: int, kernel_shape: Sequence[int],
              strides=1, padding="SAME", scale=None, bias=None,
              backend: str | None = None, platform: str | None = None, **block_kwargs):
  """Convolution of NHWC ``x`` with a packed HWIO power-of-two kernel.

  Args:
    x: float32 or bfloat16 ``[B, H, W, I]``.
    packed: uint32 ``[ceil(kh * kw * I / P), O]``: the HWIO codes reshaped to
      ``[kh * kw * I, O]`` and packed along axis 0 (``P = 32 // bits``).
    bits, e0: the zero-free code format (``pow2_matmul``).
    kernel_shape: ``(kh, kw, I, O)``.
    strides: int or (sh, sw).
    padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
    scale, bias: optional float32 ``[O]``.
    backend, platform: as ``pow2_matmul`` (None: Pallas im2col + matmul on GPU/TPU,
      decode + ``lax.conv_general_dilated`` on CPU).
    **block_kwargs: ``block_m``, ``block_n``, ``block_k``, ``num_warps``, ``num_stages``
      for the Pallas matmul.
  Returns:
    float32 ``[B, Ho, Wo, O]``.
  """
  mm.check_format(bits, e0)
  bits, e0 = int(bits), int(e0)
  backend, platform = mm.resolve_backend(backend, platform)
  kernel_shape = tuple(kernel_shape)
  if len(kernel_shape) != 4 or not all(
      isinstance(d, (int, np.integer)) and d >= 1 for d in kernel_shape):
    raise ValueError(f"kernel_shape must be (kh, kw, I, O) positive ints, got "
                     f"{kernel_shape!r}")
  kh, kw, cin, cout = (int(d) for d in kernel_shape)
  if x.ndim != 4:
    raise ValueError(f"x must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")
  if x.shape[-1] != cin:
    raise ValueError(f"x has {x.shape[-1]} channels but kernel_shape {kernel_shape} "
                     f"expects I={cin}")
  k = kh * kw * cin
  p = mm.codes_per_word(bits)
  if tuple(packed.shape) != (-(-k // p), cout):
    raise ValueError(
        f"kernel_shape {kernel_shape} packs to ({-(-k // p)}, {cout}) words "
        f"(K = kh*kw*I = {k}, {p} codes per word), got packed shape "
        f"{tuple(packed.shape)}")
  strides = _pair(strides, "strides")
  pads = _padding(padding, tuple(x.shape[1:3]), (kh, kw), strides)
  unknown = set(block_kwargs) - {"block_m", "block_n", "block_k", "num_warps",
                                 "num_stages"}
  if unknown:
    raise TypeError(f"pow2_conv got unexpected keyword arguments {sorted(unknown)}")

  if backend == "xla":
    # Checks dtypes and the scale/bias shapes with the matmul's messages.
    mm._check_operands(  # pylint: disable=protected-access
        jax.ShapeDtypeStruct((1, k), x.dtype), packed, bits, scale, bias, k)
    return _xla_conv(x, packed, scale, bias, bits=bits, e0=e0,
                     kernel_shape=(kh, kw, cin, cout), strides=strides, pads=pads)
  patches = _im2col(x, (kh, kw), strides, pads)
  return mm.pow2_matmul(patches, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                        backend=backend, platform=platform, **block_kwargs)


@functools.partial(jax.jit,
                   static_argnames=("bits", "e0", "kernel_shape", "strides", "pads"))
def _xla_conv(x, packed, scale, bias, *, bits, e0, kernel_shape, strides, pads):
  kh, kw, cin, cout = kernel_shape
  fmt = codes_lib.CodeFormat(bits=bits, e0=e0)
  w = codes_lib.decode(mm.unpack_codes(packed, bits, kh * kw * cin), fmt, x.dtype)
  y = lax.conv_general_dilated(
      x, w.reshape(kernel_shape), window_strides=strides, padding=pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
      preferred_element_type=jnp.float32)
  return mm.xla_epilogue(y, scale, bias)
