"""Shift networks initialized from trained float networks.

``init_from_float`` walks a shift model's parameters and the float parameters of the same
architecture: every layer whose ``'kernel'`` holds quantizer latents gets latents that
encode the power-of-two weights nearest to its float kernel; everything else (the
full-precision stem and head, biases, BatchNorm scales and offsets) is copied.
``batch_stats_from_float`` does the same for the BatchNorm running statistics, and
``variables_from_float`` does both.

Mapping, per method (``w`` is a float weight, ``x = w * 2**-k`` with ``k`` the layer's
scale exponent below, ``B(x) = +1 if x >= 0 else -1``, ``m`` the margin):

* DeepShift-Q: the latent *is* the (scaled) float weight, ``x``; its forward rounds it.
  ``k`` is 0 unless the largest float weight would round above ``2**e0``; then it is
  the smallest ``k`` that fits it (the same ``k`` rule for DeepShift-PS).
* DeepShift-PS: ``shift = clip(round(log2|x|) - e0, p_min, 0)``, ``sign = sign(x)`` in
  {-1, 0, +1} (0 only for ``w == 0``): DeepShift's own conversion of a float weight.
* S3: the nearest value of ``{0, +-2**(e0+P)}`` to ``x`` (nearest in value: magnitudes
  below ``2**(e0-1)`` go to zero, ``1.5 * 2**e`` is the tie between ``2**e`` and
  ``2**(e+1)``). ``sign = B(w) * m``; ``sparse = +m``, or ``-m`` for weights that round
  to zero (their sign and shift latents still encode ``B(w) * 2**e0``, the value they
  take when training revives them); shift latents: the chain bits of ``P``.
* DenseShift: the nearest value of ``{+-2**(e0+S)}`` to ``x`` (zero-free; ``w == 0`` maps
  to ``+2**e0``); ``sign = B(w) * m``; exponent latents: the bits of ``S`` (``chain``:
  ``S`` trailing ones, ``+m``, after ``-m``s, so that one flip moves ``S`` by one;
  ``binary``: ``S``'s binary digits), each ``+-m``.

Every binarized latent sits at distance ``m`` (default 1e-3, DenseShift's low-variance
init scale) from its threshold: the forward value is exactly the intended power of two,
and a few gradient steps can still flip it.

Scale exponents and why the conversion is exact. A quantizer spec has one integer ``e0``
for the whole model, but float layers differ in scale by orders of magnitude, so each
quantized layer gets its own integer exponent ``k`` (one per layer, the default, or one
per output channel with ``granularity='channel'``): the kernel becomes
``Q(w * 2**-k)``, ``2**-k`` times the float kernel it approximates. The BatchNorm that
follows the conv absorbs the factor ``c = 2**-k`` (per channel) exactly: with running
statistics ``mean' = c * mean`` and ``var' = c**2 * (var + eps) - eps``,
``(c*y - mean') / sqrt(var' + eps) == (y - mean) / sqrt(var + eps)`` for every input, so
the converted network in evaluation mode computes exactly what the float network computes
with each float kernel replaced by ``2**k * Q(w * 2**-k)`` (up to float rounding; ``gamma``
and ``beta`` are copied unchanged). In training mode BatchNorm normalizes by batch
statistics, which scale by ``c`` by themselves (up to ``eps``). ``var'`` can be negative
when ``c < 1`` and ``var`` is below ``eps``; ``var' + eps`` stays positive and training
replaces it. Layers with no BatchNorm after them (a quantized classifier) keep ``k = 0``:
choose the spec's ``e0`` for them. For S3 and DenseShift, whose few powers cover a narrow
range, ``k`` maximizes the cosine similarity between the float kernel and its quantized
image (BatchNorm makes the overall scale irrelevant; ties go to the ``k`` nearest 0). For
DeepShift (16 powers at 5 bits) ``k`` is 0 unless the largest weight does not fit, so
the DeepShift-Q latents are the float weights themselves.

Which BatchNorm follows which conv is read from names, as the shiftjax ResNets write
them: ``convN -> bnN``, ``X -> X_bn`` (``stem -> stem_bn``, ``shortcut -> shortcut_bn``);
pass ``norm_for`` for other models.

Exact is not accurate: quantization changes the distributions the float BatchNorm
statistics describe, and the mismatch compounds from layer to layer. A converted 3-bit
DenseShift ResNet-8 on Fashion-MNIST keeps 0.3-0.7 of its float model's 0.72 test
accuracy as converted, but within 0.01 of it after ``recalibrate_batch_stats`` (forward
passes in training mode over 30 batches, no weight changes). Fine-tuning does the same
on its own in its first steps (training-mode BatchNorm uses batch statistics).

``load_float_params(path)`` reads a run's checkpoint (its workdir, its ``checkpoints``
directory or one step's directory) as numpy, whatever devices wrote it;
``init_from_config(config, shift_variables, quantizer)`` is the ``--config.init_from`` hook of
``shiftjax.train`` (fields ``init_from``, ``init_from_required``, ``init_margin``,
``init_granularity``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from shiftjax import layers
from shiftjax import policy as policy_lib
from shiftjax import quantizers as qz

DEFAULT_MARGIN = 1e-3
GRANULARITIES = ("layer", "channel", "none")
# Neither granularity won consistently on trained Fashion-MNIST ResNets as converted
# (per-layer in 5 of 7 trials; benchmarks/transfer_fashion_mnist.py prints both); after
# BatchNorm re-estimation they were within 0.01. Per-layer is the simpler one.
DEFAULT_GRANULARITY = "layer"
# BatchNorm epsilon of the shiftjax models (``models.blocks.conv_and_norm``).
BN_EPSILON = 1e-5
# 1.5 is the linear midpoint between 2**e and 2**(e+1).
_LOG2_MIDPOINT = math.log2(1.5)
# Cosines closer than this count as equal (the k nearer 0 wins): a few tiny weights
# clipped to DeepShift-Q's smallest power should not move a layer off k = 0.
_COS_TOLERANCE = 1e-4

Path = tuple[str, ...]


# ------------------------------------------------------------------------ one kernel


def _check_quantizer(quantizer) -> None:
  if not isinstance(quantizer, qz.Quantizer):
    raise ValueError(f"quantizer must be a shiftjax quantizer spec, got {quantizer!r}")
  if type(quantizer) not in (qz.DeepShiftQ, qz.DeepShiftPS, qz.S3, qz.DenseShift):
    raise ValueError(f"no float -> latent mapping for {type(quantizer).__name__}")


def _exponent_range(quantizer: qz.Quantizer) -> tuple[int, int]:
  fmt = quantizer.code_format
  return fmt.e0, fmt.max_exponent


def _quantized_exponent(log2_abs: np.ndarray, quantizer: qz.Quantizer) -> np.ndarray:
  """Exponent of the value each scaled float maps to; ``-inf`` where it maps to zero.

  ``log2_abs`` is ``log2|x|`` (``-inf`` for ``x == 0``).
  """
  lo, hi = _exponent_range(quantizer)
  with np.errstate(invalid="ignore"):
    if isinstance(quantizer, (qz.DeepShiftQ, qz.DeepShiftPS)):
      e = np.clip(np.round(log2_abs), lo, hi)  # DeepShift rounds in the log domain
      if isinstance(quantizer, qz.DeepShiftPS):
        e = np.where(np.isneginf(log2_abs), -np.inf, e)
      return e
    floor = np.floor(log2_abs)
    e = np.clip(floor + (log2_abs - floor >= _LOG2_MIDPOINT), lo, hi)
    if isinstance(quantizer, qz.S3):
      e = np.where(log2_abs < lo - 1, -np.inf, e)  # nearer to 0 than to 2**lo
    else:
      e = np.where(np.isneginf(log2_abs), lo, e)  # zero-free: 0 maps to +2**e0
  return e


def _as_exponent_array(scale_exponent, weights: np.ndarray) -> np.ndarray:
  k = np.asarray(scale_exponent)
  if k.ndim > 1 or (k.ndim == 1 and k.shape[0] != weights.shape[-1]):
    raise ValueError(f"scale_exponent must be a scalar or one integer per output channel "
                     f"({weights.shape[-1]}), got shape {k.shape}")
  if not np.all(np.equal(np.round(k), k)):
    raise ValueError(f"scale_exponent must hold integers, got {k}")
  return k.astype(np.float64)


def target_weights(weights, quantizer: qz.Quantizer, *, scale_exponent=0) -> np.ndarray:
  """The power-of-two weights ``shift_latents_from_float`` encodes, as float32 numpy.

  Args:
    weights: float kernel, ``(in, out)`` or HWIO.
    quantizer: the target spec.
    scale_exponent: integer ``k``, scalar or ``[out]``: encode ``weights * 2**-k``.
  Returns:
    ``quantizer.weight(shift_latents_from_float(weights, ...))``, bit for bit.
  """
  _check_quantizer(quantizer)
  w = np.asarray(weights, np.float64)
  k = _as_exponent_array(scale_exponent, w)
  if isinstance(quantizer, qz.DeepShiftQ):
    # The latent is the (scaled) float weight: its value is what the forward makes of it.
    latents = shift_latents_from_float(w, quantizer, scale_exponent=k)
    return np.asarray(quantizer.weight({"weight": jax.numpy.asarray(latents["weight"])}))
  with np.errstate(divide="ignore"):
    e = _quantized_exponent(np.log2(np.abs(w)) - k, quantizer)
  sign = np.where(w >= 0, 1.0, -1.0)
  if isinstance(quantizer, qz.DeepShiftPS):
    sign = np.sign(w)
  out = np.where(np.isneginf(e), 0.0, sign * np.exp2(np.where(np.isneginf(e), 0, e)))
  return out.astype(np.float32)


def _bit_latents(index: np.ndarray, num_latents: int, encoding: str, margin: float,
                 dtype) -> np.ndarray:
  """``[K, ...]`` latents whose bits (``+m`` = 1, ``-m`` = 0) give exponent ``index``."""
  k = np.arange(num_latents).reshape((num_latents,) + (1,) * index.ndim)
  if encoding == "chain":
    bits = k >= num_latents - index  # trailing ``index`` ones, zeros before them
  else:
    bits = (index >> k) & 1
  return np.where(bits.astype(bool), margin, -margin).astype(dtype)


def shift_latents_from_float(weights, quantizer: qz.Quantizer, *,
                             margin: float = DEFAULT_MARGIN, scale_exponent=0,
                             dtype=np.float32) -> dict[str, np.ndarray]:
  """Latents of ``quantizer`` that encode the power-of-two weights nearest ``weights``.

  Args:
    weights: float kernel, ``(in, out)`` or HWIO.
    quantizer: DeepShiftQ, DeepShiftPS, S3 or DenseShift spec (see the module docstring
      for each mapping).
    margin: distance of each binarized latent from its threshold (S3, DenseShift).
    scale_exponent: integer ``k``, scalar or one per output channel: the latents encode
      ``weights * 2**-k`` (see ``choose_scale_exponents``).
    dtype: dtype of the latents.
  Returns:
    a dict with the keys and shapes of ``quantizer.init(key, weights.shape)``, numpy.
  """
  _check_quantizer(quantizer)
  if not (isinstance(margin, (int, float)) and margin > 0 and math.isfinite(margin)):
    raise ValueError(f"margin must be a positive number, got {margin!r}")
  w = np.asarray(weights, np.float64)
  if w.ndim < 2:
    raise ValueError(f"weights must have at least 2 dims (.., in, out), got {w.shape}")
  k = _as_exponent_array(scale_exponent, w)
  latents = _latents(w, quantizer, margin, k, dtype)
  # Exactly the latents the spec's init makes (S3 at 2 bits may have no shift latents).
  wanted = jax.eval_shape(lambda: quantizer.init(jax.random.key(0), w.shape, dtype))
  missing = set(wanted) - set(latents)
  if missing:
    raise ValueError(f"{quantizer!r} has latents {sorted(missing)} this mapping does not make")
  return {name: latents[name] for name in wanted}


def _latents(w: np.ndarray, quantizer: qz.Quantizer, margin: float, k: np.ndarray,
             dtype) -> dict[str, np.ndarray]:
  if isinstance(quantizer, qz.DeepShiftQ):
    return {"weight": (w * np.exp2(-k)).astype(dtype)}
  with np.errstate(divide="ignore"):
    e = _quantized_exponent(np.log2(np.abs(w)) - k, quantizer)
  is_zero = np.isneginf(e)
  lo, _ = _exponent_range(quantizer)
  index = np.where(is_zero, 0, e - lo).astype(np.int64)
  if isinstance(quantizer, qz.DeepShiftPS):
    return {"shift": (index + quantizer.p_min).astype(dtype),
            "sign": np.sign(w).astype(dtype)}
  sign = np.where(w >= 0, margin, -margin).astype(dtype)
  if isinstance(quantizer, qz.S3):
    latents = {"sign": sign, "sparse": np.where(is_zero, -margin, margin).astype(dtype)}
    if quantizer.num_shift_latents:  # ternary S3 has none (as S3.init)
      latents["shift"] = _bit_latents(index, quantizer.num_shift_latents, "chain", margin,
                                      dtype)
    return latents
  return {"sign": sign,
          "exponent": _bit_latents(index, quantizer.num_exponent_latents,
                                   quantizer.encoding, margin, dtype)}


def choose_scale_exponents(weights, quantizer: qz.Quantizer, *,
                           granularity: str = DEFAULT_GRANULARITY) -> np.ndarray:
  """Per-channel (or per-layer) integer scale exponent ``k`` for ``weights``.

  S3, DenseShift: the ``k`` maximizing ``cos(w, Q(w * 2**-k))``, ties (within 1e-4) going
  to the ``k`` nearest 0. DeepShift-Q/PS: 0, or the smallest ``k`` for which the largest
  ``|w| * 2**-k`` rounds to at most ``2**e0``.

  Args:
    weights: float kernel, ``(in, out)`` or HWIO.
    granularity: ``'channel'`` (int ``[out]``), ``'layer'`` (int scalar) or ``'none'``
      (0).
  """
  _check_quantizer(quantizer)
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  w = np.asarray(weights, np.float64)
  if granularity == "none":
    return np.zeros((), np.int64)
  cols = w.reshape(-1, w.shape[-1]) if granularity == "channel" else w.reshape(-1, 1)
  abs_w = np.abs(cols)
  with np.errstate(divide="ignore"):
    log2_abs = np.log2(abs_w)
  norm = np.sqrt(np.sum(abs_w ** 2, axis=0))
  rms = norm / math.sqrt(cols.shape[0])
  lo, hi = _exponent_range(quantizer)
  if isinstance(quantizer, (qz.DeepShiftQ, qz.DeepShiftPS)):
    # The DeepShift range is wide: keep the float weights as they are (k = 0) unless the
    # largest would round above the top power, then shift just enough.
    with np.errstate(divide="ignore"):
      top = np.log2(np.max(abs_w, axis=0))
    k = np.maximum(0, np.ceil(top - hi - 0.5))
    k = np.where(np.isfinite(k), k, 0).astype(np.int64)
    return k if granularity == "channel" else k.reshape(())
  center = np.round(np.log2(np.where(rms > 0, rms, 1.0)) - (lo + hi) / 2)
  reach = (hi - lo) // 2 + 4
  best_cos = np.full(cols.shape[1], -2.0)  # below any cosine
  best_k = np.zeros(cols.shape[1])
  # k = 0 first, then outwards from the center: a later k wins only if clearly better
  # or equally good and nearer 0.
  candidates = [np.zeros(cols.shape[1])] + [center + d for d in range(-reach, reach + 1)]
  for k in candidates:
    e = _quantized_exponent(log2_abs - k, quantizer)
    q = np.where(np.isneginf(e), 0.0, np.exp2(np.where(np.isneginf(e), 0, e)))
    q_norm = np.sqrt(np.sum(q ** 2, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
      cos = np.sum(abs_w * q, axis=0) / (norm * q_norm)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    tol = _COS_TOLERANCE
    better = (cos > best_cos + tol) | ((cos >= best_cos - tol) & (np.abs(k) < np.abs(best_k)))
    best_cos = np.where(better, cos, best_cos)
    best_k = np.where(better, k, best_k)
  best_k = np.where(norm > 0, best_k, 0).astype(np.int64)
  return best_k if granularity == "channel" else best_k.reshape(())


# ------------------------------------------------------------------------- whole trees


def following_norm(layer: Path) -> Path:
  """Path of the BatchNorm after conv ``layer`` in the shiftjax models.

  ``('stage1_block0', 'conv1') -> ('stage1_block0', 'bn1')``; ``('stem',) ->
  ('stem_bn',)``; ``(..., 'shortcut') -> (..., 'shortcut_bn')``.
  """
  name = layer[-1]
  if name.startswith("conv") and name[4:].isdigit():
    return layer[:-1] + ("bn" + name[4:],)
  return layer[:-1] + (name + "_bn",)


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  """``{path: leaf}``; a latent kernel dict counts as one leaf (path ends in 'kernel')."""
  out = {}
  for name, value in tree.items():
    path = prefix + (str(name),)
    if name == "kernel" and layers.is_latent_kernel(value):
      out[path] = dict(value)
    elif hasattr(value, "items"):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def _unflatten(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _name(path: Sequence[str]) -> str:
  return "/".join(path)


def _get(tree: Mapping, path: Path):
  node = tree
  for name in path:
    if not hasattr(node, "items") or name not in node:
      return None
    node = node[name]
  return node


def _is_activation_param(path: Path) -> bool:
  """A learned parameter of a layer's activation quantizer (``layers``' 'activation')."""
  return len(path) >= 2 and path[-2] == "activation"


def latent_layers(params: Mapping) -> list[Path]:
  """Paths of the layers whose kernel holds a quantizer's latents."""
  return [p[:-1] for p, v in flatten(params).items() if isinstance(v, dict)]


