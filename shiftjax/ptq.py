"""Post-training quantization: a trained float model of any architecture -> a shift model.

``quantize_trained(model, policy, ...)`` maps every layer the policy quantizes to the
power-of-two weights of its spec, in minutes and without training:

1. exponent offset: each layer's ``e0`` is the one (of ``E0_RANGE``) whose format, with
   nearest rounding, has the smallest squared error against the layer's float kernel
   (a layer's weights may sit at 2**-6 or at 2**0; one global offset fits neither);
2. rounding, one of ``ROUNDINGS``:
   ``'nearest'``: every weight to the nearest value of the format;
   ``'error_feedback'`` (GPTQ, Frantar et al. 2023, on a dense kernel ``[K, N]``, or a
   conv's ``[*window, C, N]`` flattened to ``[K, N]`` against its input patches): the
   rows are rounded in order and each row's rounding error, weighted by the inverse of
   the layer's input Hessian ``H = X^T X`` over the calibration batches, is spread over
   the rows not yet rounded, so that ``X W`` rather than ``W`` stays close (a grouped or
   circular/causal-padded conv, and any other layer, falls back to nearest rounding);
3. ``bias_correction``: a layer with a bias adds ``E[x] (W - W_q)`` (its output's mean
   shift over the calibration batches; Nagel et al. 2019).

The result is the model of ``shiftjax.quantize_model`` with one exact-path rule per
layer, its latents encoding those weights exactly (``transfer.shift_latents_from_float``):
it evaluates, trains further (QAT from there) or packs like any quantized model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import interception
from shiftjax import quantizers as qz
from shiftjax import transfer
from shiftjax import trees
from shiftjax.policy import LayerPolicy

E0_RANGE = range(-16, 4)
ROUNDINGS = ("nearest", "error_feedback")
# The calibrations the benchmarks compare: {name: quantize_trained keyword arguments}.
CALIBRATIONS = {
    "nearest": dict(rounding="nearest"),
    "nearest + bias correction": dict(rounding="nearest", bias_correction=True),
    "error feedback": dict(rounding="error_feedback"),
    "error feedback + bias correction": dict(rounding="error_feedback", bias_correction=True),
}
_HESSIAN_DAMPING = 0.01  # of the mean diagonal, as GPTQ


def round_to_values(w: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Each element of ``w`` as the nearest of the sorted ``values`` (ties: the larger)."""
  mids = (values[1:] + values[:-1]) / 2
  return values[np.searchsorted(mids, w, side="right")]


def best_offset(w: np.ndarray, spec: qz.Quantizer) -> qz.Quantizer:
  """``spec`` with the ``e0`` of ``E0_RANGE`` that rounds ``w`` with the least error."""
  def error(e0):
    try:
      candidate = dataclasses.replace(spec, e0=e0)
    except ValueError:  # outside float32's range
      return np.inf, None
    values = candidate.values().astype(np.float64)
    return float(np.sum((round_to_values(w, values) - w) ** 2)), candidate
  return min((error(e0) for e0 in E0_RANGE), key=lambda t: t[0])[1]


def error_feedback_rounding(w: np.ndarray, hessian: np.ndarray, values: np.ndarray
                            ) -> np.ndarray:
  """GPTQ's rounding of a dense kernel ``w [K, N]`` given ``hessian [K, K]`` (X^T X)."""
  w = w.astype(np.float64).copy()
  k = w.shape[0]
  h = hessian.astype(np.float64) + _HESSIAN_DAMPING * np.mean(np.diag(hessian)) * np.eye(k)
  dead = np.diag(hessian) == 0  # inputs always zero: their rows never matter
  h[dead, dead] = 1.0
  # Upper Cholesky factor of H^-1: row j holds the weights of the error of row j on the
  # rows after it (GPTQ's formulation).
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  q = np.empty_like(w)
  for j in range(k):
    q[j] = round_to_values(w[j], values)
    err = (w[j] - q[j]) / u[j, j]
    w[j + 1:] -= np.outer(u[j, j + 1:], err)
  return q


