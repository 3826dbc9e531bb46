"""Trained variables -> ``PackedModel``: BatchNorm folded, N-bit codes in uint32 words.

``pack(variables, architecture_name, config, quantizer)`` walks the layers the
architecture implies (``architecture.build_layers``) and stores, per layer:

  * a quantized conv: its codes (``quantizer.codes``), the HWIO kernel flattened to
    ``[kh * kw * I, O]`` and packed along axis 0 into uint32 words (``codes.pack``,
    ``floor(32 / bits)`` codes per word), and its BatchNorm as a float32 per-channel
    epilogue ``y = conv(x) * scale + bias`` with ``scale = gamma / sqrt(var + eps)``,
    ``bias = beta - mean * scale`` (``<name>/kernel``, ``<name>/scale``, ``<name>/bias``);
  * a full-precision conv (the stem): the scale folded into its kernel
    (``<name>/kernel`` HWIO, ``<name>/bias``);
  * the classifier: ``<name>/kernel`` ``(in, out)`` and ``<name>/bias`` (packed codes
    when it is quantized);
  * a layer whose input is quantized: its activation quantizer's learned parameters
    (``<name>/activation_clip`` for PACT), float32, exactly as trained.
Each quantized layer is packed by its own spec (``Layer.quantizer``: mixed widths).
Float kernels are stored as float32, or bfloat16 with ``float_dtype=jnp.bfloat16``
(storage only: ``packed_apply`` computes in float32). Scales and biases stay float32.
Every parameter must be used: a leftover one means the model code and the architecture
disagree, and packing refuses rather than drop it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax import policy as policy_lib
from shiftjax import quantizers as qz
from shiftjax.deploy import architecture
from shiftjax.deploy.architecture import Layer, PackedModelError
from shiftjax.deploy.format import FLOAT_DTYPES, PackedModel

# The BatchNorm of every model in shiftjax.models (blocks.conv_and_norm).
BN_EPSILON = 1e-5


def _subtree(tree, path: str, what: str):
  node = tree
  for part in path.split("/"):
    if not hasattr(node, "keys") or part not in node:
      raise PackedModelError(f"the model's {what} have no {path!r}, which the packed "
                             "architecture expects (was the model code changed?)")
    node = node[part]
  return node


def _leaf_paths(tree, prefix=()) -> list[str]:
  out = []
  for k, v in tree.items():
    if hasattr(v, "items"):
      out += _leaf_paths(v, prefix + (k,))
    else:
      out.append("/".join(prefix + (k,)))
  return out


def fold_batch_norm(gamma, beta, mean, var, eps: float = BN_EPSILON):
  """BatchNorm in eval mode as ``y * scale + bias``; float64 math, float32 results."""
  gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (gamma, beta, mean, var))
  scale = gamma / np.sqrt(var + eps)
  return scale, beta - mean * scale


def _all_codes(params, layers: Sequence[Layer]) -> dict[str, np.ndarray]:
  """Every quantized layer's codes by its own spec, in one compiled call."""
  latents, specs = {}, []
  for layer in layers:
    if layer.quantized:
      kernel = _subtree(params, f"{layer.name}/kernel", "params")
      if not policy_lib.is_latent_kernel(kernel):
        raise PackedModelError(f"layer {layer.name!r} holds float weights but its policy "
                               "makes it quantized")
      latents[layer.name] = dict(kernel)
      specs.append((layer.name, layer.quantizer))
  if not latents:
    return {}
  codes = _codes_fn(tuple(specs))(latents)
  return {k: np.asarray(v) for k, v in jax.device_get(codes).items()}


@functools.lru_cache(maxsize=16)
def _codes_fn(specs: tuple[tuple[str, qz.Quantizer], ...]):
  return jax.jit(lambda tree: {name: q.codes(tree[name]) for name, q in specs})


def pack_kernel_codes(codes: np.ndarray, bits: int, code_layout: str) -> np.ndarray:
  """A kernel's codes (its logical shape, HWIO or (in, out)) as uint32 words of
  ``code_layout``: the array ``architecture.packed_kernel_shape`` names."""
  if code_layout == "bitplanes":
    return codes_lib.pack_bitplanes(codes, bits)
  return codes_lib.pack(codes.reshape(-1, codes.shape[-1]), bits, axis=0)


