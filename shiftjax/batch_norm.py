"""BatchNorm whose training gradient reads each activation as few times as it can (issue 7).

``BatchNorm`` is a drop-in for ``flax.linen.BatchNorm`` over the last (channel) axis: the
same variables (``params`` scale/bias, ``batch_stats`` mean/var), the same statistics
(``E[x^2] - E[x]^2`` clamped at 0, in float32), the same running-average update and the
same forward arithmetic, so checkpoints move between the two and outputs are equal. Only
the training-mode gradient differs: it is written by hand (``normalize``, a
``jax.custom_vjp``) as

    sum_g  = sum(g),   sum_gx = sum(g * x)
    dbias  = sum_g,    dscale = (sum_gx - mean * sum_g) * inv
    dx     = scale * inv * (g - sum_g / m - (x - mean) * inv * dscale / m)

with ``inv = rsqrt(var + eps)`` and m the number of values per channel.

Why: a ResNet training step on a CPU waits on memory (an 8 MiB activation takes about a
millisecond to stream here), and autodiff of flax's formula makes XLA store the centered
``x - mean`` in the forward pass and the normalized ``(x - mean) * inv`` in the backward
pass, since the reductions that consume them run in a library that takes its inputs from
memory. The reductions above read only g and x, which exist anyway, and dx is one
elementwise pass. ``sum_gx - mean * sum_g`` is the centered sum computed the
way flax computes the variance, with the same cancellation when ``|mean| >> std``.

The custom gradient has no forward mode (``jax.jvp``, grad of grad), like ``shiftjax.kernels.training.conv``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel (mean, var) over all axes but the last, float32, as flax computes them."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  mean_of_squares = jnp.square(x).mean(axes)
  return mean, jnp.maximum(0.0, mean_of_squares - jnp.square(mean))


def affine(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
           epsilon: float) -> jax.Array:
  """``(x - mean) * (rsqrt(var + eps) * scale) + bias``, in flax's order of operations."""
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """Training-mode BatchNorm of x [..., C] with its batch statistics; float32 result."""
  return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
  mean, var = batch_stats(x)
  return affine(x, mean, var, scale, bias, epsilon), (x, mean, var, scale)


def _normalize_bwd(epsilon, residuals, g):
  x, mean, var, scale = residuals
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  x32 = x.astype(g.dtype)
  inv = lax.rsqrt(var + epsilon)
  sum_g = g.sum(axes)
  dscale = ((g * x32).sum(axes) - mean * sum_g) * inv
  dx = (scale * inv) * (g - sum_g / m - (x32 - mean) * (inv * dscale / m))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), sum_g.astype(scale.dtype)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the channel axis with the gradient of ``normalize``.

  Attributes (as flax's): use_running_average, momentum (running = momentum * running +
  (1 - momentum) * batch), epsilon, dtype of the output (None: float32 or wider input),
  param_dtype, scale_init, bias_init.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, channels, self.param_dtype)
    bias = self.param("bias", self.bias_init, channels, self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, channels, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
    if self.use_running_average:
      y = affine(x, running_mean.value, running_var.value, scale, bias, self.epsilon)
    else:
      y = normalize(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        # The same reductions as inside normalize: XLA computes them once.
        mean, var = lax.stop_gradient(batch_stats(x))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    return y.astype(dtype)
