"""Tiny models that are not in the zoo, shared by the tests of quantize_model, fit, summarize,
PTQ and packing: a user's own float models in linen and NNX."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp


class LinenMLP(nn.Module):
  """A user's float MLP (linen), not from the zoo."""
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(16, name="fc1")(x))
    x = nn.LayerNorm(name="norm")(x)
    return self.dense(3, name="head")(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(nnx.relu(self.fc1(x))))


class LinenTinyViT(nn.Module):
  """Patch conv, attention (DenseGeneral inside), an Einsum and a head."""

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(8, (2, 2), strides=(2, 2), name="patch_embed")(images)
    x = x.reshape(x.shape[0], -1, 8)
    x = x + nn.MultiHeadDotProductAttention(2, name="attention")(x, x)
    x = nn.Einsum((8, 8), "btd,de->bte", name="mix")(x)
    return nn.Dense(4, name="head")(x.mean(axis=1))


class NnxTinyTransformer(nnx.Module):
  """Embedding, LinearGeneral q/k/v, an Einsum output projection, a Linear head."""

  def __init__(self, rngs, vocab=11, d=8, heads=2):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.qkv = nnx.LinearGeneral(d, (3, heads, d // heads), rngs=rngs)
    self.out = nnx.Einsum("bthk,hkd->btd", (heads, d // heads, d), (d,), rngs=rngs)
    self.conv = nnx.Conv(d, d, kernel_size=(3,), rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    q, k, v = jnp.moveaxis(self.qkv(x), 2, 0)
    att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k), axis=-1)
    x = x + self.out(jnp.einsum("bhqs,bshk->bqhk", att, v))
    return self.head(x + self.conv(x))


class LinenRawMixer(nn.Module):
  """Parameters the model's own code multiplies (no flax layer): a compact
  ``jnp.einsum`` weight and, in a ``setup`` submodule, ``x @ w``; a float scale too."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    heads = self.param("heads", nn.initializers.lecun_normal(), (x.shape[-1], 2, 4))
    h = jnp.einsum("bd,dhk->bhk", x * scale, heads).reshape(x.shape[0], 8)
    return _LinenProjection(name="proj")(nn.relu(h))


class _LinenProjection(nn.Module):
  def setup(self):
    self.w = self.param("w", nn.initializers.lecun_normal(), (8, 3))

  def __call__(self, h):
    return h @ self.w


class NnxRawMixer(nnx.Module):
  """``LinenRawMixer`` in NNX: the same parameter paths and shapes."""

  def __init__(self, rngs, d=5):
    init = nnx.initializers.lecun_normal()
    self.scale = nnx.Param(jnp.ones((d,)))
    self.heads = nnx.Param(init(rngs.params(), (d, 2, 4)))
    self.proj = _NnxProjection(rngs)

  def __call__(self, x):
    h = jnp.einsum("bd,dhk->bhk", x * self.scale[...], self.heads).reshape(x.shape[0], 8)
    return self.proj(nnx.relu(h))


class _NnxProjection(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (8, 3)))

  def __call__(self, h):
    return h @ self.w


X = jax.random.normal(jax.random.key(3), (4, 5))
IMAGES = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
