"""BatchNorm folding into the packed layers of any linen model.

A BatchNorm in inference mode is a per-channel affine map ``y * s + t`` with
``s = scale / sqrt(var + epsilon)`` and ``t = bias - mean * s``. A power-of-two kernel
cannot absorb ``s`` (its codes would stop being powers of two), so a folded BatchNorm
becomes its layer's epilogue, as in the ResNet files of format versions 1-3: the packed
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
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import batch_norm
from shiftjax import interception
from shiftjax import kernels
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
  """flax's BatchNorm or shiftjax's drop-in for it (``shiftjax.batch_norm``: the same
  variables and inference-mode affine map)."""
  return isinstance(module, (nn.BatchNorm, batch_norm.BatchNorm))


def _unfoldable_reason(module, x, args, kwargs) -> str | None:
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


class _Marks:
  """The markers one traced call puts on layer outputs and BatchNorm inputs, and what
  they show once the call is a jaxpr (module docstring)."""

  def __init__(self):
    self.markers: list[str] = []  # what each optimization barrier marks, in trace order
    self.outputs: dict[int, tuple[str, int, Any]] = {}  # id(output) -> (layer, marker, it)
    self.candidates: list[tuple[str, int, str, int, float]] = []
    self.reasons: list[str] = []

  def _mark(self, x, what: str):
    self.markers.append(what)
    return jax.lax.optimization_barrier(x), len(self.markers) - 1

  def layer_output(self, layer: str, out):
    """A quantized layer's output, marked (anything but one array passes unmarked)."""
    if not isinstance(out, jax.Array):
      return out
    out, marker = self._mark(out, f"output of {layer}")
    self.outputs[id(out)] = (layer, marker, out)  # kept alive: ids stay unique
    return out

  def norm_input(self, norm: str, module, x, args, kwargs):
    """A BatchNorm's input, marked when it is a quantized layer's output and the norm
    could fold (else the reason is kept)."""
    if id(x) not in self.outputs:
      return x
    layer, out_marker, _ = self.outputs[id(x)]
    reason = _unfoldable_reason(module, x, args, kwargs)
    if reason is not None:
      self.reasons.append(f"BatchNorm {norm!r} after layer {layer!r} stays unfolded: "
                          f"{reason}")
      return x
    x, in_marker = self._mark(x, f"input of {norm}")
    self.candidates.append((layer, out_marker, norm, in_marker, float(module.epsilon)))
    return x

  def folds(self, jaxpr) -> tuple[list[Fold], list[str]]:
    """The candidates whose layer output has no other user in ``jaxpr``."""
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    if len(barriers) != len(self.markers):
      names = sorted({c[2] for c in self.candidates})
      return [], self.reasons + ([
          f"BatchNorms {names} stay unfolded: the call runs them inside a transform "
          "(jit, scan, remat) whose uses the trace does not see"] if names else [])
    folds, reasons = [], list(self.reasons)
    for layer, out_marker, norm, in_marker, epsilon in self.candidates:
      out_var = barriers[out_marker].outvars[0]
      users = [e for e in jaxpr.eqns if any(v is out_var for v in e.invars)]
      if users == [barriers[in_marker]] and not any(v is out_var for v in jaxpr.outvars):
        folds.append(Fold(layer, norm, epsilon))
      else:
        reasons.append(f"BatchNorm {norm!r} after layer {layer!r} stays unfolded: the "
                       "layer's output is also used elsewhere")
    return folds, reasons


