"""BatchNorm folding into the packed layers of any linen model.

A BatchNorm in inference mode is a per-channel affine map ``y * s + t`` with
``s = scale / sqrt(var + epsilon)`` and ``t = bias - mean * s``. A power-of-two kernel
cannot absorb ``s`` (its codes would stop being powers of two), so a folded BatchNorm
becomes its layer's epilogue, as in the ResNet files (``deploy.folding``): the packed
layer applies ``s`` and ``t`` to its output, the BatchNorm becomes the identity and its
variables leave the packed model.

Which BatchNorms fold is found on one traced call of the model (``jax.make_jaxpr``): each
quantized layer's output and each BatchNorm's input pass through an optimization barrier
(a marker, in the trace only), and a BatchNorm folds into a layer when its input *is*
that layer's output and the program uses that output nowhere else. Any other BatchNorm
after a quantized layer stays as it is, and ``find_foldable`` says why (the output has
another user, the BatchNorm normalizes in training mode or over another axis than the
features, or the call runs inside a transform the trace does not look into).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from shiftjax import trees

# The packed variables' collection of the folded epilogues: {layer path: {scale, bias}}.
FOLDED_COLLECTION = "folded_norms"


@dataclasses.dataclass(frozen=True)
class Fold:
  """A BatchNorm (``norm``, with its ``epsilon``) folded into the layer at ``layer``."""
  layer: str
  norm: str
  epsilon: float


def is_batch_norm(module: nn.Module) -> bool:
  """flax's BatchNorm or a drop-in with its fields (``shiftjax.batch_norm.BatchNorm``)."""
  return isinstance(module, nn.BatchNorm) or (
      type(module).__name__ == "BatchNorm" and hasattr(module, "epsilon")
      and hasattr(module, "use_running_average"))


def _unfoldable_reason(module: nn.Module, x, args, kwargs) -> str | None:
  running = kwargs.get("use_running_average", args[0] if args else None)
  if running is None:
    running = module.use_running_average
  if not running:
    return "it normalizes with batch statistics (training mode) in this call"
  axis = getattr(module, "axis", -1)
  if axis not in (-1, np.ndim(x) - 1):
    return f"it normalizes over axis {axis}, not the features (the last axis)"
  if kwargs.get("mask") is not None:
    return "it is called with a mask"
  return None


def find_foldable(model: nn.Module, variables: Mapping[str, Any], layers: Sequence[str],
                  inputs: Sequence[Any], kwargs: Mapping[str, Any]
                  ) -> tuple[list[Fold], list[str]]:
  """The BatchNorms of one call ``model.apply(variables, *inputs, **kwargs)`` that fold
  into the layers at the paths ``layers``, and a sentence for each one that follows such
  a layer but cannot fold (module docstring). Nothing is computed: the call is traced."""
  layers = set(layers)
  markers: list[str] = []  # what each optimization barrier of the trace marks, in order
  outputs: dict[int, tuple[str, int, Any]] = {}  # id(marked output) -> (layer, marker, it)
  candidates: list[tuple[str, int, str, int, float]] = []
  reasons: list[str] = []

  def mark(x, what: str):
    markers.append(what)
    return jax.lax.optimization_barrier(x), len(markers) - 1

  def spy(next_fun, args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **call_kwargs)
    path = "/".join(module.scope.path)
    if is_batch_norm(module) and args and id(args[0]) in outputs:
      layer, out_marker, _ = outputs[id(args[0])]
      reason = _unfoldable_reason(module, args[0], args[1:], call_kwargs)
      if reason is not None:
        reasons.append(f"BatchNorm {path!r} after layer {layer!r} stays unfolded: {reason}")
        return next_fun(*args, **call_kwargs)
      x, in_marker = mark(args[0], f"input of {path}")
      candidates.append((layer, out_marker, path, in_marker, float(module.epsilon)))
      return next_fun(x, *args[1:], **call_kwargs)
    out = next_fun(*args, **call_kwargs)
    if path in layers and isinstance(out, jax.Array):
      out, out_marker = mark(out, f"output of {path}")
      outputs[id(out)] = (path, out_marker, out)  # kept alive: ids stay unique
    return out

  def call(variables, *inputs):
    with nn.intercept_methods(spy):
      return model.apply(variables, *inputs, **kwargs)

  jaxpr = jax.make_jaxpr(call)(variables, *inputs).jaxpr
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  if len(barriers) != len(markers):
    names = sorted({c[2] for c in candidates})
    return [], reasons + [f"BatchNorms {names} stay unfolded: the call runs them inside a "
                          "transform (jit, scan, remat) whose uses the trace does not see"
                          ] if names else reasons
  folds = []
  for layer, out_marker, norm, in_marker, epsilon in candidates:
    out_var = barriers[out_marker].outvars[0]
    users = [e for e in jaxpr.eqns if any(v is out_var for v in e.invars)]
    if users == [barriers[in_marker]] and not any(v is out_var for v in jaxpr.outvars):
      folds.append(Fold(layer, norm, epsilon))
    else:
      reasons.append(f"BatchNorm {norm!r} after layer {layer!r} stays unfolded: the layer's "
                     "output is also used elsewhere")
  return folds, reasons


def affine(variables: Mapping[str, Any], fold: Fold) -> tuple[np.ndarray, np.ndarray]:
  """``(s, t)`` of the BatchNorm at ``fold.norm``: its output is ``y * s + t``."""
  params = trees.get(variables["params"], fold.norm) if "params" in variables else {}
  stats = trees.get(variables["batch_stats"], fold.norm)
  mean = np.asarray(stats["mean"], np.float32)
  var = np.asarray(stats["var"], np.float32)
  scale = np.asarray(params.get("scale", np.ones_like(mean)), np.float32)
  bias = np.asarray(params.get("bias", np.zeros_like(mean)), np.float32)
  s = scale / np.sqrt(var + np.float32(fold.epsilon))
  return s, bias - mean * s


def fold(variables: Mapping[str, Any], folds: Sequence[Fold]) -> dict[str, Any]:
  """``variables`` with each fold's epilogue in ``FOLDED_COLLECTION`` at its layer's path
  and its BatchNorm's variables removed (the caller's dicts are not modified)."""
  out = {name: dict(collection) for name, collection in variables.items()}
  folded = out.setdefault(FOLDED_COLLECTION, {})
  for f in folds:
    s, t = affine(variables, f)
    trees.writable(folded, f.layer).update(scale=s, bias=t)
    parent, _, name = f.norm.rpartition("/")
    for collection in ("params", "batch_stats"):
      if collection in out:
        trees.writable(out[collection], parent).pop(name, None)
  return out
