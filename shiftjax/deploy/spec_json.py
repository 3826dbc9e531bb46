"""Weight and input specs as JSON, for packed files' headers (data only: a spec is
rebuilt from its class name and fields, no code is run)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from shiftjax import activations as act_lib
from shiftjax import quantizers as qz


class PackedModelError(ValueError):
  """A packed model file or description is malformed; the message names the problem."""


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)



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