@dataclasses.dataclass
class _LayerStats:
  """What the calibration batches showed a layer: its input's mean and X^T X."""
  kind: str
  mean: np.ndarray | None = None
  hessian: np.ndarray | None = None
  count: int = 0

  def add(self, x: np.ndarray, with_hessian: bool, patches: np.ndarray | None = None
          ) -> None:
    """``x``: the layer's input; ``patches``: a conv's input windows ``[..., K]`` in its
    flattened kernel's row order (``conv_patches``), for the Hessian."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    total = flat.sum(0)
    self.mean = total if self.mean is None else self.mean + total
    rows = flat if self.kind == "Dense" else patches
    if with_hessian and rows is not None:
      rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
      gram = rows.T @ rows
      self.hessian = gram if self.hessian is None else self.hessian + gram
    self.count += flat.shape[0]


def conv_patches(conv: nn.Conv, x) -> np.ndarray | None:
  """The input windows of a linen ``conv`` applied to ``x``: ``[positions, K]`` with
  ``patches @ kernel.reshape(K, N)`` its output (no bias); None for what this does not
  cover (grouped convs, circular or causal padding)."""
  rank = len(conv.kernel_size)
  padding = nn.linear.canonicalize_padding(conv.padding, rank)
  if conv.feature_group_count != 1 or padding in ("CIRCULAR", "CAUSAL"):
    return None
  def per_dim(v):
    return (v,) * rank if v is None or isinstance(v, int) else tuple(v)
  strides, lhs, rhs = (tuple(1 if d is None else d for d in per_dim(v))
                       for v in (conv.strides, conv.input_dilation, conv.kernel_dilation))
  x = jnp.asarray(x, jnp.float32)
  x = x.reshape((-1,) + x.shape[-(rank + 1):])
  channels = x.shape[-1]
  # lax orders a patch's features channel-major (C, *window); the kernel's rows are
  # (*window, C).
  patches = jax.lax.conv_general_dilated_patches(
      jnp.moveaxis(x, -1, 1), tuple(conv.kernel_size), strides, padding,
      lhs_dilation=lhs, rhs_dilation=rhs, precision=jax.lax.Precision.HIGHEST)
  patches = jnp.moveaxis(patches, 1, -1).reshape(-1, channels, *conv.kernel_size)
  patches = jnp.moveaxis(patches, 1, -1)
  return np.asarray(patches.reshape(patches.shape[0], -1))


def _exact(path: str) -> str:
  """A glob pattern that matches exactly ``path``."""
  return re.sub(r"([*?\[])", r"[\1]", path)


def _quantized_kernel(w, spec, stats: _LayerStats | None, rounding: str):
  spec = best_offset(w, spec)
  values = spec.values().astype(np.float64)
  if rounding == "error_feedback" and stats is not None and stats.hessian is not None:
    q = error_feedback_rounding(w.reshape(-1, w.shape[-1]), stats.hessian, values)
    q = q.reshape(w.shape)
  else:
    q = round_to_values(w.astype(np.float64), values)
  return spec, q


def _bias_shift(w, q, stats: _LayerStats | None, kind: str):
  """``E[x] (W - W_q)`` for a Dense kernel ``[K, N]`` or a conv's ``[..., C, N]``
  (a conv's window sums each channel's mean input; padding ignored)."""
  if stats is None or stats.mean is None or kind not in ("Dense", "Conv"):
    return None
  mean = stats.mean / max(stats.count, 1)
  delta = (w - q).reshape(-1, w.shape[-2], w.shape[-1]).sum(0)
  return (mean @ delta).astype(np.float32)


def quantize_trained(model, policy: LayerPolicy, variables: Mapping[str, Any] | None = None,
                     calibration: Iterable[tuple] = (), *, rounding: str = "nearest",
                     bias_correction: bool = False):
  """A trained float model -> the shift model of ``policy`` (module docstring).

  Args:
    model: the float model: linen (then ``variables`` are its trained variables) or NNX
      (its trained state; it is not modified).
    policy: which layers get which spec (its ``e0`` is replaced per layer); activation
      specs need training (QAT) and are refused.
    calibration: tuples of the model's positional inputs (a few hundred examples in
      all); needed by ``'error_feedback'`` and ``bias_correction``.
    rounding: one of ``ROUNDINGS``.
  Returns:
    linen: ``(quantized_model, variables)``; NNX: the quantized model.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  if policy.activation is not None or policy.layer_activations:
    raise ValueError("post-training quantization maps weights; activation specs learn "
                     "their ranges in training (quantize_model + fit)")
  if policy.parameter_quantizers:
    raise ValueError("post-training quantization maps the kernels of flax's layers; "
                     "parameter_quantizers (parameters the model's own code multiplies) "
                     "need quantize_model and training")
  calibration = [tuple(c) for c in calibration]
  if (rounding == "error_feedback" or bias_correction) and not calibration:
    raise ValueError(f"rounding={rounding!r} and bias_correction need calibration inputs")
  is_linen = isinstance(model, nn.Module)
  if is_linen and variables is None:
    raise ValueError("a linen model needs its trained variables")
  kernels, biases = (_linen_kernels(model, variables, calibration) if is_linen
                     else _nnx_kernels(model))
  specs = {p: policy.quantizer_for(p) for p in kernels}
  specs = {p: s for p, s in specs.items() if s is not None}
  stats = (_calibration_stats(model, variables, calibration, set(specs),
                              rounding == "error_feedback") if calibration else {})
  rules, new_kernels, new_biases = [], {}, {}
  for path, spec in specs.items():
    w = np.asarray(kernels[path], np.float64)
    spec, q = _quantized_kernel(w, spec, stats.get(path), rounding)
    rules.append((_exact(path), spec))
    new_kernels[path] = transfer.shift_latents_from_float(q.astype(np.float32), spec)
    shift = _bias_shift(w, q, stats.get(path), stats[path].kind if path in stats else "")
    if bias_correction and shift is not None and biases.get(path) is not None:
      new_biases[path] = np.asarray(biases[path]) + shift
  exact = LayerPolicy(None, layer_quantizers=tuple(rules))
  if is_linen:
    return _linen_result(model, variables, exact, new_kernels, new_biases)
  return _nnx_result(model, exact, new_kernels, new_biases)


