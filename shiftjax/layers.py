"""Flax layers whose weights are power-of-two: ``ShiftConv`` and ``ShiftDense``.

A layer keeps its quantizer's latents as its ``'kernel'`` parameter (a dict of arrays)
and computes with ``quantizer.weight(latents)``; with ``quantizer=None`` the kernel is an
ordinary float array, so float and shift models share one definition.

Which layers are quantized is a ``LayerPolicy``: a quantizer plus glob patterns of
module paths (``'stem'``, ``'head'``, ``'stage3_*/*'``) that stay full precision or get
their own spec (mixed widths), and the activation spec of the layers' inputs. A layer
with a policy resolves its specs from its own path when it is first called. A layer
whose input is quantized (``shiftjax.activations``) keeps the quantizer's learned
parameters (PACT's clipping range) as its ``'activation'`` parameter, a dict.
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

# The model fields that make up a LayerPolicy (every shiftjax ResNet has them).
POLICY_FIELDS = ("quantizer", "full_precision", "layer_quantizers", "activation",
                 "layer_activations")


def policy_of(model) -> LayerPolicy:
  """The ``LayerPolicy`` of a module with the ``POLICY_FIELDS``."""
  return LayerPolicy(model.quantizer, tuple(model.full_precision),
                     tuple(tuple(r) for r in model.layer_quantizers), model.activation,
                     tuple(tuple(r) for r in model.layer_activations))

Dtype = Any


def he_fan_out_init() -> nn.initializers.Initializer:
  """Kaiming normal, fan-out: the reference ResNets' conv init (float layers)."""
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _QuantizedKernelMixin:
  """Creates the ``'kernel'`` param (float or latents) and returns the float weight;
  quantizes the layer's input when its policy says so."""

  def resolved_quantizer(self) -> qz.Quantizer | None:
    if self.policy is not None:
      return self.policy.quantizer_for(self.scope.path)
    return self.quantizer

  def quantized_input(self, x: jax.Array) -> jax.Array:
    """``x`` through the layer's activation quantizer (unchanged without one)."""
    spec = self.policy.activation_for(self.scope.path) if self.policy is not None else None
    if spec is None:
      return x
    params = (self.param("activation", lambda key: spec.init(self.param_dtype))
              if spec.param_shapes() else {})
    return spec.quantize(params, x)

  def kernel_weight(self, shape: tuple[int, ...]) -> jax.Array:
    quantizer = self.resolved_quantizer()
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
    policy: if given, overrides ``quantizer`` by the layer's path.
    fast_grad: CPU-fast kernel gradient (``shiftjax.kernels.training.conv``); None = on for CPU only.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = False
  quantizer: qz.Quantizer | None = None
  policy: LayerPolicy | None = None
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
  """Dense layer ``x @ W + b`` with an ``(in, out)`` power-of-two or float kernel."""
  features: int
  use_bias: bool = True
  quantizer: qz.Quantizer | None = None
  policy: LayerPolicy | None = None
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

