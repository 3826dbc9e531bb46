"""Trained shift ResNets -> packed models: BatchNorm folded, N-bit codes in uint32 words.

``export(variables, model)`` turns a trained CIFAR, ImageNet or speech ResNet into a
``PackedModel``: a list of layers (``Layer``: conv, pools, dense), rebuilt
from the architecture's name and config, plus named numpy arrays:

  * a quantized conv keeps its codes (``quantizer.codes``), the HWIO kernel flattened to
    ``[kh * kw * I, O]`` and packed along axis 0 into uint32 words (``codes.pack``,
    ``floor(32 / bits)`` codes per word), and its BatchNorm as a float32 per-channel
    epilogue ``y = conv(x) * scale + bias`` with ``scale = gamma / sqrt(var + eps)``,
    ``bias = beta - mean * scale`` (``<name>/kernel``, ``<name>/scale``, ``<name>/bias``);
  * a full-precision conv (the stem) has the scale folded into its kernel
    (``<name>/kernel`` HWIO, ``<name>/bias``);
  * the classifier keeps ``<name>/kernel`` ``(in, out)`` and ``<name>/bias`` (packed
    codes when it is quantized).
Float kernels are stored as float32, or bfloat16 with ``float_dtype=jnp.bfloat16``
(storage only: ``packed_apply`` computes in float32). Scales and biases stay float32.

``packed_apply(packed, images)`` runs the network from that description alone: every
quantized conv calls ``shiftjax.kernels.pow2_conv`` on the packed words (Pallas on
GPU/TPU, decode + ``lax.conv`` with XLA on CPU), so the weights stay packed in memory.
The kernels serve zero-free formats of 2..5 bits (DenseShift, DeepShift-Q up to 5 bits);
formats with a zero code (S3, DeepShift-PS) and wider codes are unpacked and decoded
(``codes.decode``) in XLA and convolved with ``lax.conv`` on every backend.

File format, version 1 (all integers little-endian; ``PackedModel.save`` / ``load``)::

  bytes [0, 8)         magic b"SHIFTJAX"
  bytes [8, 12)        format version, uint32 (1)
  bytes [12, 20)       header length H, uint64
  bytes [20, 20 + H)   header: a UTF-8 JSON object (below)
  bytes [20 + H, D)    zeros, D = 20 + H rounded up to a multiple of 64
  bytes [D, D + S)     array data: each array's raw C-order little-endian bytes at
                       D + its offset (offsets are multiples of 64; zeros between)
  bytes [D + S, +32)   SHA-256 of bytes [0, D + S)

  header = {"format": "shiftjax.packed_model", "writer": "shiftjax 0.1.0",
            "architecture": {"name": "CifarResNet", "config": {...}},
            "quantizer": {"name": "DenseShift", "fields": {...}, "repr": "..."} | null,
            "code_format": {"bits": 3, "e0": 0, "has_zero": false} | null,
            "float_dtype": "float32" | "bfloat16",
            "layers": [{"op": "conv", "name": "stem", "input": "input", ...}, ...],
            "arrays": [{"name": "stem/kernel", "dtype": "float32", "shape": [3, 3, 1, 16],
                        "offset": 0, "nbytes": 576}, ...],
            "data_bytes": S, "metadata": {...}}

Array dtypes are limited to uint32, float32 and bfloat16. ``load`` reads bytes and JSON
only (no pickle, nothing that can run code) and checks, before returning anything: the
magic, the version, the length (``truncated at byte N (expected M)``), the checksum,
every array's dtype, size and place in the data section, and that the layers and every
array shape are those the architecture config implies (``layer X has shape Y, expected
Z``). A file from a stranger is data only.

``export_serialized`` writes packed inference as a ``jax.export`` artifact (the packed
words embedded as constants) that plain jax can deserialize and call without shiftjax.

Entry points: ``export``, ``from_checkpoint(config, workdir)`` (a training run's orbax
checkpoint), ``export_checkpoint`` (that, saved to ``<workdir>/model.shiftjax``; the
``experiments/export.py`` launcher), ``PackedModel.save``, ``load``, ``packed_apply``,
``export_serialized`` / ``save_serialized``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import struct
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import shiftjax
from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax import layers as layers_lib
from shiftjax import quantizers as qz
from shiftjax.models.resnet_cifar import CifarResNet
from shiftjax.models.resnet_imagenet import ImageNetResNet
from shiftjax.models import resnet_speech
from shiftjax.models.resnet_speech import SpeechResNet

MAGIC = b"SHIFTJAX"
FORMAT_VERSION = 1
FORMAT_NAME = "shiftjax.packed_model"
FILE_SUFFIX = ".shiftjax"
ALIGN = 64
DIGEST_BYTES = 32
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
MAX_HEADER_BYTES = 64 << 20

# The BatchNorm of every model in shiftjax.models (blocks.conv_and_norm).
BN_EPSILON = 1e-5

# dtype name in the file -> (little-endian storage dtype, dtype of the loaded array).
ARRAY_DTYPES = {
    "uint32": (np.dtype("<u4"), np.dtype(np.uint32)),
    "float32": (np.dtype("<f4"), np.dtype(np.float32)),
    "bfloat16": (np.dtype("<u2"), np.dtype(jnp.bfloat16)),
}
FLOAT_DTYPES = ("float32", "bfloat16")

ARCHITECTURES = ("CifarResNet", "ImageNetResNet", "SpeechResNet")
BLOCKS = ("basic", "bottleneck")
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)
# Bounds on configs read from files, so that a hostile header cannot ask for a huge graph.
_MAX_DEPTH = 1202
_MAX_BLOCKS_PER_STAGE = 64
_MAX_CLASSES = 1 << 20
_MAX_CHANNELS = 4096
_MAX_WIDTH_MULTIPLIER = 64.0
_MAX_PATTERNS = 64
_MAX_STAGES = 8
_MAX_STRIDE = 8


class PackedModelError(ValueError):
  """A packed model file or description is malformed; the message names the problem."""


# ---------------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Layer:
  """One step of the packed forward pass; its output is named ``name``.

  Attributes:
    op: ``'conv'`` (NHWC conv, then ``* scale + bias``, ``+ residual``, relu),
      ``'max_pool'``, ``'mean_pool'`` (global mean over H and W), ``'dense'``, or a
      SpeechResNet's pooling of ``[N, time, frequency, C]``: ``'speech_<how>_pool'``
      with ``<how>`` one of ``resnet_speech.POOLINGS`` (``resnet_speech.pool``).
    name: the layer's path in the flax model (``'stage1_block0/conv1'``); its arrays are
      ``'<name>/kernel'``, ``'<name>/scale'`` (quantized convs), ``'<name>/bias'``.
    input: name of the layer whose output it reads, or ``'input'`` (the images).
    residual: conv only: name of an output added after the bias, before the relu.
    relu: apply relu last.
    quantized: the kernel is packed codes (else float weights).
    shape: the logical weight shape, HWIO for a conv and ``(in, out)`` for a dense.
    strides: conv and max_pool strides.
    padding: ``'SAME'`` or ``((top, bottom), (left, right))``.
    window: max_pool window.
  """
  op: str
  name: str
  input: str
  residual: str | None = None
  relu: bool = False
  quantized: bool = False
  shape: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: Any = ()
  window: tuple[int, ...] = ()

  def to_json(self) -> dict:
    """The layer as a JSON-serializable dict (the packed file's header)."""
    padding = (self.padding if isinstance(self.padding, str)
               else [list(p) for p in self.padding])
    return {"op": self.op, "name": self.name, "input": self.input,
            "residual": self.residual, "relu": self.relu, "quantized": self.quantized,
            "shape": list(self.shape), "strides": list(self.strides), "padding": padding,
            "window": list(self.window)}


def _speech_pool_op(how: str) -> str:
  """The layer op of a SpeechResNet's pooling ``how`` (``resnet_speech.POOLINGS``)."""
  return f"speech_{how}_pool"


# Layer op -> how, the inverse of _speech_pool_op.
_SPEECH_POOLS = {_speech_pool_op(how): how for how in resnet_speech.POOLINGS}


def _conv(name, src, shape, strides=1, *, padding="SAME", relu=False, residual=None,
          quantized=False) -> Layer:
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  return Layer("conv", name, src, residual=residual, relu=relu, quantized=quantized,
               shape=tuple(int(d) for d in shape), strides=strides, padding=padding)


def _residual_stages(out: list[Layer], src: str, cin: int, stage_sizes, widths,
                     block: str, quantized, first_stride: int = 1) -> tuple[str, int]:
  """Appends the blocks of ``blocks.residual_stages``; returns (last output, channels)."""
  for i, (num_blocks, width) in enumerate(zip(stage_sizes, widths)):
    for j in range(num_blocks):
      stride = (first_stride if i == 0 else 2) if j == 0 else 1
      p = f"stage{i + 1}_block{j}"
      if block == "basic":
        cout = width
        body = [(f"{p}/conv1", (3, 3, cin, width), stride),
                (f"{p}/conv2", (3, 3, width, width), 1)]
      else:
        cout = 4 * width
        body = [(f"{p}/conv1", (1, 1, cin, width), 1),
                (f"{p}/conv2", (3, 3, width, width), stride),
                (f"{p}/conv3", (1, 1, width, cout), 1)]
      x = src
      for name, shape, s in body[:-1]:
        out.append(_conv(name, x, shape, s, relu=True, quantized=quantized(name)))
        x = name
      residual = src
      # The blocks project the shortcut exactly when the output shape differs.
      if stride != 1 or cin != cout:
        residual = f"{p}/shortcut"
        out.append(_conv(residual, src, (1, 1, cin, cout), stride,
                         quantized=quantized(residual)))
      name, shape, s = body[-1]
      out.append(_conv(name, x, shape, s, relu=True, residual=residual,
                       quantized=quantized(name)))
      src, cin = name, cout
  return src, cin


def cifar_widths(width_multiplier: float) -> list[int]:
  """Stage widths of a CIFAR ResNet (16-32-64 times ``width_multiplier``)."""
  return [int(round(w * width_multiplier)) for w in CIFAR_WIDTHS]


def build_layers(architecture: str, config: Mapping[str, Any],
                 quantizer: qz.Quantizer | None) -> tuple[Layer, ...]:
  """The packed forward pass of an architecture (what the flax module computes)."""
  policy = layers_lib.LayerPolicy(quantizer, tuple(config["full_precision"]))

  def quantized(name: str) -> bool:
    return policy.quantizer_for(name.split("/")) is not None

  cin = config["in_channels"]
  out: list[Layer] = []
  pool_op = "mean_pool"
  if architecture == "CifarResNet":
    widths = cifar_widths(config["width_multiplier"])
    n = (config["depth"] - 2) // 6
    out.append(_conv("stem", "input", (3, 3, cin, widths[0]), relu=True,
                     quantized=quantized("stem")))
    src, cin = _residual_stages(out, "stem", widths[0], [n] * 3, widths, "basic",
                                quantized)
  elif architecture == "ImageNetResNet":
    out.append(_conv("stem", "input", (7, 7, cin, IMAGENET_WIDTHS[0]), 2,
                     padding=((3, 3), (3, 3)), relu=True, quantized=quantized("stem")))
    out.append(Layer("max_pool", "stem_pool", "stem", strides=(2, 2),
                     padding=((1, 1), (1, 1)), window=(3, 3)))
    src, cin = _residual_stages(out, "stem_pool", IMAGENET_WIDTHS[0],
                                config["stage_sizes"], IMAGENET_WIDTHS, config["block"],
                                quantized)
  elif architecture == "SpeechResNet":
    widths = config["widths"]
    out.append(_conv("stem", "input", (3, 3, cin, widths[0]), config["stem_strides"],
                     relu=True, quantized=quantized("stem")))
    src, cin = _residual_stages(out, "stem", widths[0], config["stage_sizes"], widths,
                                "basic", quantized, first_stride=config["first_stride"])
    pool_op = _speech_pool_op(config["pooling"])
    if config["pooling"] == "meanmax":  # mean and max side by side
      cin *= 2
  else:
    raise PackedModelError(f"unknown architecture {architecture!r}; "
                           f"known: {', '.join(ARCHITECTURES)}")
  out.append(Layer(pool_op, "pool", src))
  out.append(Layer("dense", "head", "pool", quantized=quantized("head"),
                   shape=(cin, config["num_classes"])))
  return tuple(out)


def _bn_name(conv_name: str) -> str:
  """The BatchNorm after a conv, as the blocks and stems name it."""
  head, _, last = conv_name.rpartition("/")
  bn = {"stem": "stem_bn", "shortcut": "shortcut_bn"}.get(last, last.replace("conv", "bn"))
  return f"{head}/{bn}" if head else bn


def expected_arrays(layers: Sequence[Layer], code_format: codes_lib.CodeFormat | None,
                    float_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{array name: (dtype name, shape)}`` that a packed model of ``layers`` holds."""
  out = {}
  for layer in layers:
    if layer.op not in ("conv", "dense"):
      continue
    n_out = layer.shape[-1]
    if layer.quantized:
      k = math.prod(layer.shape[:-1])
      out[f"{layer.name}/kernel"] = ("uint32", (codes_lib.num_words(k, code_format.bits),
                                                n_out))
      if layer.op == "conv":
        out[f"{layer.name}/scale"] = ("float32", (n_out,))
    else:
      out[f"{layer.name}/kernel"] = (float_dtype, layer.shape)
    out[f"{layer.name}/bias"] = ("float32", (n_out,))
  return out


# ------------------------------------------------------------------------- architectures


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_architecture(name: Any, config: Any) -> dict:
  """Validates an architecture config (from a file or a module); returns a clean copy."""
  if name not in ARCHITECTURES:
    raise PackedModelError(f"unknown architecture {name!r}; known: "
                           f"{', '.join(ARCHITECTURES)}")
  if not isinstance(config, Mapping):
    raise PackedModelError(f"architecture config must be a JSON object, got {config!r}")
  keys = {"num_classes", "in_channels", "full_precision"} | {
      "CifarResNet": {"depth", "width_multiplier"},
      "ImageNetResNet": {"stage_sizes", "block"},
      "SpeechResNet": {"stage_sizes", "widths", "stem_strides", "first_stride", "pooling"},
  }[name]
  if set(config) != keys:
    raise PackedModelError(
        f"{name} config must have exactly the fields {sorted(keys)}, got {sorted(config)}")

  def bounded_int(field, lo, hi, value=None):
    value = config[field] if value is None else value
    if not _is_int(value) or not lo <= value <= hi:
      raise PackedModelError(f"{name} {field} must be an integer in {lo}..{hi}, "
                             f"got {value!r}")
    return int(value)

  out = {"num_classes": bounded_int("num_classes", 1, _MAX_CLASSES),
         "in_channels": bounded_int("in_channels", 1, _MAX_CHANNELS)}
  patterns = config["full_precision"]
  if (not isinstance(patterns, (list, tuple)) or len(patterns) > _MAX_PATTERNS
      or not all(isinstance(p, str) and len(p) <= 256 for p in patterns)):
    raise PackedModelError(f"{name} full_precision must be a list of at most "
                           f"{_MAX_PATTERNS} glob patterns, got {patterns!r}")
  out["full_precision"] = list(patterns)
  if name == "CifarResNet":
    depth = bounded_int("depth", 8, _MAX_DEPTH)
    if (depth - 2) % 6:
      raise PackedModelError(f"CifarResNet depth must be 6n+2, got {depth}")
    wm = config["width_multiplier"]
    if (isinstance(wm, bool) or not isinstance(wm, (int, float, np.floating))
        or not 0 < wm <= _MAX_WIDTH_MULTIPLIER):
      raise PackedModelError(f"CifarResNet width_multiplier must be a number in (0, "
                             f"{_MAX_WIDTH_MULTIPLIER}], got {wm!r}")
    if min(cifar_widths(wm)) < 1:
      raise PackedModelError(f"CifarResNet width_multiplier {wm} gives stage widths "
                             f"{cifar_widths(wm)}; every stage needs a channel")
    out.update(depth=depth, width_multiplier=float(wm))
  elif name == "SpeechResNet":
    sizes, widths, stem = config["stage_sizes"], config["widths"], config["stem_strides"]
    if (not isinstance(sizes, (list, tuple)) or not isinstance(widths, (list, tuple))
        or not 1 <= len(sizes) <= _MAX_STAGES or len(widths) != len(sizes)):
      raise PackedModelError(f"SpeechResNet stage_sizes and widths must be lists of "
                             f"1..{_MAX_STAGES} equal lengths, got {sizes!r} and {widths!r}")
    if not isinstance(stem, (list, tuple)) or len(stem) != 2:
      raise PackedModelError(f"SpeechResNet stem_strides must be [time, frequency], got "
                             f"{stem!r}")
    if config["pooling"] not in resnet_speech.POOLINGS:
      raise PackedModelError(f"SpeechResNet pooling must be one of "
                             f"{resnet_speech.POOLINGS}, got {config['pooling']!r}")
    out.update(
        stage_sizes=[bounded_int("stage_sizes", 1, _MAX_BLOCKS_PER_STAGE, s) for s in sizes],
        widths=[bounded_int("widths", 1, _MAX_CHANNELS, w) for w in widths],
        stem_strides=[bounded_int("stem_strides", 1, _MAX_STRIDE, s) for s in stem],
        first_stride=bounded_int("first_stride", 1, _MAX_STRIDE),
        pooling=config["pooling"])
  else:
    sizes = config["stage_sizes"]
    if not isinstance(sizes, (list, tuple)) or not 1 <= len(sizes) <= len(IMAGENET_WIDTHS):
      raise PackedModelError(f"ImageNetResNet stage_sizes must be a list of 1.."
                             f"{len(IMAGENET_WIDTHS)} block counts, got {sizes!r}")
    out["stage_sizes"] = [bounded_int("stage_sizes", 1, _MAX_BLOCKS_PER_STAGE, s)
                          for s in sizes]
    if config["block"] not in BLOCKS:
      raise PackedModelError(f"ImageNetResNet block must be one of {BLOCKS}, got "
                             f"{config['block']!r}")
    out["block"] = config["block"]
  return out


def _leaf_shape(tree) -> tuple[int, ...]:
  return tuple(jax.tree.leaves(tree)[0].shape)


def architecture_of(model: nn.Module, params) -> tuple[str, dict]:
  """(name, config) of a shiftjax ResNet module; ``params`` give the input channels."""
  if not isinstance(model, (CifarResNet, ImageNetResNet, SpeechResNet)):
    raise PackedModelError(f"export supports {', '.join(ARCHITECTURES)} modules, got "
                           f"{type(model).__name__}")
  try:
    stem = params["stem"]["kernel"]
  except (KeyError, TypeError):
    raise PackedModelError("params have no 'stem/kernel': pass the variables of a "
                           "shiftjax ResNet ({'params': ..., 'batch_stats': ...})") from None
  # Every latent of a kernel, stacked or not, ends in (..., I, O).
  in_channels = _leaf_shape(stem)[-2]
  common = {"num_classes": int(model.num_classes), "in_channels": int(in_channels),
            "full_precision": list(model.full_precision)}
  if isinstance(model, CifarResNet):
    name, config = "CifarResNet", dict(common, depth=int(model.depth),
                                       width_multiplier=float(model.width_multiplier))
  elif isinstance(model, SpeechResNet):
    name, config = "SpeechResNet", dict(
        common, stage_sizes=list(model.stage_sizes),
        widths=resnet_speech.stage_widths(model.widths, model.width_multiplier),
        stem_strides=list(model.stem_strides), first_stride=int(model.first_stride),
        pooling=model.pooling)
  else:
    name, config = "ImageNetResNet", dict(common, stage_sizes=list(model.stage_sizes),
                                          block=model.block)
  return name, check_architecture(name, config)


def quantizer_to_json(quantizer: qz.Quantizer | None) -> dict | None:
  """``{"name": ..., <fields>}`` of a spec (None for float); ``quantizer_from_json`` inverts it."""
  if quantizer is None:
    return None
  fields = {f.name: getattr(quantizer, f.name) for f in dataclasses.fields(quantizer)}
  return {"name": type(quantizer).__name__,
          "fields": {k: (int(v) if _is_int(v) else v) for k, v in fields.items()},
          "repr": repr(quantizer)}


def quantizer_from_json(spec: Any) -> qz.Quantizer | None:
  """Rebuilds a quantizer spec from its JSON description (a dataclass, no code run)."""
  if spec is None:
    return None
  if not isinstance(spec, Mapping) or set(spec) != {"name", "fields", "repr"}:
    raise PackedModelError(f"quantizer must be null or an object with name, fields and "
                           f"repr, got {spec!r}")
  cls = qz.QUANTIZERS.get(spec["name"]) if isinstance(spec["name"], str) else None
  if cls is None:
    raise PackedModelError(f"unknown quantizer {spec['name']!r}; known: "
                           f"{', '.join(qz.QUANTIZERS)}")
  fields = spec["fields"]
  allowed = {f.name for f in dataclasses.fields(cls)}
  if (not isinstance(fields, Mapping) or not set(fields) <= allowed
      or not all(isinstance(v, (int, str)) for v in fields.values())):
    raise PackedModelError(f"quantizer {spec['name']} fields must be some of "
                           f"{sorted(allowed)} with integer or string values, got {fields!r}")
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise PackedModelError(f"invalid quantizer {spec['name']}{fields}: {e}") from None


def _format_to_json(fmt: codes_lib.CodeFormat | None) -> dict | None:
  return None if fmt is None else {"bits": fmt.bits, "e0": fmt.e0, "has_zero": fmt.has_zero}


# ---------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, eq=False)
class PackedModel:
  """A deployable shift network: architecture, quantizer, layers and numpy arrays.

  Build one with ``export`` / ``from_checkpoint`` / ``load``; run it with
  ``packed_apply``; write it with ``save``.

  Attributes:
    architecture: one of ``ARCHITECTURES``.
    config: the architecture's fields (``check_architecture``), including
      ``in_channels`` and the ``full_precision`` layer patterns.
    quantizer: the spec whose codes the packed kernels hold (None: a float model).
    layers: the forward pass (``build_layers(architecture, config, quantizer)``).
    arrays: ``{'<layer>/kernel' | '/scale' | '/bias': numpy array}``.
    float_dtype: ``'float32'`` or ``'bfloat16'``, storage of float kernels.
    metadata: JSON-serializable extra facts (source step, dataset, input normalization).
  """
  architecture: str
  config: dict
  quantizer: qz.Quantizer | None
  layers: tuple[Layer, ...]
  arrays: dict[str, np.ndarray]
  float_dtype: str = "float32"
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def code_format(self) -> codes_lib.CodeFormat | None:
    """The code format of the packed kernels (None for a float model)."""
    return None if self.quantizer is None else self.quantizer.code_format

  @property
  def plan(self) -> tuple:
    """The static part of the forward pass (hashable; a ``jax.jit`` static argument)."""
    return (self.layers, self.code_format)

  @functools.cached_property
  def device_arrays(self) -> dict[str, jax.Array]:
    """The arrays on the default device, still packed (computed once)."""
    return {k: jnp.asarray(v) for k, v in self.arrays.items()}

  def jitted_forward(self, backend: str | None = None, platform: str | None = None):
    """``jax.jit`` of ``forward`` for this model's plan: ``f(arrays, images)``.

    Built once per (backend, platform), so that a call does not hash the plan again.
    """
    cache = self.__dict__.setdefault("_jitted", {})
    if (backend, platform) not in cache:
      cache[(backend, platform)] = jax.jit(functools.partial(
          forward, plan=self.plan, backend=backend, platform=platform))
    return cache[(backend, platform)]

  def check(self) -> None:
    """Raises PackedModelError unless the layers and arrays fit the architecture."""
    config = check_architecture(self.architecture, self.config)
    if self.float_dtype not in FLOAT_DTYPES:
      raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got "
                             f"{self.float_dtype!r}")
    _check_layers([l.to_json() for l in self.layers],
                  build_layers(self.architecture, config, self.quantizer))
    declared = {name: (_dtype_name(a.dtype), tuple(a.shape))
                for name, a in self.arrays.items()}
    _check_array_specs(declared, expected_arrays(self.layers, self.code_format,
                                                 self.float_dtype))

  def flax_module(self) -> nn.Module:
    """The flax module this model was exported from (for comparisons and fine-tuning)."""
    c = self.config
    common = dict(num_classes=c["num_classes"], quantizer=self.quantizer,
                  full_precision=tuple(c["full_precision"]))
    if self.architecture == "CifarResNet":
      return CifarResNet(depth=c["depth"], width_multiplier=c["width_multiplier"], **common)
    if self.architecture == "SpeechResNet":
      return SpeechResNet(stage_sizes=tuple(c["stage_sizes"]), widths=tuple(c["widths"]),
                          stem_strides=tuple(c["stem_strides"]),
                          first_stride=c["first_stride"], pooling=c["pooling"], **common)
    return ImageNetResNet(stage_sizes=tuple(c["stage_sizes"]), block=c["block"], **common)

  def size_report(self) -> dict[str, Any]:
    """Stored bytes against the float32 weights of the trained network.

    ``float32_weight_bytes`` counts every weight of the unfolded network as float32: conv
    and dense kernels, conv BatchNorm (gamma, beta, mean, var) and the dense bias, as
    ``train.weight_bytes`` does.
    """
    quantized = quantized_words = float_weights = 0
    for layer in self.layers:
      if layer.op not in ("conv", "dense"):
        continue
      n = math.prod(layer.shape)
      float_weights += n + (4 if layer.op == "conv" else 1) * layer.shape[-1]
      if layer.quantized:
        quantized += n
        quantized_words += self.arrays[f"{layer.name}/kernel"].size
    array_bytes = sum(a.nbytes for a in self.arrays.values())
    return {"float32_weight_bytes": 4 * float_weights,
            "array_bytes": array_bytes,
            "quantized_weights": quantized,
            "bits_per_quantized_weight": 32 * quantized_words / quantized if quantized
                                         else None}

  # ------------------------------------------------------------------------ the file

  def to_bytes(self) -> bytes:
    """The file's bytes (see the module docstring); checks the model first."""
    self.check()
    entries, blobs, data_bytes = [], [], 0
    for name, a in self.arrays.items():
      dtype = _dtype_name(a.dtype)
      storage = ARRAY_DTYPES[dtype][0]
      # Same-size native view, then little-endian bytes (a no-op on little-endian hosts).
      raw = np.ascontiguousarray(a).view(storage.newbyteorder("=")).astype(
          storage, copy=False).tobytes()
      offset = _align(data_bytes)
      entries.append({"name": name, "dtype": dtype, "shape": list(a.shape),
                      "offset": offset, "nbytes": len(raw)})
      blobs.append((offset, raw))
      data_bytes = offset + len(raw)
    header = {
        "format": FORMAT_NAME,
        "writer": f"shiftjax {shiftjax.__version__}",
        "architecture": {"name": self.architecture, "config": self.config},
        "quantizer": quantizer_to_json(self.quantizer),
        "code_format": _format_to_json(self.code_format),
        "float_dtype": self.float_dtype,
        "layers": [l.to_json() for l in self.layers],
        "arrays": entries,
        "data_bytes": data_bytes,
        "metadata": self.metadata,
    }
    head = json.dumps(header, sort_keys=False, allow_nan=False).encode("utf-8")
    start = _align(_PREFIX.size + len(head))
    buf = bytearray(start + data_bytes)
    _PREFIX.pack_into(buf, 0, MAGIC, FORMAT_VERSION, len(head))
    buf[_PREFIX.size:_PREFIX.size + len(head)] = head
    for off, raw in blobs:
      buf[start + off:start + off + len(raw)] = raw
    buf += hashlib.sha256(buf).digest()
    return bytes(buf)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes the model file atomically (a temporary file in the same directory, then a
    rename); FileExistsError if ``path`` exists, unless ``overwrite``. Returns the path."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    write_atomic(path, self.to_bytes(), overwrite=overwrite)
    return path


def _dtype_name(dtype) -> str:
  """The file's name of an array dtype (its numpy name if the file cannot hold it)."""
  dtype = np.dtype(dtype)
  for name, (_, loaded) in ARRAY_DTYPES.items():
    if dtype == loaded:
      return name
  return str(dtype)


def _align(n: int) -> int:
  return -(-n // ALIGN) * ALIGN


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> None:
  """Writes ``data`` to a temporary file beside ``path``, syncs it, then renames it.

  An interrupted write leaves ``path`` as it was. Without ``overwrite`` the final step
  is a hard link, which fails (FileExistsError) if ``path`` appeared in the meantime.
  """
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  tmp = None
  for attempt in range(100):
    candidate = os.path.join(directory, f".{base}.{os.getpid()}.{attempt}.tmp")
    try:
      fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      continue
    tmp = candidate
    break
  if tmp is None:
    raise FileExistsError(f"could not create a temporary file beside {path}")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)
      except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it") from None
      except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(path):
          raise FileExistsError(
              f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)
  try:  # make the rename durable; not every platform can open a directory
    dir_fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(dir_fd)
  except OSError:
    pass
  finally:
    os.close(dir_fd)


# ------------------------------------------------------------------------------ loading


def _check_layers(stored: Any, expected: Sequence[Layer]) -> None:
  if not isinstance(stored, list):
    raise PackedModelError(f"layers must be a list, got {type(stored).__name__}")
  for i, want in enumerate(expected):
    if i >= len(stored):
      raise PackedModelError(f"the file has {len(stored)} layers, the architecture "
                             f"{len(expected)} (layer {want.name!r} is missing)")
    if stored[i] != want.to_json():
      got = stored[i]
      name = got.get("name") if isinstance(got, dict) else None
      if isinstance(got, dict) and name == want.name and got.get("shape") != list(
          want.shape):
        raise PackedModelError(f"layer {name!r} has shape {got.get('shape')}, "
                               f"expected {list(want.shape)}")
      raise PackedModelError(f"layer {i} is {got}, but the architecture implies "
                             f"{want.to_json()}")
  if len(stored) > len(expected):
    raise PackedModelError(f"the file has {len(stored)} layers, the architecture "
                           f"{len(expected)}")


def _check_array_specs(declared: Mapping[str, tuple[str, tuple]],
                       expected: Mapping[str, tuple[str, tuple]]) -> None:
  for name, (dtype, shape) in expected.items():
    if name not in declared:
      raise PackedModelError(f"array {name!r} is missing")
    got_dtype, got_shape = declared[name]
    layer, _, what = name.rpartition("/")
    if tuple(got_shape) != tuple(shape):
      raise PackedModelError(f"layer {layer!r} {what} has shape {tuple(got_shape)}, "
                             f"expected {tuple(shape)}")
    if got_dtype != dtype:
      raise PackedModelError(f"layer {layer!r} {what} has dtype {got_dtype}, "
                             f"expected {dtype}")
  extra = sorted(set(declared) - set(expected))
  if extra:
    raise PackedModelError(f"unexpected arrays {extra} (not part of the architecture)")


def _no_duplicate_keys(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {k!r}")
    out[k] = v
  return out


def _reject_constant(name):
  raise ValueError(f"non-standard JSON constant {name}")


_HEADER_KEYS = {"format", "writer", "architecture", "quantizer", "code_format",
                "float_dtype", "layers", "arrays", "data_bytes", "metadata"}
_ARRAY_KEYS = {"name", "dtype", "shape", "offset", "nbytes"}


def from_bytes(buf: bytes, *, source: str = "packed model") -> PackedModel:
  """Parses and checks a packed model file's bytes (``load`` without the file)."""
  buf = bytes(buf)

  def fail(message):
    return PackedModelError(f"{source}: {message}")

  n = len(buf)
  minimum = _PREFIX.size + DIGEST_BYTES
  if n < len(MAGIC) or buf[:len(MAGIC)] != MAGIC[:n]:
    raise fail(f"not a shiftjax packed model (starts with {buf[:len(MAGIC)]!r}, "
               f"expected {MAGIC!r})")
  if n < minimum:
    raise fail(f"truncated at byte {n} (expected at least {minimum})")
  _, version, header_len = _PREFIX.unpack_from(buf, 0)
  if version != FORMAT_VERSION:
    raise fail(f"unsupported format version {version} (this shiftjax "
               f"{shiftjax.__version__} reads version {FORMAT_VERSION})")
  digest_ok = hashlib.sha256(memoryview(buf)[:n - DIGEST_BYTES]).digest() == (
      buf[n - DIGEST_BYTES:])
  checksum_error = fail("checksum mismatch: the file is corrupted (SHA-256 of bytes "
                        f"0..{n - DIGEST_BYTES} differs from the one stored at its end)")
  if header_len > MAX_HEADER_BYTES:
    if not digest_ok:
      raise checksum_error
    raise fail(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
  data_start = _align(_PREFIX.size + header_len)
  if n < data_start + DIGEST_BYTES:
    raise fail(f"truncated at byte {n} (expected at least {data_start + DIGEST_BYTES})")
  try:
    header = json.loads(buf[_PREFIX.size:_PREFIX.size + header_len].decode("utf-8"),
                        object_pairs_hook=_no_duplicate_keys,
                        parse_constant=_reject_constant)
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not digest_ok:
      raise checksum_error from None
    raise fail(f"header is not valid JSON: {e}") from None
  if not isinstance(header, dict) or not _is_int(header.get("data_bytes")) or (
      header["data_bytes"] < 0):
    if not digest_ok:
      raise checksum_error
    raise fail("header must be a JSON object with a non-negative integer data_bytes")
  expected_size = data_start + header["data_bytes"] + DIGEST_BYTES
  if n < expected_size:
    raise fail(f"truncated at byte {n} (expected {expected_size})")
  if not digest_ok:
    raise checksum_error
  if n > expected_size:
    raise fail(f"{n - expected_size} unexpected bytes after the checksum (file is {n} "
               f"bytes, expected {expected_size})")
  try:
    return _model_from_header(header, buf, data_start)
  except PackedModelError as e:
    raise fail(str(e)) from None


def _model_from_header(header: dict, buf: bytes, data_start: int) -> PackedModel:
  missing, unknown = _HEADER_KEYS - set(header), set(header) - _HEADER_KEYS
  if missing or unknown:
    raise PackedModelError(f"header fields differ from version {FORMAT_VERSION}: missing "
                           f"{sorted(missing)}, unknown {sorted(unknown)}")
  if header["format"] != FORMAT_NAME:
    raise PackedModelError(f"header format is {header['format']!r}, expected "
                           f"{FORMAT_NAME!r}")
  arch = header["architecture"]
  if not isinstance(arch, dict) or set(arch) != {"name", "config"}:
    raise PackedModelError(f"architecture must be an object with name and config, got "
                           f"{arch!r}")
  config = check_architecture(arch["name"], arch["config"])
  quantizer = quantizer_from_json(header["quantizer"])
  fmt = None if quantizer is None else quantizer.code_format
  if header["code_format"] != _format_to_json(fmt):
    raise PackedModelError(f"code_format {header['code_format']} does not match the "
                           f"quantizer's {_format_to_json(fmt)}")
  float_dtype = header["float_dtype"]
  if float_dtype not in FLOAT_DTYPES:
    raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got "
                           f"{float_dtype!r}")
  layers = build_layers(arch["name"], config, quantizer)
  _check_layers(header["layers"], layers)
  if not isinstance(header["metadata"], dict):
    raise PackedModelError("metadata must be a JSON object")

  entries = header["arrays"]
  if not isinstance(entries, list):
    raise PackedModelError("arrays must be a list")
  data_bytes = header["data_bytes"]
  declared, spans = {}, []
  for e in entries:
    if not isinstance(e, dict) or set(e) != _ARRAY_KEYS:
      raise PackedModelError(f"array entries need exactly the fields "
                             f"{sorted(_ARRAY_KEYS)}, got {e!r}")
    name, dtype, shape = e["name"], e["dtype"], e["shape"]
    if not isinstance(name, str) or name in declared:
      raise PackedModelError(f"array name {name!r} is not a string or is repeated")
    if dtype not in ARRAY_DTYPES:
      raise PackedModelError(f"array {name!r} has dtype {dtype!r}; allowed: "
                             f"{', '.join(ARRAY_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise PackedModelError(f"array {name!r} has shape {shape!r}, not a list of "
                             "non-negative integers")
    offset, nbytes = e["offset"], e["nbytes"]
    size = math.prod(shape) * ARRAY_DTYPES[dtype][0].itemsize
    if not _is_int(nbytes) or nbytes != size:
      raise PackedModelError(f"array {name!r} declares {nbytes!r} bytes, but shape "
                             f"{shape} of {dtype} takes {size}")
    if not _is_int(offset) or offset < 0 or offset % ALIGN:
      raise PackedModelError(f"array {name!r} offset {offset!r} is not a non-negative "
                             f"multiple of {ALIGN}")
    if offset + nbytes > data_bytes:
      raise PackedModelError(f"array {name!r} occupies bytes [{offset}, {offset + nbytes}) "
                             f"of the data section, which has {data_bytes} bytes")
    declared[name] = (dtype, tuple(shape))
    spans.append((offset, offset + nbytes, name))
  spans.sort()
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise PackedModelError(f"arrays {a!r} and {b!r} overlap")
  _check_array_specs(declared, expected_arrays(layers, fmt, float_dtype))

  arrays = {}
  for e in entries:
    storage, loaded = ARRAY_DTYPES[e["dtype"]]
    a = np.frombuffer(buf, dtype=storage, count=math.prod(e["shape"]),
                      offset=data_start + e["offset"])
    arrays[e["name"]] = a.astype(storage.newbyteorder("="), copy=True).view(
        loaded).reshape(e["shape"])
  ordered = {name: arrays[name] for name in expected_arrays(layers, fmt, float_dtype)}
  return PackedModel(arch["name"], config, quantizer, layers, ordered, float_dtype,
                     header["metadata"])


def load(path: str | os.PathLike) -> PackedModel:
  """Reads a packed model file; PackedModelError naming the problem if it is bad.

  Reads bytes and JSON only: nothing in the file is executed or unpickled.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    buf = f.read()
  return from_bytes(buf, source=path)


# ------------------------------------------------------------------------------ export


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


def _all_codes(params, layers: Sequence[Layer], quantizer) -> dict[str, np.ndarray]:
  """``quantizer.codes`` of every quantized layer's latents, in one compiled call."""
  latents = {}
  for layer in layers:
    if layer.quantized:
      kernel = _subtree(params, f"{layer.name}/kernel", "params")
      if not layers_lib.is_latent_kernel(kernel):
        raise PackedModelError(f"layer {layer.name!r} holds float weights but its policy "
                               "makes it quantized")
      latents[layer.name] = dict(kernel)
  if not latents:
    return {}
  codes = _codes_fn(quantizer)(latents)
  return {k: np.asarray(v) for k, v in jax.device_get(codes).items()}


@functools.lru_cache(maxsize=16)
def _codes_fn(quantizer: qz.Quantizer):
  return jax.jit(lambda tree: {k: quantizer.codes(v) for k, v in tree.items()})


def export(variables: Mapping[str, Any], model: nn.Module, *, float_dtype=jnp.float32,
           metadata: Mapping[str, Any] | None = None) -> PackedModel:
  """Packs a trained shiftjax ResNet.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of ``model`` (jax or numpy).
    model: the ``CifarResNet``, ``ImageNetResNet`` or ``SpeechResNet`` module the
      variables belong to; its fields give the architecture, the quantizer and the
      full-precision layers.
    float_dtype: storage of the full-precision kernels: float32 or bfloat16.
    metadata: JSON-serializable facts to keep in the file.
  Returns:
    a checked ``PackedModel``.
  """
  float_dtype = np.dtype(float_dtype).name
  if float_dtype not in FLOAT_DTYPES:
    raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype}")
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  name, config = architecture_of(model, params)
  quantizer = model.quantizer
  layers = build_layers(name, config, quantizer)
  arrays: dict[str, np.ndarray] = {}
  used: list[str] = []
  storage = np.dtype(jnp.bfloat16) if float_dtype == "bfloat16" else np.dtype(np.float32)
  all_codes = _all_codes(params, layers, quantizer)
  for layer in layers:
    if layer.op not in ("conv", "dense"):
      continue
    kernel = _subtree(params, f"{layer.name}/kernel", "params")
    used.append(f"{layer.name}/kernel")
    if layer.quantized != layers_lib.is_latent_kernel(kernel):
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
    n_out = layer.shape[-1]
    if layer.op == "conv":
      bn = _bn_name(layer.name)
      gamma, beta = (_subtree(params, f"{bn}/{k}", "params") for k in ("scale", "bias"))
      mean, var = (_subtree(stats, f"{bn}/{k}", "batch_stats") for k in ("mean", "var"))
      used += [f"{bn}/scale", f"{bn}/bias"]
      scale, bias = fold_batch_norm(gamma, beta, mean, var)
    else:
      scale, bias = None, np.asarray(_subtree(params, f"{layer.name}/bias", "params"),
                                     np.float64)
      used.append(f"{layer.name}/bias")
    if layer.quantized:
      arrays[f"{layer.name}/kernel"] = codes_lib.pack(codes.reshape(-1, n_out),
                                                      quantizer.code_format.bits, axis=0)
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
                       dict(metadata or {}))
  json.dumps(packed.metadata, allow_nan=False)  # fails early if not JSON-serializable
  packed.check()
  return packed


def from_checkpoint(config, workdir: str | os.PathLike, *, step: int | None = None,
                    float_dtype=jnp.float32) -> PackedModel:
  """Exports the (latest, or ``step``) orbax checkpoint of a training run in ``workdir``.

  ``config`` is the run's config; the dataset's input normalization is kept in the
  metadata (``packed_apply`` takes normalized images, as the flax model does).
  """
  from shiftjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from shiftjax import train  # pylint: disable=g-import-not-at-top
  train.validate_config(config)
  spec = data_lib.get_spec(config.dataset)
  model = train.create_model(config, spec.num_classes)
  lr_fn = train.create_learning_rate_fn(config, 1, 1)
  # Shapes only (eval_shape compiles nothing): the restore target of train.py's layout.
  abstract = jax.eval_shape(lambda: train.create_train_state(
      jax.random.key(config.seed), config, model, spec.image_shape, lr_fn))
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(
                                         jax.devices()[0])), abstract)
  state = train.restore_for_eval(os.fspath(workdir), config, abstract, step)
  metadata = {
      "source": {"model": config.model, "dataset": config.dataset,
                 "step": int(state.step)},
      "input": {"image_shape": list(spec.image_shape), "dtype": "uint8",
                "normalization": "(image / 255 - mean) / std",
                "mean": list(spec.mean), "std": list(spec.std)},
  }
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return export(jax.device_get(variables), model, float_dtype=float_dtype,
                metadata=metadata)


