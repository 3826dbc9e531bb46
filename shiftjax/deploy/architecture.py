"""Architectures as data: the layers of a packed network, rebuilt from a name and a config.

A packed file names its architecture (``'CifarResNet'``, ``'ImageNetResNet'``,
``'SpeechResNet'``) and its config (depth or stage sizes, widths, strides, pooling, the
classes, input channels and the ``full_precision`` layer patterns). ``build_layers`` turns
that into the forward pass, one ``Layer`` per conv, pool and dense, exactly as the flax
modules in ``shiftjax.models`` compute it; ``expected_arrays`` lists the arrays the layers
need; ``check_architecture`` validates a config read from a stranger's file, bounded so
that a hostile header cannot ask for a huge graph. No flax: the file alone rebuilds it.

The config also holds the layer policy's rules (``shiftjax.policy``) as JSON:
``layer_quantizers`` (per-layer weight specs: mixed widths), ``activation`` and
``layer_activations`` (the specs of the layers' inputs); absent in files of format
versions 1 and 2, which had one quantizer and float activations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from shiftjax import activations as act_lib
from shiftjax import codes as codes_lib
from shiftjax import policy as policy_lib
from shiftjax import pooling
from shiftjax import quantizers as qz

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


# Architecture config fields of the layer policy's rules, with their defaults (files of
# format versions 1 and 2 have none of them).
POLICY_KEYS = {"layer_quantizers": [], "activation": None, "layer_activations": []}


class PackedModelError(ValueError):
  """A packed model file or description is malformed; the message names the problem."""


# ------------------------------------------------------------------------ specs as JSON


def quantizer_to_json(quantizer: qz.Quantizer | None) -> dict | None:
  """``{"name": ..., <fields>}`` of a spec (None for float); ``quantizer_from_json`` inverts it."""
  if quantizer is None:
    return None
  fields = {f.name: getattr(quantizer, f.name) for f in dataclasses.fields(quantizer)}
  return {"name": type(quantizer).__name__,
          "fields": {k: (int(v) if is_int(v) else v) for k, v in fields.items()},
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


def activation_from_json(spec: Any):
  """An activation spec from JSON (``shiftjax.activations``), errors as PackedModelError."""
  try:
    return act_lib.from_json(spec)
  except ValueError as e:
    raise PackedModelError(f"invalid activation quantizer {spec!r}: {e}") from None


def _rules_from_json(field: str, rules: Any, from_json) -> tuple[tuple[str, Any], ...]:
  if (not isinstance(rules, (list, tuple)) or len(rules) > _MAX_PATTERNS or not all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
      and len(r[0]) <= 256 for r in rules)):
    raise PackedModelError(f"{field} must be a list of at most {_MAX_PATTERNS} "
                           f"[glob pattern, spec] pairs, got {rules!r}")
  return tuple((pattern, from_json(spec)) for pattern, spec in rules)


def policy_to_config(policy: policy_lib.LayerPolicy) -> dict:
  """The architecture config fields of a policy (without its default ``quantizer``,
  which the file stores apart)."""
  return {"full_precision": list(policy.full_precision),
          "layer_quantizers": [[p, quantizer_to_json(q)] for p, q in policy.layer_quantizers],
          "activation": act_lib.to_json(policy.activation),
          "layer_activations": [[p, act_lib.to_json(a)] for p, a in policy.layer_activations]}


def policy_from_config(config: Mapping[str, Any],
                       quantizer: qz.Quantizer | None) -> policy_lib.LayerPolicy:
  """The ``LayerPolicy`` of a checked architecture config and its default quantizer."""
  return policy_lib.LayerPolicy(
      quantizer, tuple(config["full_precision"]),
      _rules_from_json("layer_quantizers", config.get("layer_quantizers", []),
                       quantizer_from_json),
      activation_from_json(config.get("activation")),
      _rules_from_json("layer_activations", config.get("layer_activations", []),
                       activation_from_json))


# ---------------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Layer:
  """One step of the packed forward pass; its output is named ``name``.

  Attributes:
    op: ``'conv'`` (NHWC conv, then ``* scale + bias``, ``+ residual``, relu),
      ``'max_pool'``, ``'mean_pool'`` (global mean over H and W), ``'dense'``, or a
      SpeechResNet's pooling of ``[N, time, frequency, C]``: ``'speech_<how>_pool'``
      with ``<how>`` one of ``pooling.POOLINGS`` (``pooling.speech_pool``).
    name: the layer's path in the flax model (``'stage1_block0/conv1'``); its arrays are
      ``'<name>/kernel'``, ``'<name>/scale'`` (quantized convs), ``'<name>/bias'``.
    input: name of the layer whose output it reads, or ``'input'`` (the images).
    residual: conv only: name of an output added after the bias, before the relu.
    relu: apply relu last.
    quantizer: the weight spec whose codes the kernel holds (None: float weights).
    activation: the spec the layer's input goes through first (None: float input); its
      learned parameters are the arrays ``'<name>/activation_<param>'``.
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
  quantizer: qz.Quantizer | None = None
  activation: Any = None
  shape: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: Any = ()
  window: tuple[int, ...] = ()

  @property
  def quantized(self) -> bool:
    """Whether the kernel is packed codes."""
    return self.quantizer is not None

  @property
  def code_format(self) -> codes_lib.CodeFormat | None:
    return None if self.quantizer is None else self.quantizer.code_format

  def to_json(self) -> dict:
    """The layer as a JSON-serializable dict (the packed file's header); files of format
    versions 1 and 2 have no ``quantizer`` and ``activation``."""
    padding = (self.padding if isinstance(self.padding, str)
               else [list(p) for p in self.padding])
    return {"op": self.op, "name": self.name, "input": self.input,
            "residual": self.residual, "relu": self.relu, "quantized": self.quantized,
            "shape": list(self.shape), "strides": list(self.strides), "padding": padding,
            "window": list(self.window), "quantizer": _layer_spec_json(self.quantizer),
            "activation": act_lib.to_json(self.activation)}