def _check_same_paths(shift_flat: Mapping, float_flat: Mapping, what: str) -> None:
  missing = [_name(p) for p in shift_flat if p not in float_flat]
  extra = [_name(p) for p in float_flat if p not in shift_flat]
  if missing or extra:
    raise ValueError(
        f"the float {what} do not match the shift model's: missing "
        f"{missing[:5] or 'none'}{' ...' if len(missing) > 5 else ''}, unexpected "
        f"{extra[:5] or 'none'}{' ...' if len(extra) > 5 else ''}. Use a float "
        "checkpoint of the same architecture (model, width, number of classes).")


def scale_exponents(shift_params: Mapping, float_params: Mapping,
                    quantizer: qz.Quantizer | None, *,
                    granularity: str = DEFAULT_GRANULARITY,
                    norm_for: Callable[[Path], Path] = following_norm
                    ) -> dict[Path, np.ndarray]:
  """``{layer path: k}`` for every quantized layer (see ``choose_scale_exponents``).

  A layer with no BatchNorm after it (``norm_for(path)`` absent from ``float_params``)
  gets ``k = 0``: nothing could absorb its scale.
  """
  out = {}
  for layer in latent_layers(shift_params):
    kernel = _get(float_params, layer + ("kernel",))
    if kernel is None or layers.is_latent_kernel(kernel):
      raise ValueError(f"layer {_name(layer)!r}: the float parameters have no float "
                       f"kernel there ({type(kernel).__name__}); init_from needs a float "
                       "model of the same architecture")
    has_norm = _get(float_params, norm_for(layer)) is not None
    out[layer] = choose_scale_exponents(
        np.asarray(kernel), policy_lib.spec_of(quantizer, _name(layer)),
        granularity=granularity if has_norm else "none")
  return out