def export_checkpoint(config, workdir: str | os.PathLike, output: str | None = None, *,
                      overwrite: bool = False, step: int | None = None,
                      float_dtype=jnp.float32) -> dict[str, Any]:
  """``from_checkpoint`` then ``save`` to ``output`` (default ``<workdir>/model.shiftjax``).

  Returns ``size_report()`` plus ``path`` and ``file_bytes``. Refuses (FileExistsError)
  to replace an existing file unless ``overwrite``, before reading the checkpoint.
  """
  output = os.fspath(output or os.path.join(os.fspath(workdir), "model" + FILE_SUFFIX))
  if not overwrite and os.path.lexists(output):
    raise FileExistsError(f"{output} already exists; pass overwrite=True "
                          "(--overwrite) to replace it")
  packed = from_checkpoint(config, workdir, step=step, float_dtype=float_dtype)
  packed.save(output, overwrite=overwrite)
  report = packed.size_report()
  report.update(path=output, file_bytes=os.path.getsize(output),
                step=packed.metadata["source"]["step"])
  return report


def format_size_report(report: Mapping[str, Any]) -> str:
  """Human-readable lines of an ``export_checkpoint`` report."""
  lines = [f"wrote                      {report['path']} (checkpoint step {report['step']})",
           f"file size                  {report['file_bytes'] / 1024:.1f} KiB",
           f"float32 weights            {report['float32_weight_bytes'] / 1024:.1f} KiB "
           f"({report['float32_weight_bytes'] / report['file_bytes']:.1f}x smaller)"]
  if report["quantized_weights"]:
    lines.append(f"bits per quantized weight  {report['bits_per_quantized_weight']:.2f} "
                 f"({report['quantized_weights']} quantized weights)")
  return "\n".join(lines)


