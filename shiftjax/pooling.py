"""Pooling shared by the flax models and the packed forward pass (plain jax, no flax)."""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

# How a SpeechResNet pools its [B, T, F, C] features into one vector per utterance.
POOLINGS = ("mean", "max", "meanmax")


def speech_pool(x: jax.Array, how: str) -> jax.Array:
  """``[B, T, F, C]`` -> ``[B, C]`` (``[B, 2C]`` for ``'meanmax'``): mean over frequency,
  then mean, max, or both side by side over time."""
  if how not in POOLINGS:
    raise ValueError(f"speech pooling must be one of {POOLINGS}, got {how!r}")
  over_freq = jnp.mean(x, axis=2)
  if how == "mean":
    return jnp.mean(over_freq, axis=1)
  if how == "max":
    return jnp.max(over_freq, axis=1)
  return jnp.concatenate([jnp.mean(over_freq, axis=1), jnp.max(over_freq, axis=1)], -1)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """NHWC max pooling; padded cells are -inf, so they never win (as ``flax.linen.max_pool``)."""
  pads = padding if isinstance(padding, str) else ((0, 0), *map(tuple, padding), (0, 0))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), pads)
