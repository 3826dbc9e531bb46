"""ImageNet ResNets 18/34/50 (v1.5: stride in the 3x3 conv of bottlenecks)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax import quantizers as qz
from shiftjax.models import blocks
from shiftjax.models import quantization
from shiftjax.policy import LayerPolicy


class ImageNetResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, four stages (64-128-256-512), global pool, classifier.

  Input: float images [N, H, W, 3], normalized. Output: logits [N, num_classes].
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  num_classes: int = 1000
  fast_grad: bool | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = {"basic": blocks.BasicBlock, "bottleneck": blocks.BottleneckBlock}[self.block]
    conv, norm = blocks.conv_and_norm(train, fast_grad=self.fast_grad, dtype=self.dtype)
    x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = blocks.residual_stages(x, block, self.stage_sizes, (64, 128, 256, 512), conv, norm)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


def _factory(name: str, stage_sizes: Sequence[int], block: str):
  def make(num_classes: int = 1000, quantizer: qz.Quantizer | None = None, *,
           policy: LayerPolicy | None = None, **kwargs) -> ImageNetResNet:
    model = ImageNetResNet(stage_sizes=tuple(stage_sizes), block=block,
                           num_classes=num_classes, **kwargs)
    return quantization.shift_model(model, quantizer, policy)
  make.__name__ = name
  make.__doc__ = (f"ImageNet {name} (see ``ImageNetResNet``), quantized by ``quantizer`` "
                  "or ``policy`` (``models.quantization.shift_model``).")
  return make


resnet18 = _factory("resnet18", (2, 2, 2, 2), "basic")
resnet34 = _factory("resnet34", (3, 4, 6, 3), "basic")
resnet50 = _factory("resnet50", (3, 4, 6, 3), "bottleneck")