# ---------------------------------------------------------------------- packed inference


def _uses_kernel(fmt: codes_lib.CodeFormat) -> bool:
  return not fmt.has_zero and fmt.bits in kernels.SUPPORTED_BITS


def decode_kernel(words, fmt: codes_lib.CodeFormat, shape) -> jax.Array:
  """uint32 words ``[ceil(K / P), O]`` -> float32 weights of ``shape`` (``K * O`` =
  ``prod(shape)``), in XLA ops: the path of formats the kernels lack (zero codes, over
  5 bits) on every backend."""
  codes = kernels.unpack_codes(words, fmt.bits, math.prod(shape[:-1]))
  return codes_lib.decode(codes, fmt, jnp.float32).reshape(shape)


def _conv_layer(layer: Layer, arrays, x, fmt, backend, platform):
  kernel = arrays[f"{layer.name}/kernel"]
  bias = arrays[f"{layer.name}/bias"]
  if layer.quantized and _uses_kernel(fmt):
    return kernels.pow2_conv(x, kernel, bits=fmt.bits, e0=fmt.e0,
                             kernel_shape=layer.shape, strides=layer.strides,
                             padding=layer.padding, scale=arrays[f"{layer.name}/scale"],
                             bias=bias, backend=backend, platform=platform)
  w = (decode_kernel(kernel, fmt, layer.shape) if layer.quantized
       else kernel.astype(jnp.float32))
  y = lax.conv_general_dilated(x, w, window_strides=layer.strides, padding=layer.padding,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=lax.Precision.HIGHEST)
  if layer.quantized:
    y = y * arrays[f"{layer.name}/scale"]
  return y + bias