def init_from_float(shift_params: Mapping, float_params: Mapping,
                    quantizer: qz.Quantizer | None, *, margin: float = DEFAULT_MARGIN,
                    granularity: str = DEFAULT_GRANULARITY,
                    norm_for: Callable[[Path], Path] = following_norm) -> dict:
  """Shift-model parameters from float parameters of the same architecture.

  Args:
    shift_params: the shift model's ``params`` (its structure, shapes and dtypes; of the
      values only those of activation parameters the float model lacks are read).
    float_params: the float model's ``params`` (arrays readable on this host).
    quantizer: the shift model's spec, or ``{layer path: spec}`` for mixed widths (None:
      a float model; everything is copied). Activation-quantizer parameters the float
      model lacks keep ``shift_params``' values (their initialization).
    margin, granularity: see ``shift_latents_from_float`` / ``choose_scale_exponents``.
    norm_for: the BatchNorm after a conv (``following_norm``).
  Returns:
    nested dicts of numpy arrays with ``shift_params``' structure. Pair it with
    ``batch_stats_from_float`` (same ``granularity``), or use ``variables_from_float``.
  Raises:
    ValueError naming the layer when the trees or shapes do not match.
  """
  shift_flat = flatten(shift_params)
  float_flat = flatten(float_params)
  # Activation quantizers' learned parameters (PACT's clipping range) that a float model
  # without them lacks keep the shift model's values: their initialization.
  kept = {p: np.asarray(v) for p, v in shift_flat.items()
          if _is_activation_param(p) and p not in float_flat}
  shift_flat = {p: v for p, v in shift_flat.items() if p not in kept}
  _check_same_paths(shift_flat, float_flat, "parameters")
  exponents = (scale_exponents(shift_params, float_params, quantizer,
                               granularity=granularity, norm_for=norm_for)
               if quantizer is not None else {})
  out = {}
  for path, leaf in shift_flat.items():
    source = float_flat[path]
    if isinstance(leaf, dict):
      if quantizer is None:
        raise ValueError(f"layer {_name(path[:-1])!r} holds latents but no quantizer "
                         "was given")
      spec = policy_lib.spec_of(quantizer, _name(path[:-1]))
      latents = shift_latents_from_float(np.asarray(source), spec, margin=margin,
                                         scale_exponent=exponents[path[:-1]])
      expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in leaf.items()}
      got = {k: (v.shape, np.dtype(leaf[k].dtype) if k in leaf else None)
             for k, v in latents.items()}
      if expected != got:
        raise ValueError(f"layer {_name(path[:-1])!r}: latents from a float kernel of "
                         f"shape {np.shape(source)} are {got}, the shift model has "
                         f"{expected} (is the quantizer {spec!r} the model's?)")
      out[path] = {k: v.astype(leaf[k].dtype) for k, v in latents.items()}
    else:
      if isinstance(source, dict):
        raise ValueError(f"{_name(path)!r} holds latents in the float parameters; "
                         "init_from needs a float model")
      if tuple(np.shape(source)) != tuple(leaf.shape):
        raise ValueError(f"{_name(path)!r} has shape {np.shape(source)} in the float "
                         f"parameters, the shift model expects {tuple(leaf.shape)}")
      out[path] = np.asarray(source).astype(leaf.dtype)
  out.update(kept)
  return _unflatten(out)


