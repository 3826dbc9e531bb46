"""Optimizer pieces that know about quantizer latents (any model, linen or NNX).

A quantizer latent sits under its layer's ``'kernel'``, which is then a dict (linen
params, NNX ``ShiftKernel`` state) instead of the float array itself.
"""

from __future__ import annotations

import jax
import optax

from shiftjax import trees


def _is_latent(path) -> bool:
  """A quantizer latent sits one level under its layer's ``'kernel'`` dict; a float
  kernel is itself the leaf."""
  names = trees.path_names(path)
  return "kernel" in names[:-1]


def latent_mask(params):
  """True for the quantizer latents of ``params``."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_latent(path), params)


def weight_decay_mask(params, which: str):
  """True for parameters that get weight decay.

  'all' is the reference recipe (latents included), 'kernels' every ``'kernel'`` (float
  or latent), 'all_but_latents' everything except quantizer latents: a latent's pull
  toward 0 is a pull toward its sign or exponent thresholds, not toward small weights.
  """
  def decide(path, _):
    names = trees.path_names(path)
    return (which == "all" or (which == "kernels" and "kernel" in names)
            or (which == "all_but_latents" and not _is_latent(path)))
  return jax.tree_util.tree_map_with_path(decide, params)


def scale_latent_updates(inner: optax.GradientTransformation,
                         scale: float) -> optax.GradientTransformation:
  """``inner`` with its updates of quantizer latents multiplied by ``scale``.

  Stateless on top of ``inner``: the optimizer state, and so a checkpoint, has the same
  structure at every scale (a run restores or exports under any ``latent_lr_scale``).
  """
  if scale == 1.0:
    return inner

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    scaled = jax.tree.map(lambda u, latent: u * scale if latent else u, updates,
                          latent_mask(updates))
    return scaled, state
  return optax.GradientTransformation(inner.init, update)