def _dense_layer(layer: Layer, arrays, x, fmt, backend, platform):
  kernel = arrays[f"{layer.name}/kernel"]
  bias = arrays[f"{layer.name}/bias"]
  if layer.quantized and _uses_kernel(fmt):
    return kernels.pow2_matmul(x, kernel, bits=fmt.bits, e0=fmt.e0, bias=bias,
                               backend=backend, platform=platform)
  w = (decode_kernel(kernel, fmt, layer.shape) if layer.quantized
       else kernel.astype(jnp.float32))
  return jnp.dot(x, w, precision=lax.Precision.HIGHEST) + bias


def forward(arrays: Mapping[str, jax.Array], images: jax.Array, plan: tuple, *,
            backend: str | None = None, platform: str | None = None) -> jax.Array:
  """The packed forward pass (traceable); ``plan`` is ``PackedModel.plan``."""
  layers, fmt = plan
  acts = {"input": images.astype(jnp.float32)}
  for layer in layers:
    x = acts[layer.input]
    if layer.op == "conv":
      y = _conv_layer(layer, arrays, x, fmt, backend, platform)
      if layer.residual is not None:
        y = y + acts[layer.residual]
    elif layer.op == "max_pool":
      y = nn.max_pool(x, layer.window, strides=layer.strides, padding=layer.padding)
    elif layer.op == "mean_pool":
      y = jnp.mean(x, axis=(1, 2))
    elif layer.op in _SPEECH_POOLS:
      y = resnet_speech.pool(x, _SPEECH_POOLS[layer.op])
    elif layer.op == "dense":
      y = _dense_layer(layer, arrays, x, fmt, backend, platform)
    else:
      raise PackedModelError(f"unknown layer op {layer.op!r}")
    acts[layer.name] = nn.relu(y) if layer.relu else y
  return acts[layers[-1].name]