def batch_stats_from_float(shift_params: Mapping, float_params: Mapping,
                           float_batch_stats: Mapping, quantizer: qz.Quantizer | None, *,
                           granularity: str = DEFAULT_GRANULARITY,
                           norm_for: Callable[[Path], Path] = following_norm,
                           epsilon: float = BN_EPSILON) -> dict:
  """BatchNorm statistics for ``init_from_float``'s parameters (same options).

  The norm after a quantized layer with scale exponent ``k`` gets ``mean * 2**-k`` and
  ``2**-2k * (var + eps) - eps``; all other statistics are copied.
  """
  flat = {p: np.asarray(v) for p, v in flatten(float_batch_stats).items()}
  if quantizer is None:
    return _unflatten(flat)
  exponents = scale_exponents(shift_params, float_params, quantizer,
                              granularity=granularity, norm_for=norm_for)
  for layer, k in exponents.items():
    norm = norm_for(layer)
    mean, var = flat.get(norm + ("mean",)), flat.get(norm + ("var",))
    if mean is None or var is None:
      if np.any(k != 0):
        raise ValueError(f"layer {_name(layer)!r} was rescaled by 2**-k, but the float "
                         f"batch_stats have no {_name(norm)!r} mean/var to absorb it")
      continue
    c = np.exp2(-np.asarray(k, np.float64))
    flat[norm + ("mean",)] = (c * mean).astype(mean.dtype)
    flat[norm + ("var",)] = (c * c * (var.astype(np.float64) + epsilon) - epsilon
                             ).astype(var.dtype)
  return _unflatten(flat)


