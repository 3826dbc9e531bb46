"""Residual blocks shared by the CIFAR, ImageNet and speech ResNets.

Blocks take their conv and norm as fields (``conv: ModuleDef``), as in flax's ImageNet
example. The conv is flax's ``nn.Conv`` with the fast CPU gradient plugged in through its
``conv_general_dilated`` seam; quantization comes from outside, by ``quantize_model``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax import batch_norm
from shiftjax.kernels.training import conv as conv_lib
from shiftjax import layers

ModuleDef = Any


def conv_and_norm(train: bool, *, fast_grad=None,
                  dtype=jnp.float32) -> tuple[ModuleDef, ModuleDef]:
  """Conv and BatchNorm constructors for a model (init and BN as in the reference
  PyTorch code: He fan-out convs without bias, momentum 0.9, epsilon 1e-5).

  ``fast_grad`` (None: on when the default backend is the CPU) gives the convs their
  CPU-fast gradients and swaps flax's BatchNorm for ``shiftjax.batch_norm.BatchNorm``:
  the same variables and outputs, a gradient that streams fewer activations.
  """
  if fast_grad is None:
    fast_grad = conv_lib.default_fast_grad()
  conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=layers.he_fan_out_init(), dtype=dtype,
      conv_general_dilated=functools.partial(conv_lib.conv_general_dilated,
                                             fast_grad=fast_grad))
  norm = functools.partial(batch_norm.BatchNorm if fast_grad else nn.BatchNorm,
                           use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=dtype)
  return conv, norm


class ResidualBlock(nn.Module):
  """The fields of a residual block: its width, conv and norm constructors, the stride
  of its first strided conv and its activation."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: Sequence[int] = (1, 1)
  act: Callable = nn.relu


class BasicBlock(ResidualBlock):
  """Two 3x3 convs; a 1x1 conv shortcut (quantized too) when the shape changes."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    return _add_shortcut(self, x, self.norm(name="bn2")(y))


class BottleneckBlock(ResidualBlock):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50 v1.5)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = self.act(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)
    y = self.act(self.norm(name="bn2")(y))
    y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
    return _add_shortcut(self, x, self.norm(name="bn3")(y))


def _add_shortcut(block: ResidualBlock, x: jax.Array, y: jax.Array) -> jax.Array:
  """``act(y + x)`` at the end of ``block``'s compact call; ``x`` goes through a strided
  1x1 conv and a BatchNorm (``shortcut``, ``shortcut_bn``) when its shape is not y's."""
  if x.shape != y.shape:
    x = block.conv(y.shape[-1], (1, 1), block.strides, name="shortcut")(x)
    x = block.norm(name="shortcut_bn")(x)
  return block.act(y + x)


def residual_stages(x: jax.Array, block: ModuleDef, stage_sizes: Sequence[int],
                    stage_widths: Sequence[int], conv: ModuleDef, norm: ModuleDef,
                    first_stride: int = 1) -> jax.Array:
  """Stacks the stages; the first block of every stage but the first halves the size.

  Must be called inside a compact ``__call__``: blocks are named ``stage{i}_block{j}``
  under the calling module.
  """
  for i, (num_blocks, width) in enumerate(zip(stage_sizes, stage_widths)):
    for j in range(num_blocks):
      stride = (first_stride if i == 0 else 2) if j == 0 else 1
      x = block(width, conv=conv, norm=norm, strides=(stride, stride),
                name=f"stage{i + 1}_block{j}")(x)
  return x