def _layer_spec_json(quantizer: qz.Quantizer | None) -> dict | None:
  """A layer's weight spec in its entry: name and fields (the layers are checked against
  the architecture, never parsed, so the header's ``repr`` is left out)."""
  spec = quantizer_to_json(quantizer)
  return None if spec is None else {"name": spec["name"], "fields": spec["fields"]}


def speech_pool_op(how: str) -> str:
  """The layer op of a SpeechResNet's pooling ``how`` (``pooling.POOLINGS``)."""
  return f"speech_{how}_pool"


# Layer op -> how, the inverse of speech_pool_op.
SPEECH_POOLS = {speech_pool_op(how): how for how in pooling.POOLINGS}


def _conv(name, src, shape, strides=1, *, specs, padding="SAME", relu=False,
          residual=None) -> Layer:
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  quantizer, activation = specs(name)
  return Layer("conv", name, src, residual=residual, relu=relu, quantizer=quantizer,
               activation=activation, shape=tuple(int(d) for d in shape), strides=strides,
               padding=padding)


def _residual_stages(out: list[Layer], src: str, cin: int, stage_sizes, widths,
                     block: str, specs, first_stride: int = 1) -> tuple[str, int]:
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
        out.append(_conv(name, x, shape, s, relu=True, specs=specs))
        x = name
      residual = src
      # The blocks project the shortcut exactly when the output shape differs.
      if stride != 1 or cin != cout:
        residual = f"{p}/shortcut"
        out.append(_conv(residual, src, (1, 1, cin, cout), stride, specs=specs))
      name, shape, s = body[-1]
      out.append(_conv(name, x, shape, s, relu=True, residual=residual, specs=specs))
      src, cin = name, cout
  return src, cin


def cifar_widths(width_multiplier: float) -> list[int]:
  """Stage widths of a CIFAR ResNet (16-32-64 times ``width_multiplier``)."""
  return [int(round(w * width_multiplier)) for w in CIFAR_WIDTHS]


def build_layers(architecture: str, config: Mapping[str, Any],
                 quantizer: qz.Quantizer | None) -> tuple[Layer, ...]:
  """The packed forward pass of an architecture (what the flax module computes).

  ``quantizer`` is the default weight spec; the config's policy rules give every layer
  its own (``policy_from_config``). PackedModelError when a rule matches no layer or two
  rules give one layer two specs.
  """
  policy = policy_from_config(config, quantizer)

  def specs(name: str):
    return policy.quantizer_for(name), policy.activation_for(name)

  try:
    layers = _layers(architecture, config, specs)
    policy.check_patterns([l.name for l in layers if l.op in ("conv", "dense")])
  except policy_lib.PolicyError as e:
    raise PackedModelError(str(e)) from None
  return layers