def variables_from_float(shift_variables: Mapping, float_variables: Mapping,
                         quantizer: qz.Quantizer | None, *, margin: float = DEFAULT_MARGIN,
                         granularity: str = DEFAULT_GRANULARITY,
                         norm_for: Callable[[Path], Path] = following_norm,
                         epsilon: float = BN_EPSILON) -> dict:
  """``{'params', 'batch_stats'}`` of the shift model from the float model's variables."""
  params = init_from_float(shift_variables["params"], float_variables["params"], quantizer,
                           margin=margin, granularity=granularity, norm_for=norm_for)
  out = {"params": params}
  if "batch_stats" in shift_variables or "batch_stats" in float_variables:
    shift_stats = flatten(shift_variables.get("batch_stats", {}))
    float_stats = flatten(float_variables.get("batch_stats", {}))
    _check_same_paths(shift_stats, float_stats, "batch_stats")
    out["batch_stats"] = batch_stats_from_float(
        shift_variables["params"], float_variables["params"],
        float_variables.get("batch_stats", {}), quantizer, granularity=granularity,
        norm_for=norm_for, epsilon=epsilon)
  return out


def recalibrate_batch_stats(apply_fn: Callable, variables: Mapping, batches,
                           **apply_kwargs) -> dict:
  """BatchNorm running statistics re-estimated on ``batches``; weights unchanged.

  The conversion is exact for the float network with quantized kernels, but quantization
  shifts the distributions that the float statistics describe, and the error compounds
  layer after layer. Forward passes in training mode over a few batches (what training
  steps at learning rate 0 would do) fix that: on Fashion-MNIST a converted 3-bit
  DenseShift ResNet-8 goes from 0.3-0.7 to within 0.01 of the float accuracy
  (``benchmarks/transfer_fashion_mnist.py``). With the shiftjax models' momentum 0.9,
  30 batches leave 4% of the starting statistics.

  Args:
    apply_fn: ``model.apply``; called as ``apply_fn(variables, x, train=True,
      mutable=['batch_stats'], **apply_kwargs)``.
    variables: ``{'params', 'batch_stats'}``.
    batches: iterable of model inputs (normalized images).
  """
  @jax.jit
  def update(variables, x):
    _, state = apply_fn(variables, x, train=True, mutable=["batch_stats"], **apply_kwargs)
    return state["batch_stats"]

  variables = dict(variables)
  for x in batches:
    variables["batch_stats"] = update(variables, x)
  return variables


