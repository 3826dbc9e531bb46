"""A quantized model's summary: per layer its spec, size and work; totals (larq's
``models.summary`` is the model).

``summarize(model, *inputs)`` traces one call of a linen or NNX model (``jax.eval_shape``:
nothing is computed or compiled) and returns a ``ModelSummary``: every matmul/conv layer
with its module path, kind, weight spec and bits, parameters, stored bytes (the packed
file's: N bits per quantized weight, float32 for the rest) and input spec, and the
multiply-accumulates of the call; totals are the float32 size, the packed size, the
compression and the share of multiply-accumulates that became shift-adds. ``str()`` of
it is a table. A quantized parameter outside flax's layers (kind ``Param``) is multiplied
by the model's own code, which the summary does not see: its multiply-accumulates are
unknown (``macs`` None) and left out of the totals.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
from flax import nnx
import jax
import numpy as np

from shiftjax import interception
from shiftjax.policy import LayerPolicy

_FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  path: str
  kind: str
  weight_spec: str
  bits: int
  params: int
  stored_bytes: int
  input_spec: str
  macs: int | None  # None: unknown (a parameter the model's own code multiplies)

  @property
  def shift(self) -> bool:
    return self.bits < _FLOAT_BITS


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  layers: tuple[LayerSummary, ...]
  other_params: int  # norms, embeddings, position tables: stored as float32

  @property
  def params(self) -> int:
    return sum(l.params for l in self.layers) + self.other_params

  @property
  def float32_bytes(self) -> int:
    return 4 * self.params

  @property
  def packed_bytes(self) -> int:
    return sum(l.stored_bytes for l in self.layers) + 4 * self.other_params

  @property
  def compression(self) -> float:
    return self.float32_bytes / self.packed_bytes

  @property
  def shift_mac_share(self) -> float:
    total = self.macs
    return sum(l.macs or 0 for l in self.layers if l.shift) / total if total else 0.0

  @property
  def macs(self) -> int:
    """The multiply-accumulates of the layers whose work is known."""
    return sum(l.macs or 0 for l in self.layers)

  def __str__(self) -> str:
    header = ("layer", "kind", "weights", "bits", "params", "stored", "input", "MACs")
    rows = [(l.path or "(model)", l.kind, l.weight_spec, str(l.bits), f"{l.params:,}",
             _size(l.stored_bytes), l.input_spec, "?" if l.macs is None else f"{l.macs:,}")
            for l in self.layers]
    rows.append(("other (norms, embeddings)", "", "float", "32", f"{self.other_params:,}",
                 _size(4 * self.other_params), "", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines += [
        "",
        f"parameters {self.params:,}; float32 {_size(self.float32_bytes)}, packed "
        f"{_size(self.packed_bytes)} ({self.compression:.1f}x smaller)",
        f"multiply-accumulates per call {self.macs:,}, "
        f"{100 * self.shift_mac_share:.1f} % of them shift-adds",
    ]
    if any(l.macs is None for l in self.layers):
      lines.append("(?: a parameter the model's own code multiplies; its work is not "
                   "counted)")
    return "\n".join(lines)


def _size(n: int) -> str:
  for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} B"


def _spec_name(spec) -> str:
  if spec is None:
    return "float"
  return f"{spec.name} {spec.bits}-bit" if hasattr(spec, "bits") else repr(spec)


def _layer_summary(path: str, record: interception.LayerRecord) -> LayerSummary:
  weights = math.prod(record.kernel_shape)
  bits = record.weight_spec.bits if record.weight_spec is not None else _FLOAT_BITS
  outputs_per_weight_column = math.prod(record.output_shape) if record.output_shape else 0
  bias = record.out_features if record.has_bias else 0
  input_name = "float" if record.input_spec is None else type(record.input_spec).__name__
  if record.input_spec is not None and hasattr(record.input_spec, "bits"):
    input_name += f" {record.input_spec.bits}-bit"
  return LayerSummary(
      path=path, kind=record.kind, weight_spec=_spec_name(record.weight_spec), bits=bits,
      params=weights + bias, stored_bytes=math.ceil(weights * bits / 8) + 4 * bias,
      input_spec=input_name,
      macs=(None if record.kind == interception.PARAM_KIND
            else outputs_per_weight_column * weights // max(record.out_features, 1)))


def summarize(model, *inputs, **kwargs) -> ModelSummary:
  """The summary of one call ``model(*inputs, **kwargs)`` (a linen model: its ``init``)."""
  if isinstance(model, nn.Module):
    if not interception.is_quantized(model):  # a float model, through an all-float policy
      model = interception.quantize_model(model, LayerPolicy(None))
    with interception.record_calls() as record:
      variables = jax.eval_shape(
          functools.partial(model.init, **kwargs), jax.random.key(0), *inputs)
    params = _leaves(variables.get("params", {}))
  else:
    record = interception.record_nnx_call(model, *inputs, **kwargs)
    params = _leaves(nnx.state(model, nnx.Param))
  layers = tuple(_layer_summary(p, r) for p, r in record.layers.items())
  return ModelSummary(layers, _other_params(params, record.layers))


def _leaves(tree) -> list[tuple[tuple[str, ...], int]]:
  """(path, size) of every array of a params tree (linen dict or NNX state)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), np.size(leaf))
          for path, leaf in flat]


def _other_params(leaves, records) -> int:
  """The numbers in params that no layer's kernel, bias or input range, nor a quantized
  parameter, holds."""
  def owned(path):
    for i in range(len(path) + 1):
      record = records.get("/".join(path[:i]))
      if record is not None and (record.kind == interception.PARAM_KIND or
                                 (i < len(path) and path[i] in _LAYER_PARAMS)):
        return True
    return False
  return sum(size for path, size in leaves if not owned(path))


_LAYER_PARAMS = ("kernel", "bias", "activation")