def _check_images(packed: PackedModel, shape) -> None:
  cin = packed.config["in_channels"]
  if len(shape) != 4 or shape[-1] != cin:
    raise ValueError(f"images must be [N, H, W, {cin}] (normalized, NHWC), got shape "
                     f"{tuple(shape)}")


def packed_apply(packed: PackedModel, images, *, backend: str | None = None,
                 platform: str | None = None) -> jax.Array:
  """Logits ``[N, num_classes]`` (float32) of normalized NHWC ``images``, weights packed.

  Equals ``model.apply(variables, images, train=False)`` of the exported model up to
  float rounding (BatchNorm is folded). ``backend``/``platform`` go to
  ``shiftjax.kernels`` (None: Pallas on GPU/TPU, XLA on CPU).
  """
  images = jnp.asarray(images, jnp.float32)
  _check_images(packed, images.shape)
  return packed.jitted_forward(backend, platform)(packed.device_arrays, images)


# ---------------------------------------------------------------- jax.export artifacts


def export_serialized(packed: PackedModel, batch_shape: Sequence[int | None], *,
                      platforms: Sequence[str] | None = None, backend: str | None = "xla",
                      platform: str | None = None) -> bytes:
  """Packed inference as a serialized ``jax.export.Exported`` (bytes).

  The packed words, scales and biases are constants of the exported function, which
  maps float32 ``batch_shape`` images (normalized NHWC; a None dimension is symbolic)
  to float32 logits. Anyone with jax runs it without shiftjax::

    exported = jax.export.deserialize(bytearray(open(path, 'rb').read()))
    logits = exported.call(images)

  Args:
    packed: the model.
    batch_shape: ``(N, H, W, C)``; e.g. ``(None, 28, 28, 1)`` for any batch size.
    platforms: ``jax.export`` lowering platforms (default: this machine's), e.g.
      ``['cpu', 'cuda']`` for one artifact that runs on both.
    backend, platform: passed to ``shiftjax.kernels``. The default ``'xla'`` decodes
      the packed words with XLA ops, which serialize for every platform. The GPU Pallas
      kernel lowers to a Triton custom call, which ``jax.export`` refuses to serialize
      (no compatibility guarantee); ``backend='pallas', platform='tpu'`` with
      ``platforms=['tpu']`` embeds the Mosaic TPU kernel (UNVERIFIED: no TPU here).
  Requires the ``flatbuffers`` package (jax's serializer).
  """
  _check_images(packed, tuple(batch_shape))
  if any(d is None for d in batch_shape):
    names = iter("abcd")
    dims = ", ".join(next(names) if d is None else str(int(d)) for d in batch_shape)
    shape = jax.export.symbolic_shape(dims)
  else:
    shape = tuple(int(d) for d in batch_shape)
  arrays, plan = packed.device_arrays, packed.plan

  def infer(images):
    return forward(arrays, images, plan, backend=backend, platform=platform)

  exported = jax.export.export(jax.jit(infer), platforms=platforms)(
      jax.ShapeDtypeStruct(shape, jnp.float32))
  return bytes(exported.serialize())


def save_serialized(packed: PackedModel, path: str | os.PathLike,
                    batch_shape: Sequence[int | None], *, overwrite: bool = False,
                    **kwargs) -> str:
  """Writes ``export_serialized(packed, batch_shape, **kwargs)`` atomically to ``path``."""
  path = os.fspath(path)
  if not overwrite and os.path.lexists(path):
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  write_atomic(path, export_serialized(packed, batch_shape, **kwargs), overwrite=overwrite)
  return path
