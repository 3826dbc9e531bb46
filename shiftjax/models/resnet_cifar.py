"""CIFAR ResNets (He et al. 2016): depth 6n+2, widths 16-32-64, basic blocks.

As in the S3/DenseShift reference code, shortcuts that change shape are 1x1 convs
(quantized with the rest); the stem conv and the classifier stay full precision. The
module is a float model; the factories quantize it (``models.quantization``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax import quantizers as qz
from shiftjax.models import blocks
from shiftjax.models import quantization
from shiftjax.policy import LayerPolicy


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images.

  Attributes:
    depth: 6n + 2 (8, 20, 32, 44, 56, 110).
    num_classes: classifier outputs.
    width_multiplier: scales the 16-32-64 stage widths.
    fast_grad: CPU-fast conv gradients (None: on for CPU).
  Input: float images [N, H, W, C], already normalized. Output: logits [N, num_classes].
  """
  depth: int = 20
  num_classes: int = 10
  width_multiplier: float = 1.0
  fast_grad: bool | None = None
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {self.depth}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv, norm = blocks.conv_and_norm(train, fast_grad=self.fast_grad, dtype=self.dtype)
    widths = [int(round(w * self.width_multiplier)) for w in (16, 32, 64)]
    x = conv(widths[0], (3, 3), name="stem")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    n = (self.depth - 2) // 6
    x = blocks.residual_stages(x, blocks.BasicBlock, [n] * 3, widths, conv, norm)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


def _factory(depth: int):
  def make(num_classes: int = 10, quantizer: qz.Quantizer | None = None, *,
           policy: LayerPolicy | None = None, **kwargs) -> CifarResNet:
    return quantization.shift_model(CifarResNet(depth=depth, num_classes=num_classes,
                                                **kwargs), quantizer, policy)
  make.__name__ = f"resnet{depth}"
  make.__doc__ = (f"CIFAR ResNet-{depth} (see ``CifarResNet``), quantized by ``quantizer`` "
                  "or ``policy`` (``models.quantization.shift_model``).")
  return make


resnet8 = _factory(8)
resnet14 = _factory(14)
resnet20 = _factory(20)
resnet32 = _factory(32)
resnet44 = _factory(44)
resnet56 = _factory(56)
resnet110 = _factory(110)