def pack(variables: Mapping[str, Any], architecture_name: str, config: Mapping[str, Any],
         quantizer: qz.Quantizer | None, *, float_dtype=np.float32,
         metadata: Mapping[str, Any] | None = None,
         code_layout: str = "bitplanes") -> PackedModel:
  """Packs trained variables of a network described as data.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` (jax or numpy arrays) laid out as
      the ``shiftjax.models`` module of the architecture lays them out.
    architecture_name, config: the architecture (``architecture.check_architecture``);
      ``shiftjax.export.export`` reads them off a flax module.
    quantizer: the default weight spec (None: float); the config's policy rules
      (``layer_quantizers``, activations) give the layers their own.
    float_dtype: storage of the full-precision kernels: float32 or bfloat16.
    metadata: JSON-serializable facts to keep in the file.
    code_layout: ``'bitplanes'`` (exactly N bits per weight) or ``'words'``
      (``architecture.CODE_LAYOUTS``).
  Returns:
    a checked ``PackedModel``.
  """
  float_dtype = np.dtype(float_dtype).name
  if float_dtype not in FLOAT_DTYPES:
    raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype}")
  if code_layout not in architecture.CODE_LAYOUTS:
    raise PackedModelError(f"code_layout must be one of {architecture.CODE_LAYOUTS}, got "
                           f"{code_layout!r}")
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  name = architecture_name
  config = architecture.check_architecture(name, config)
  layers = architecture.build_layers(name, config, quantizer)
  arrays: dict[str, np.ndarray] = {}
  used: list[str] = []
  storage = np.dtype(jnp.bfloat16) if float_dtype == "bfloat16" else np.dtype(np.float32)
  all_codes = _all_codes(params, layers)
  for layer in layers:
    if layer.op not in ("conv", "dense"):
      continue
    if layer.activation is not None and layer.activation.param_shapes():
      learned = _subtree(params, f"{layer.name}/activation", "params")
      used.append(f"{layer.name}/activation")
      for param, shape in layer.activation.param_shapes().items():
        value = np.asarray(_subtree(learned, param, f"{layer.name} activation params"),
                           np.float32)
        if value.shape != tuple(shape):
          raise PackedModelError(f"layer {layer.name!r} activation {param} has shape "
                                 f"{value.shape}, expected {tuple(shape)}")
        arrays[f"{layer.name}/activation_{param}"] = value
    kernel = _subtree(params, f"{layer.name}/kernel", "params")
    used.append(f"{layer.name}/kernel")
    if layer.quantized != policy_lib.is_latent_kernel(kernel):
      raise PackedModelError(
          f"layer {layer.name!r} holds {'latents' if not layer.quantized else 'floats'} "
          f"but its policy makes it {'quantized' if layer.quantized else 'float'}")
    if layer.quantized:
      codes = all_codes[layer.name]
      weight_shape = codes.shape
    else:
      weight = np.asarray(kernel, np.float64)
      weight_shape = weight.shape
    if tuple(weight_shape) != layer.shape:
      raise PackedModelError(f"layer {layer.name!r} has shape {tuple(weight_shape)}, "
                             f"expected {layer.shape}")
    if layer.op == "conv":
      bn = architecture.bn_name(layer.name)
      gamma, beta = (_subtree(params, f"{bn}/{k}", "params") for k in ("scale", "bias"))
      mean, var = (_subtree(stats, f"{bn}/{k}", "batch_stats") for k in ("mean", "var"))
      used += [f"{bn}/scale", f"{bn}/bias"]
      scale, bias = fold_batch_norm(gamma, beta, mean, var)
    else:
      scale, bias = None, np.asarray(_subtree(params, f"{layer.name}/bias", "params"),
                                     np.float64)
      used.append(f"{layer.name}/bias")
    if layer.quantized:
      arrays[f"{layer.name}/kernel"] = pack_kernel_codes(
          codes, layer.code_format.bits, code_layout)
      if scale is not None:
        arrays[f"{layer.name}/scale"] = scale.astype(np.float32)
    else:
      folded = weight if scale is None else weight * scale
      arrays[f"{layer.name}/kernel"] = folded.astype(np.float32).astype(storage)
    arrays[f"{layer.name}/bias"] = bias.astype(np.float32)
  leftover = [p for p in _leaf_paths(params)
              if not any(p == u or p.startswith(u + "/") for u in used)]
  if leftover:
    raise PackedModelError(f"parameters {leftover[:5]} are not part of the packed {name} "
                           "(was the model code changed?)")
  packed = PackedModel(name, config, quantizer, layers, arrays, float_dtype,
                       dict(metadata or {}), code_layout)
  json.dumps(packed.metadata, allow_nan=False)  # fails early if not JSON-serializable
  packed.check()
  return packed



def with_code_layout(packed: PackedModel, code_layout: str) -> PackedModel:
  """``packed`` with its quantized kernels' codes in ``code_layout`` (the same codes).

  E.g. a version 1 file (``'words'``) rewritten at exactly N bits per weight::

    deploy.with_code_layout(deploy.load(old), "bitplanes").save(new)
  """
  if code_layout not in architecture.CODE_LAYOUTS:
    raise PackedModelError(f"code_layout must be one of {architecture.CODE_LAYOUTS}, got "
                           f"{code_layout!r}")
  if code_layout == packed.code_layout:
    return packed
  arrays = dict(packed.arrays)
  for layer in packed.layers:
    if not layer.quantized:
      continue
    bits = layer.code_format.bits
    words = arrays[f"{layer.name}/kernel"]
    if packed.code_layout == "words":
      codes = codes_lib.unpack(words, bits, math.prod(layer.shape[:-1]), axis=0)
    else:
      codes = codes_lib.unpack_bitplanes(words, bits, layer.shape)
    arrays[f"{layer.name}/kernel"] = pack_kernel_codes(codes.reshape(layer.shape), bits,
                                                       code_layout)
  out = dataclasses.replace(packed, arrays=arrays, code_layout=code_layout)
  out.check()
  return out
