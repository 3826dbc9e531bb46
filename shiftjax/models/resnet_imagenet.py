"""ImageNet ResNets 18/34/50 (v1.5: stride in the 3x3 conv of bottlenecks)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax import layers
from shiftjax import quantizers as qz
from shiftjax.models import blocks


class ImageNetResNet(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, four stages (64-128-256-512), global pool, classifier.

  Input: float images [N, H, W, 3], normalized. Output: logits [N, num_classes].
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  num_classes: int = 1000
  quantizer: qz.Quantizer | None = None
  full_precision: tuple[str, ...] = layers.DEFAULT_FULL_PRECISION
  layer_quantizers: tuple = ()
  activation: Any = None
  layer_activations: tuple = ()
  fast_grad: bool | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block = {"basic": blocks.BasicBlock, "bottleneck": blocks.BottleneckBlock}[self.block]
    policy = layers.policy_of(self)
    conv, norm = blocks.conv_and_norm(policy, train, fast_grad=self.fast_grad,
                                      dtype=self.dtype)
    x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = blocks.residual_stages(x, block, self.stage_sizes, (64, 128, 256, 512), conv, norm)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.ShiftDense(self.num_classes, policy=policy, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


def _factory(name: str, stage_sizes: Sequence[int], block: str):
  def make(num_classes: int = 1000, quantizer=None, **kwargs) -> ImageNetResNet:
    return ImageNetResNet(stage_sizes=tuple(stage_sizes), block=block,
                          num_classes=num_classes, quantizer=quantizer, **kwargs)
  make.__name__ = name
  make.__doc__ = f"ImageNet {name} (see ``ImageNetResNet``)."
  return make


resnet18 = _factory("resnet18", (2, 2, 2, 2), "basic")
resnet34 = _factory("resnet34", (3, 4, 6, 3), "basic")
resnet50 = _factory("resnet50", (3, 4, 6, 3), "bottleneck")