def find_foldable(model: nn.Module, variables: Mapping[str, Any], layers: Sequence[str],
                  inputs: Sequence[Any], kwargs: Mapping[str, Any]
                  ) -> tuple[list[Fold], list[str]]:
  """The BatchNorms of one call ``model.apply(variables, *inputs, **kwargs)`` (linen)
  that fold into the layers at the paths ``layers``, and a sentence for each one that
  follows such a layer but cannot fold. Nothing is computed: the call is traced."""
  layers, marks = set(layers), _Marks()

  def spy(next_fun, args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **call_kwargs)
    path = "/".join(module.scope.path)
    if is_batch_norm(module) and args:
      x = marks.norm_input(path, module, args[0], args[1:], call_kwargs)
      return next_fun(x, *args[1:], **call_kwargs)
    out = next_fun(*args, **call_kwargs)
    return marks.layer_output(path, out) if path in layers else out

  def call(variables, *inputs):
    with nn.intercept_methods(spy):
      return model.apply(variables, *inputs, **kwargs)

  return marks.folds(jax.make_jaxpr(call)(variables, *inputs).jaxpr)


def find_foldable_nnx(model: nnx.Module, layers: Sequence[str], inputs: Sequence[Any]
                      ) -> tuple[list[Fold], list[str]]:
  """``find_foldable`` for an NNX model called as ``model(*inputs)`` (not modified: the
  call is traced on a copy whose layers and norms report to the markers)."""
  layers, marks = set(layers), _Marks()
  model = nnx.clone(model)
  for path, module in nnx.iter_modules(model):
    name = "/".join(map(str, path))
    if name in layers:
      module.__class__ = _marking_output(type(module), marks, name)
    elif isinstance(module, nnx.BatchNorm):
      module.__class__ = _marking_input(type(module), marks, name)
  graphdef, state = nnx.split(model)

  def call(state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)

  return marks.folds(jax.make_jaxpr(call)(state, *inputs).jaxpr)


def _marking_output(layer_class: type, marks: _Marks, name: str) -> type:
  def __call__(self, *args, **kwargs):
    return marks.layer_output(name, layer_class.__call__(self, *args, **kwargs))
  return interception.subclass(layer_class, __call__=__call__)


def _marking_input(norm_class: type, marks: _Marks, name: str) -> type:
  def __call__(self, x, *args, **kwargs):
    x = marks.norm_input(name, self, x, args, kwargs)
    return norm_class.__call__(self, x, *args, **kwargs)
  return interception.subclass(norm_class, __call__=__call__)


