"""NHWC convolution by packed zero-free power-of-two weights.

The HWIO kernel's codes are flattened to ``[kh * kw * I, O]`` (row ``(dy * kw + dx) * I + c``,
i.e. the C-order reshape of HWIO) and packed along that contraction axis like a
``pow2_matmul`` weight. The XLA path decodes the kernel and calls ``fused_conv``; the
Pallas path builds image patches in the same ``(dy, dx, c)`` order (im2col) and calls
``pow2_matmul``.

``fused_conv`` is a layer's whole inference step on float weights: the conv, then
``* scale + bias``, ``+ residual`` and relu. On the CPU it runs on the native kernel
(``shiftjax.kernels.cpu.native``) with that epilogue applied in its registers, elsewhere (or
for shapes the native kernel does not take) on ``lax.conv_general_dilated`` and XLA ops.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax.kernels.cpu import native
from shiftjax.kernels.inference import matmul as mm
from shiftjax.kernels.inference.matmul_xla import xla_epilogue
from shiftjax.kernels.inference.tiling import Blocks


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


def fused_conv(x, kernel, *, strides=1, padding="SAME", scale=None, bias=None,
               residual=None, relu: bool = False):
  """``relu?(conv(x, kernel) * scale + bias + residual)``: one inference layer, NHWC/HWIO.

  Args:
    x: float32 or bfloat16 ``[B, H, W, I]``.
    kernel: float ``[kh, kw, I, O]`` (decoded power-of-two weights, or a float layer's).
    strides: int or (sh, sw).
    padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
    scale, bias: optional float32 ``[O]``.
    residual: optional float32 ``[B, Ho, Wo, O]``, added after scale and bias.
    relu: apply relu last.
  Returns:
    float32 ``[B, Ho, Wo, O]``. On the CPU, float32 operands and ``O`` a multiple of 16
    run on the native kernel with the epilogue fused; anything else is
    ``lax.conv_general_dilated`` (float32 accumulation) and XLA ops. The two agree up to
    float rounding (the sums run in another order).
  """
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"fused_conv takes NHWC x and an HWIO kernel with matching channels, "
                     f"got shapes {tuple(x.shape)} and {tuple(kernel.shape)}")
  strides = _pair(strides, "strides")
  pads = _padding(padding, tuple(x.shape[1:3]), tuple(kernel.shape[:2]), strides)
  _check_residual(residual, x.shape, kernel.shape, strides, pads)
  mm.check_epilogue(scale, bias, kernel.shape[-1])
  return _fused_conv(x, kernel, strides, pads, scale, bias, residual, relu,
                     native.supports_conv(x, kernel))


def _fused_conv(x, kernel, strides, pads, scale, bias, residual, relu, use_native):
  if use_native:
    return native.fused_conv(x, kernel, strides, pads, scale=scale, bias=bias,
                             residual=residual, relu=relu)
  y = lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=strides, padding=pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
      preferred_element_type=jnp.float32)
  return _residual_relu(xla_epilogue(y, scale, bias), residual, relu)


def _check_residual(residual, x_shape, kernel_shape, strides, pads):
  """The residual, if any, must have the conv output's shape (no silent broadcasting)."""
  if residual is None:
    return
  out = (x_shape[0], *native.output_hw(x_shape, kernel_shape, strides, pads),
         kernel_shape[-1])
  if tuple(residual.shape) != out:
    raise ValueError(f"residual must have the conv output's shape {out}, got "
                     f"{tuple(residual.shape)}")


def _residual_relu(y, residual, relu):
  if residual is not None:
    y = y + residual
  return jax.nn.relu(y) if relu else y


def pow2_conv(x, packed, *, bits: int, e0: int, kernel_shape: Sequence[int],
              strides=1, padding="SAME", scale=None, bias=None, residual=None,
              relu: bool = False, backend: str | None = None, platform: str | None = None,
              blocks: Blocks | None = None):
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
    residual: optional float32 ``[B, Ho, Wo, O]``, added after scale and bias.
    relu: apply relu last (a ResNet layer's whole step in one call; on the CPU the
      native conv applies scale, bias, residual and relu in its registers).
    backend, platform: as ``pow2_matmul`` (None: Pallas im2col + matmul on GPU/TPU,
      decode + ``fused_conv`` on CPU).
    blocks: the Pallas matmul's tiles (``pow2_matmul``) for its ``[B * Ho * Wo, kh * kw *
      I] @ [kh * kw * I, O]`` product; None: ``default_blocks``.
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
  p = codes_lib.codes_per_word(bits)
  if tuple(packed.shape) != (-(-k // p), cout):
    raise ValueError(
        f"kernel_shape {kernel_shape} packs to ({-(-k // p)}, {cout}) words "
        f"(K = kh*kw*I = {k}, {p} codes per word), got packed shape "
        f"{tuple(packed.shape)}")
  strides = _pair(strides, "strides")
  pads = _padding(padding, tuple(x.shape[1:3]), (kh, kw), strides)

  _check_residual(residual, x.shape, kernel_shape, strides, pads)
  if backend == "xla":
    # Checks dtypes and the scale/bias shapes with the matmul's messages.
    mm.check_operands(
        jax.ShapeDtypeStruct((1, k), x.dtype), packed, bits, scale, bias, k)
    # Whether the native conv runs is decided here, not in the jitted body: jit's cache
    # would otherwise keep a trace made while it was available (see native.disabled).
    use_native = native.supports_conv(x, jax.ShapeDtypeStruct((kh, kw, cin, cout), x.dtype))
    return _xla_conv(x, packed, scale, bias, residual, bits=bits, e0=e0,
                     kernel_shape=(kh, kw, cin, cout), strides=strides, pads=pads, relu=relu,
                     use_native=use_native)
  patches = _im2col(x, (kh, kw), strides, pads)
  y = mm.pow2_matmul(patches, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                     backend=backend, platform=platform, blocks=blocks)
  return _residual_relu(y, residual, relu)


@functools.partial(jax.jit, static_argnames=(
    "bits", "e0", "kernel_shape", "strides", "pads", "relu", "use_native"))
def _xla_conv(x, packed, scale, bias, residual, *, bits, e0, kernel_shape, strides, pads,
              relu, use_native):
  kh, kw, cin, _ = kernel_shape
  fmt = codes_lib.CodeFormat(bits=bits, e0=e0)
  w = codes_lib.decode(codes_lib.unpack(packed, bits, kh * kw * cin), fmt, x.dtype)
  return _fused_conv(x, w.reshape(kernel_shape), strides, pads, scale, bias, residual, relu,
                     use_native)