def _layers(architecture: str, config: Mapping[str, Any], specs) -> tuple[Layer, ...]:
  cin = config["in_channels"]
  out: list[Layer] = []
  pool_op = "mean_pool"
  if architecture == "CifarResNet":
    widths = cifar_widths(config["width_multiplier"])
    n = (config["depth"] - 2) // 6
    out.append(_conv("stem", "input", (3, 3, cin, widths[0]), relu=True, specs=specs))
    src, cin = _residual_stages(out, "stem", widths[0], [n] * 3, widths, "basic", specs)
  elif architecture == "ImageNetResNet":
    out.append(_conv("stem", "input", (7, 7, cin, IMAGENET_WIDTHS[0]), 2,
                     padding=((3, 3), (3, 3)), relu=True, specs=specs))
    out.append(Layer("max_pool", "stem_pool", "stem", strides=(2, 2),
                     padding=((1, 1), (1, 1)), window=(3, 3)))
    src, cin = _residual_stages(out, "stem_pool", IMAGENET_WIDTHS[0],
                                config["stage_sizes"], IMAGENET_WIDTHS, config["block"],
                                specs)
  elif architecture == "SpeechResNet":
    widths = config["widths"]
    out.append(_conv("stem", "input", (3, 3, cin, widths[0]), config["stem_strides"],
                     relu=True, specs=specs))
    src, cin = _residual_stages(out, "stem", widths[0], config["stage_sizes"], widths,
                                "basic", specs, first_stride=config["first_stride"])
    pool_op = speech_pool_op(config["pooling"])
    if config["pooling"] == "meanmax":  # mean and max side by side
      cin *= 2
  else:
    raise PackedModelError(f"unknown architecture {architecture!r}; "
                           f"known: {', '.join(ARCHITECTURES)}")
  out.append(Layer(pool_op, "pool", src))
  quantizer, activation = specs("head")
  out.append(Layer("dense", "head", "pool", quantizer=quantizer, activation=activation,
                   shape=(cin, config["num_classes"])))
  return tuple(out)


def bn_name(conv_name: str) -> str:
  """The BatchNorm after a conv, as the blocks and stems name it."""
  head, _, last = conv_name.rpartition("/")
  bn = {"stem": "stem_bn", "shortcut": "shortcut_bn"}.get(last, last.replace("conv", "bn"))
  return f"{head}/{bn}" if head else bn


# How a quantized kernel's codes are laid out in uint32 words:
#   'bitplanes': the HWIO (or (in, out)) codes flattened in C order, 32 to a block, and
#     each block as ``bits`` words, word j holding bit j of the 32 codes
#     (``codes.pack_bitplanes``): exactly ``bits`` bits per weight when the kernel's size
#     is a multiple of 32, as every ResNet layer's is;
#   'words': ``[kh * kw * I, O]`` packed along axis 0, ``floor(32 / bits)`` codes per
#     word (``codes.pack``): what ``shiftjax.kernels`` reads; 3.2 bits per 3-bit weight.
CODE_LAYOUTS = ("bitplanes", "words")


def packed_kernel_shape(shape: Sequence[int], bits: int, code_layout: str) -> tuple[int, int]:
  """The uint32 array that holds the codes of a kernel of logical ``shape``."""
  if code_layout == "bitplanes":
    return (-(-math.prod(shape) // codes_lib.WORD_BITS), bits)
  if code_layout == "words":
    return (codes_lib.num_words(math.prod(shape[:-1]), bits), shape[-1])
  raise PackedModelError(f"code_layout must be one of {CODE_LAYOUTS}, got {code_layout!r}")


def expected_arrays(layers: Sequence[Layer], float_dtype: str, code_layout: str
                    ) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{array name: (dtype name, shape)}`` that a packed model of ``layers`` holds."""
  out = {}
  for layer in layers:
    if layer.op not in ("conv", "dense"):
      continue
    n_out = layer.shape[-1]
    if layer.activation is not None:
      for param, shape in layer.activation.param_shapes().items():
        out[f"{layer.name}/activation_{param}"] = ("float32", tuple(shape))
    if layer.quantized:
      out[f"{layer.name}/kernel"] = ("uint32", packed_kernel_shape(
          layer.shape, layer.code_format.bits, code_layout))
      if layer.op == "conv":
        out[f"{layer.name}/scale"] = ("float32", (n_out,))
    else:
      out[f"{layer.name}/kernel"] = (float_dtype, layer.shape)
    out[f"{layer.name}/bias"] = ("float32", (n_out,))
  return out


# ------------------------------------------------------------------------- architectures


def is_int(v) -> bool:
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
  if not keys <= set(config) <= keys | set(POLICY_KEYS):
    raise PackedModelError(
        f"{name} config must have exactly the fields {sorted(keys)} (and optionally "
        f"{sorted(POLICY_KEYS)}), got {sorted(config)}")

  def bounded_int(field, lo, hi, value=None):
    value = config[field] if value is None else value
    if not is_int(value) or not lo <= value <= hi:
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
  # The policy's rules, parsed (which validates them) and written back canonically.
  policy = policy_from_config({**POLICY_KEYS, **config}, None)
  out.update({k: v for k, v in policy_to_config(policy).items() if k in POLICY_KEYS})
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
    if config["pooling"] not in pooling.POOLINGS:
      raise PackedModelError(f"SpeechResNet pooling must be one of "
                             f"{pooling.POOLINGS}, got {config['pooling']!r}")
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

