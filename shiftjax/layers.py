"""Flax layers whose weights are power-of-two: ``ShiftConv`` and ``ShiftDense``.

These are the explicit layers, for a model written with shift layers by hand (as larq's
``QuantConv2D``): a layer keeps its quantizer's latents as its ``'kernel'`` parameter (a
dict of arrays) and computes with ``quantizer.weight(latents)``; with ``quantizer=None``
the kernel is an ordinary float array. A layer whose input is quantized
(``activation``, a ``shiftjax.activations`` spec) keeps that spec's learned parameters
(PACT's clipping range) as its ``'activation'`` parameter, a dict.

A float model's own ``nn.Conv``/``nn.Dense`` layers become the same thing by rules over
their paths with ``shiftjax.quantize_model`` (``shiftjax.interception``), which is how
the zoo's ResNets are quantized; the variables are the same at the same paths.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax.kernels.training import conv as conv_lib
from shiftjax import quantizers as qz
# The policy lives apart so that deployment can use it without flax; re-exported here.
from shiftjax.policy import DEFAULT_FULL_PRECISION, LayerPolicy, is_latent_kernel  # pylint: disable=unused-import

Dtype = Any


def he_fan_out_init() -> nn.initializers.Initializer:
  """Kaiming normal, fan-out: the reference ResNets' conv init (float layers)."""
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _QuantizedKernelMixin:
  """Creates the ``'kernel'`` param (float or latents) and returns the float weight;
  quantizes the layer's input when it has an ``activation`` spec."""

  def quantized_input(self, x: jax.Array) -> jax.Array:
    """``x`` through the layer's activation quantizer (unchanged without one)."""
    spec = self.activation
    if spec is None:
      return x
    params = (self.param("activation", lambda key: spec.init(self.param_dtype))
              if spec.param_shapes() else {})
    return spec.quantize(params, x)

  def kernel_weight(self, shape: tuple[int, ...]) -> jax.Array:
    quantizer = self.quantizer
    if quantizer is None:
      return self.param("kernel", self.kernel_init, shape, self.param_dtype)
    latents = self.param("kernel", lambda key, s: quantizer.init(key, s, self.param_dtype),
                         shape)
    return quantizer.weight(latents)


class ShiftConv(_QuantizedKernelMixin, nn.Module):
  """2-D convolution over NHWC input with an HWIO power-of-two kernel.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or explicit ((lo, hi), (lo, hi)).
    quantizer: spec of the kernel, or None for a float kernel.
    activation: spec of the input (``shiftjax.activations``), or None for float input.
    fast_grad: CPU-fast kernel gradient (``shiftjax.kernels.training.conv``); None = on for CPU only.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = False
  quantizer: qz.Quantizer | None = None
  activation: Any = None
  fast_grad: bool | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = he_fan_out_init()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.quantized_input(x)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.kernel_weight(shape).astype(self.dtype)
    y = conv_lib.conv2d(x.astype(self.dtype), kernel, tuple(self.strides), self.padding,
                        fast_grad=self.fast_grad)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y


class ShiftDense(_QuantizedKernelMixin, nn.Module):
  """Dense layer ``x @ W + b`` with an ``(in, out)`` power-of-two or float kernel; its
  ``quantizer`` and ``activation`` as ``ShiftConv``'s."""
  features: int
  use_bias: bool = True
  quantizer: qz.Quantizer | None = None
  activation: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.quantized_input(x)
    kernel = self.kernel_weight((x.shape[-1], self.features)).astype(self.dtype)
    y = jnp.dot(x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return y