# ----------------------------------------------------------------------- frameworks


def _linen_kernels(model, variables, calibration):
  example = calibration[0] if calibration else None
  if example is None:
    raise ValueError("a linen model needs one calibration input to find its layers")
  with interception.record_calls() as record:
    jax.eval_shape(interception.quantize_model(model, LayerPolicy(None)).apply,
                   variables, *example)
  params = variables["params"]
  kernels = {p: trees.get(params, p)["kernel"] for p in record.layers}
  biases = {p: trees.get(params, p).get("bias") for p in record.layers}
  return kernels, biases


def _nnx_kernels(model):
  layers = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)
            if isinstance(m, interception.NNX_LAYERS)}
  return ({p: m.kernel[...] for p, m in layers.items()},
          {p: (m.bias[...] if getattr(m, "bias", None) is not None else None)
           for p, m in layers.items()})


def _calibration_stats(model, variables, calibration, paths, with_hessian):
  """Each quantized layer's input statistics over the calibration inputs (float model)."""
  stats: dict[str, _LayerStats] = {}

  def seen(path, kind, x, patches=None):
    if path in paths:
      stats.setdefault(path, _LayerStats(kind)).add(np.asarray(x), with_hessian, patches)

  if isinstance(model, nn.Module):
    def spy(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, interception.LINEN_LAYERS):
        path = "/".join(module.scope.path)
        patches = (conv_patches(module, args[0])
                   if with_hessian and path in paths and isinstance(module, nn.Conv)
                   else None)
        seen(path, type(module).__name__, args[0], patches)
      return next_fun(*args, **kwargs)
    for inputs in calibration:
      with nn.intercept_methods(spy):
        model.apply(variables, *inputs)
  else:
    spied = nnx.clone(model)
    for path, layer in nnx.iter_modules(spied):
      if isinstance(layer, interception.NNX_LAYERS):
        layer.__class__ = _spying(type(layer))
        layer.spy = functools.partial(seen, "/".join(map(str, path)),
                                      interception._nnx_kind(layer))  # pylint: disable=protected-access
    for inputs in calibration:
      spied(*inputs)
  return stats


@functools.cache
def _spying(layer_class: type) -> type:
  def __call__(self, inputs, *args, **kwargs):
    self.spy(inputs)
    return layer_class.__call__(self, inputs, *args, **kwargs)
  return interception.subclass(layer_class, __call__=__call__)


def _linen_result(model, variables, policy, kernels, biases):
  params = dict(variables["params"])  # copied along each edited path (trees.writable)
  for path, latents in kernels.items():
    trees.writable(params, path)["kernel"] = jax.tree.map(jnp.asarray, latents)
  for path, bias in biases.items():
    trees.writable(params, path)["bias"] = jnp.asarray(bias)
  return interception.quantize_model(model, policy), {**variables, "params": params}


def _nnx_result(model, policy, kernels, biases):
  quantized = interception.quantize_model(model, policy)
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(quantized)}
  for path, latents in kernels.items():
    modules[path].kernel.set_value(jax.tree.map(jnp.asarray, latents))
  for path, bias in biases.items():
    modules[path].bias.set_value(jnp.asarray(bias))
  return quantized
