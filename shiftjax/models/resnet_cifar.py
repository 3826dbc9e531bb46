"""CIFAR ResNets (He et al. 2016): depth 6n+2, widths 16-32-64, basic blocks.

As in the S3/DenseShift reference code, shortcuts that change shape are 1x1 convs
(quantized with the rest); the stem conv and the classifier stay full precision.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax import layers
from shiftjax import quantizers as qz
from shiftjax.models import blocks


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images.

  Attributes:
    depth: 6n + 2 (8, 20, 32, 44, 56, 110).
    num_classes: classifier outputs.
    width_multiplier: scales the 16-32-64 stage widths.
    quantizer: spec for the quantized convs (None: a float model).
    full_precision: glob patterns of layers that stay float (see ``LayerPolicy``).
    layer_quantizers: ``(pattern, spec)`` rules: per-layer weight specs (mixed widths).
    activation: input spec of the quantized layers (``shiftjax.activations``; None:
      float activations).
    layer_activations: ``(pattern, activation spec or None)`` rules (stem, head, ...).
    fast_grad: CPU-fast conv gradients (None: on for CPU).
  Input: float images [N, H, W, C], already normalized. Output: logits [N, num_classes].
  """
  depth: int = 20
  num_classes: int = 10
  width_multiplier: float = 1.0
  quantizer: qz.Quantizer | None = None
  full_precision: tuple[str, ...] = layers.DEFAULT_FULL_PRECISION
  layer_quantizers: tuple = ()
  activation: Any = None
  layer_activations: tuple = ()
  fast_grad: bool | None = None
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    policy = layers.policy_of(self)
    conv, norm = blocks.conv_and_norm(policy, train, fast_grad=self.fast_grad,
                                      dtype=self.dtype)
    widths = [int(round(w * self.width_multiplier)) for w in (16, 32, 64)]
    x = conv(widths[0], (3, 3), name="stem")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    n = (self.depth - 2) // 6
    x = blocks.residual_stages(x, blocks.BasicBlock, [n] * 3, widths, conv, norm)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.ShiftDense(self.num_classes, policy=policy, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


def _factory(depth: int):
  def make(num_classes: int = 10, quantizer=None, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, num_classes=num_classes, quantizer=quantizer, **kwargs)
  make.__name__ = f"resnet{depth}"
  make.__doc__ = f"CIFAR ResNet-{depth} (see ``CifarResNet``)."
  return make


resnet8 = _factory(8)
resnet14 = _factory(14)
resnet20 = _factory(20)
resnet32 = _factory(32)
resnet44 = _factory(44)
resnet56 = _factory(56)
resnet110 = _factory(110)
