"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 images, plain float linen.

No shiftjax layer and no quantization here: every matmul and conv is a standard Flax layer
(``nn.Conv``, ``nn.DenseGeneral`` inside ``nn.MultiHeadDotProductAttention``, ``nn.Dense``)
so that a rule-based quantizer can take the model as a user's own and swap them by module
path. The paths (``vit_tiny()``, depth 4):

  patch_embed                                    nn.Conv, kernel [p, p, C, d], stride p
  encoder_block{i}/attention/{query,key,value}   nn.DenseGeneral, kernel [d, heads, d/heads]
  encoder_block{i}/attention/out                 nn.DenseGeneral, kernel [heads, d/heads, d]
  encoder_block{i}/mlp/fc1, .../mlp/fc2          nn.Dense, [d, mlp_dim] and [mlp_dim, d]
  head                                           nn.Dense, [d, num_classes]

Besides them: ``pos_embed`` (learned position embedding [1, tokens, d]), ``cls_token``
(pooling ``'cls'`` only), LayerNorms ``encoder_block{i}/norm1``, ``.../norm2`` and
``norm``. The attention's score and value products multiply activations by activations,
not weights: they are not layers and stay float.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of a ViT. The defaults train on Fashion-MNIST on a 2-core CPU.

  Patch 7 (16 tokens) is the default for the CPU's sake: a batch-128 adam step took 0.2-0.3
  s against 0.9-1.1 s for patch 4 (49 tokens; same parameter count, 539,914) measured
  side by side on the shared 2-core machine; 150 s of adam at 1e-3 reached 82.0 % test
  top-1 (590 steps, 1.3 epochs) under load.

  Attributes:
    image_size: height and width of the square input images.
    patch_size: side of a square patch; must divide ``image_size``.
    hidden_dim: token width d.
    depth: number of encoder blocks.
    num_heads: attention heads; must divide ``hidden_dim``.
    mlp_dim: hidden width of each block's MLP.
    num_classes: logits out.
    pooling: ``'mean'`` (mean of the patch tokens) or ``'cls'`` (a learned class token).
    dropout_rate: dropout after attention and in the MLP when ``train`` (0: none).
  """
  image_size: int = 28
  patch_size: int = 7
  hidden_dim: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  num_classes: int = 10
  pooling: str = "mean"
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size {self.patch_size} does not divide image_size "
                       f"{self.image_size}")
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} does not divide hidden_dim "
                       f"{self.hidden_dim}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    for name in ("depth", "mlp_dim", "num_classes"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class MLP(nn.Module):
  """``fc2(gelu(fc1(x)))``: [..., d] -> [..., d]."""
  hidden_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.hidden_dim, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: [N, L, d] -> [N, L, d]."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = self.config
    y = nn.LayerNorm(name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, name="attention")(
        y, deterministic=True)
    x = x + nn.Dropout(c.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(name="norm2")(x)
    y = MLP(c.hidden_dim, c.mlp_dim, c.dropout_rate, name="mlp")(y, train)
    return x + nn.Dropout(c.dropout_rate, deterministic=not train)(y)


class ViT(nn.Module):
  """Vision Transformer. Input: float images [N, H, W, C], already normalized, H = W =
  ``config.image_size``. Output: logits [N, num_classes].

  With ``train=True`` and ``dropout_rate > 0`` it needs a ``'dropout'`` rng.
  """
  config: ViTConfig = ViTConfig()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    c = self.config
    if images.ndim != 4 or images.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"ViT expects images [N, {c.image_size}, {c.image_size}, C], "
                       f"got shape {images.shape}")
    p = c.patch_size
    x = nn.Conv(c.hidden_dim, (p, p), strides=(p, p), padding="VALID",
                name="patch_embed")(images)
    x = x.reshape(x.shape[0], -1, c.hidden_dim)  # [N, patches, d], row-major patches
    if c.pooling == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden_dim)), x], 1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = nn.Dropout(c.dropout_rate, deterministic=not train)(x + pos)
    for i in range(c.depth):
      x = EncoderBlock(c, name=f"encoder_block{i}")(x, train)
    x = nn.LayerNorm(name="norm")(x)
    x = x[:, 0] if c.pooling == "cls" else x.mean(axis=1)
    return nn.Dense(c.num_classes, name="head")(x)


def vit_tiny(num_classes: int = 10, **kwargs) -> ViT:
  """The default CPU-sized ViT (patch 7, d 128, depth 4, 4 heads, MLP 256): 539,914 params.

  ``kwargs`` override other ``ViTConfig`` fields.
  """
  return ViT(ViTConfig(num_classes=num_classes, **kwargs))