# --------------------------------------------------------------------- checkpoints


def _step_directory(path: str, field: str = "init_from") -> str:
  """The checkpoint step directory that ``path`` names or holds (latest step); errors
  name the config ``field`` that gave the path."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{field}: {path} is not a directory (give a float run's "
                            "workdir, its 'checkpoints' directory or one step's)")
  for candidate in (path, os.path.join(path, "checkpoints")):
    steps = [d for d in os.listdir(candidate) if d.isdigit()
             and os.path.isdir(os.path.join(candidate, d))] if os.path.isdir(candidate) else []
    if steps:
      return os.path.join(candidate, max(steps, key=int))
  if os.path.isdir(os.path.join(path, "default")) or os.path.exists(
      os.path.join(path, "_CHECKPOINT_METADATA")):
    return path
  raise FileNotFoundError(f"{field}: no checkpoint found in {path} (expected "
                          "<workdir>/checkpoints/<step>/default as shiftjax.train writes)")


def load_float_params(path: str | os.PathLike, field: str = "init_from") -> dict[str, Any]:
  """Reads ``params`` and ``batch_stats`` of a training checkpoint as numpy arrays.

  Args:
    path: a run's workdir, its ``checkpoints`` directory (latest step) or a step
      directory, as ``shiftjax.train`` writes them.
    field: the config field named in errors (``init_from``, ``distill_from``).
  Returns:
    ``{'params': ..., 'batch_stats': ..., 'step': int}`` (nested dicts of numpy arrays).
    The arrays are read whole on this host, whatever devices wrote them.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  step_dir = _step_directory(os.fspath(path), field)
  item_dir = os.path.join(step_dir, "default")
  if not os.path.isdir(item_dir):
    item_dir = step_dir
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item_dir)
  tree = getattr(metadata, "item_metadata", None)
  tree = getattr(tree, "tree", tree)
  if tree is None:
    tree = getattr(metadata, "tree", metadata)
  if not hasattr(tree, "keys") or "params" not in tree:
    raise ValueError(f"{item_dir} is not a shiftjax training checkpoint (no 'params')")
  wanted = {k: tree[k] for k in ("params", "batch_stats", "step") if k in tree}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                            partial_restore=True))
  checkpointer.close()
  step_name = os.path.basename(step_dir)
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {},
          "step": int(np.asarray(restored["step"])) if "step" in restored
                  else int(step_name) if step_name.isdigit() else -1}


def init_from_config(config, shift_variables: Callable[[], Mapping],
                     quantizer: qz.Quantizer | Mapping[str, qz.Quantizer] | None, *,
                     resuming: bool = False) -> dict | None:
  """The ``--config.init_from`` hook: a fresh run's variables, converted from the float
  checkpoint ``config.init_from`` names (``variables_from_float`` of
  ``shift_variables()``, the shift model's initialized ``{'params', 'batch_stats'}``).

  None when the config names none, or when the run resumes (its own checkpoint wins).
  ValueError when a recipe that needs a float checkpoint (``config.init_from_required``)
  has none.
  """
  path = config.get("init_from", "") or ""
  if not path:
    if config.get("init_from_required", False):
      raise ValueError("this recipe fine-tunes a float model: pass "
                       "--config.init_from=<float run's workdir or checkpoint dir>")
    return None
  if resuming:
    return None
  source = load_float_params(path)
  return variables_from_float(
      shift_variables(), {"params": source["params"], "batch_stats": source["batch_stats"]},
      quantizer, margin=config.get("init_margin", DEFAULT_MARGIN),
      granularity=config.get("init_granularity", DEFAULT_GRANULARITY))
