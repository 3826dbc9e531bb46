"""The zoo ResNets' constructor arguments as a packed file records them, and their checks.

A version 1-3 file's header and a version 4 file's ``'architecture'`` metadata
(``shiftjax.export``) name the ResNet (``'CifarResNet'``, ``'ImageNetResNet'``,
``'SpeechResNet'``) and its config: depth or stage sizes, widths, strides, pooling, the
classes, input channels, and the layer policy's rules as JSON (``full_precision``,
``layer_quantizers``, ``activation``, ``layer_activations``; the last three absent in
versions 1 and 2). ``check_architecture`` validates a config read from a stranger's file,
bounded so that a hostile header cannot ask for a huge network; ``shiftjax.export``
builds the flax module from it. The network itself is described once, by that module.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shiftjax import activations as act_lib
from shiftjax import pooling
from shiftjax import policy as policy_lib
from shiftjax import quantizers as qz
from shiftjax.deploy.spec_json import (PackedModelError, activation_from_json, is_int,
                                       quantizer_from_json, quantizer_to_json)

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


def cifar_widths(width_multiplier: float) -> list[int]:
  """Stage widths of a CIFAR ResNet (16-32-64 times ``width_multiplier``)."""
  return [int(round(w * width_multiplier)) for w in CIFAR_WIDTHS]


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