def _affine(scale, bias, mean, var, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
  mean, var = np.asarray(mean, np.float32), np.asarray(var, np.float32)
  scale = np.ones_like(mean) if scale is None else np.asarray(scale, np.float32)
  bias = np.zeros_like(mean) if bias is None else np.asarray(bias, np.float32)
  s = scale / np.sqrt(var + np.float32(epsilon))
  return s, bias - mean * s


def affine(variables: Mapping[str, Any], fold: Fold) -> tuple[np.ndarray, np.ndarray]:
  """``(s, t)`` of the BatchNorm at ``fold.norm`` (linen variables): its output is
  ``y * s + t``."""
  params = trees.get(variables["params"], fold.norm) if "params" in variables else {}
  stats = trees.get(variables["batch_stats"], fold.norm)
  return _affine(params.get("scale"), params.get("bias"), stats["mean"], stats["var"],
                 fold.epsilon)


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


# ------------------------------------------------------------------------------ NNX

_NORM_VARIABLES = ("scale", "bias", "mean", "var")


class FoldedAffine(nnx.Variable):
  """A folded BatchNorm's per-channel scale or shift, applied by the layer it follows."""


def fold_nnx(model: nnx.Module, folds: Sequence[Fold]) -> None:
  """Folds each BatchNorm of ``folds`` into its layer, in place: the layer gets
  ``folded_scale``/``folded_bias`` (``FoldedAffine``) and an epilogue, the BatchNorm
  becomes the identity without variables."""
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  for f in folds:
    norm = modules[f.norm]
    value = lambda name: (getattr(norm, name)[...]  # pylint: disable=g-long-lambda
                          if getattr(norm, name, None) is not None else None)
    s, t = _affine(value("scale"), value("bias"), value("mean"), value("var"), f.epsilon)
    _fold_into(modules[f.layer], norm, f.norm, s, t)


def refold_nnx(model: nnx.Module, layers: Mapping[str, Any]) -> None:
  """What ``fold_nnx`` did to a model, with zeros for the epilogues (loading a file
  restores them): ``layers`` maps a layer path to its entry (``folded_norm``,
  ``kernel_shape``)."""
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  for path, entry in layers.items():
    if entry.folded_norm is None:
      continue
    norm = modules.get(entry.folded_norm)
    if not isinstance(norm, nnx.BatchNorm):
      raise ValueError(f"the file folds {entry.folded_norm!r} into {path!r}, but the model "
                       f"has {type(norm).__name__ if norm is not None else 'no module'} "
                       "there, not a BatchNorm")
    zeros = np.zeros(entry.kernel_shape[-1], np.float32)
    _fold_into(modules[path], norm, entry.folded_norm, zeros, zeros)


def _fold_into(layer: nnx.Module, norm: nnx.Module, norm_path: str, s, t) -> None:
  layer.folded_scale, layer.folded_bias = FoldedAffine(s), FoldedAffine(t)
  layer.folded_norm = norm_path
  layer.__class__ = _with_epilogue(type(layer))
  for name in _NORM_VARIABLES:
    if hasattr(norm, name):
      delattr(norm, name)
  norm.__class__ = _identity(type(norm))


@functools.cache
def _with_epilogue(layer_class: type) -> type:
  def __call__(self, *args, **kwargs):
    scale, bias = self.folded_scale[...], self.folded_bias[...]
    x = args[0] if args else None
    padding = fused_conv_padding(self, x) if x is not None else None
    if padding is not None and not args[1:] and not kwargs:
      if hasattr(self, "input_spec"):  # a quantized input, as the layer's own call would
        params = self.activation.get_value() if hasattr(self, "activation") else {}
        x = self.input_spec.quantize(params, x)
      conv_bias = self.bias[...] if self.bias is not None else None
      return fused_conv(self, x, self.kernel[...], conv_bias, padding, scale, bias)
    out = layer_class.__call__(self, *args, **kwargs)
    return out * scale + bias
  return interception.subclass(layer_class, __call__=__call__)


def fused_conv_padding(module, x):
  """The padding ``kernels.fused_conv`` takes for a plain 2-D conv module, linen or NNX
  (no dilation, groups or mask; float32 or bfloat16), None for any other."""
  if (not isinstance(module, (nn.Conv, nnx.Conv)) or x.ndim != 4 or len(module.kernel_size) != 2
      or module.feature_group_count != 1 or module.mask is not None
      or x.dtype not in (jnp.float32, jnp.bfloat16)
      or module.dtype not in (None, jnp.float32)
      or any(d not in (None, 1, (1, 1)) for d in (module.input_dilation,
                                                   module.kernel_dilation))):
    return None
  padding = module.padding
  if padding in ("SAME", "VALID"):
    return padding
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if (isinstance(padding, (tuple, list)) and len(padding) == 2
      and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding)):
    return tuple(tuple(int(v) for v in p) for p in padding)
  return None


def fused_conv(module, x, weights, conv_bias, padding, scale, bias):
  """``conv(x) * scale + bias`` of a conv module (``fused_conv_padding`` not None) as one
  ``kernels.fused_conv``: on the CPU the native conv applies the folded BatchNorm in its
  registers (``deploy.fuse_conv_epilogues`` then moves a following residual add and
  relu in too). The conv's own bias, if any, goes into the epilogue."""
  if conv_bias is not None:
    bias = conv_bias * scale + bias
  return kernels.fused_conv(x.astype(jnp.float32), weights, strides=module.strides or 1,
                            padding=padding, scale=scale.astype(jnp.float32),
                            bias=bias.astype(jnp.float32))



@functools.cache
def _identity(norm_class: type) -> type:
  def __call__(self, x, *args, **kwargs):
    del args, kwargs
    return x  # its layer applied it
  return interception.subclass(norm_class, __call__=__call__)
