"""Format version 4: any model's packed layers keyed by module path (data only, no flax).

A ``PackedTree`` is what a packed file of any architecture holds:

  layers    ``{module path: LayerEntry}``: every quantized layer's kind, weight spec,
            kernel shape and input spec; and each float layer with a quantized input or
            a folded BatchNorm (weight spec null, its kernel a variable);
  arrays    ``'codes/<path>'``: the layer's codes at exactly N bits per weight (bit
            planes, ``shiftjax.codes.pack_bitplanes``, uint32 ``[ceil(n / 32), bits]``);
            ``'variables/<path>'``: every other variable the model needs, by its path
            (linen: ``<collection>/<module path>/<name>``, e.g. ``params/fc1/bias``;
            NNX: the state path, e.g. ``blocks/0/norm/scale``), float32, bfloat16 or
            uint32;
  framework ``'linen'`` or ``'nnx'``, and ``model``, the class that wrote it
            (``module.QualName``): the code that runs it is the model's own
            (``deploy.packed_layers.load_model``).

The container (magic, version, header digest, aligned arrays with CRC-32s, final
SHA-256, atomic writes) is ``deploy.container``'s; header fields of version 4::

  {"format": "shiftjax.packed_model", "writer": ..., "framework": "nnx",
   "model": "shiftjax.models.language_model.TransformerLM",
   "layers": {"blocks/0/mlp/fc1": {"kind": "Dense", "weight_spec": {quantizer JSON},
                                    "kernel_shape": [256, 1024], "input_spec": null}, ...},
   (a layer with a BatchNorm folded into it also has "folded_norm": "<its path>"; the
    epilogue is then the variables folded_norms/<layer>/{scale,bias})
   "arrays": [...], "data_bytes": S, "metadata": {...}}
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

import shiftjax
from shiftjax import activations as act_lib
from shiftjax import codes as codes_lib
from shiftjax import quantizers as qz
from shiftjax.deploy import container
from shiftjax.deploy.spec_json import (PackedModelError, activation_from_json, is_int,
                                       quantizer_from_json, quantizer_to_json)

VERSION = 4
FRAMEWORKS = ("linen", "nnx")
# "Param": a parameter outside flax's layers that the model's own code multiplies.
KINDS = ("Dense", "DenseGeneral", "Conv", "Einsum", "Param")
CODES, VARIABLES = "codes/", "variables/"


@dataclasses.dataclass(frozen=True)
class LayerEntry:
  kind: str
  weight_spec: qz.Quantizer | None  # None: a float layer, in the file for its input spec
  kernel_shape: tuple[int, ...]
  input_spec: Any = None
  folded_norm: str | None = None  # the BatchNorm this layer applies (deploy.norm_folding)

  def to_json(self) -> dict:
    entry = {"kind": self.kind, "weight_spec": quantizer_to_json(self.weight_spec),
             "kernel_shape": list(self.kernel_shape),
             "input_spec": act_lib.to_json(self.input_spec)}
    if self.folded_norm is not None:
      entry["folded_norm"] = self.folded_norm
    return entry

  @property
  def codes_shape(self) -> tuple[int, int]:
    """The shape of the layer's bit planes."""
    n = math.prod(self.kernel_shape)
    return (math.ceil(n / codes_lib.WORD_BITS), self.weight_spec.bits)


def _entry_from_json(path: str, obj: Any) -> LayerEntry:
  keys = {"kind", "weight_spec", "kernel_shape", "input_spec"}
  if not isinstance(obj, dict) or not keys <= set(obj) <= keys | {"folded_norm"}:
    raise PackedModelError(f"layer {path!r} must be an object with exactly {sorted(keys)} "
                           f"and optionally 'folded_norm', got {obj!r}")
  folded_norm = obj.get("folded_norm")
  if folded_norm is not None and (not isinstance(folded_norm, str) or not folded_norm):
    raise PackedModelError(f"layer {path!r} folded_norm must be a module path, got "
                           f"{folded_norm!r}")
  if obj["kind"] not in KINDS:
    raise PackedModelError(f"layer {path!r} has kind {obj['kind']!r}; allowed: {KINDS}")
  shape = obj["kernel_shape"]
  if not isinstance(shape, list) or not shape or not all(is_int(d) and d > 0 for d in shape):
    raise PackedModelError(f"layer {path!r} kernel_shape must be a list of positive "
                           f"integers, got {shape!r}")
  spec = quantizer_from_json(obj["weight_spec"])
  input_spec = activation_from_json(obj["input_spec"])
  if obj["kind"] == "Param" and (spec is None or input_spec is not None or folded_norm):
    raise PackedModelError(f"layer {path!r} is a quantized parameter (kind 'Param'): it "
                           "needs a weight_spec and has no input_spec or folded_norm")
  if spec is None and input_spec is None and folded_norm is None:
    raise PackedModelError(f"layer {path!r} has no weight_spec, input_spec or folded_norm "
                           "(a float layer without them is only variables)")
  return LayerEntry(obj["kind"], spec, tuple(shape), input_spec, folded_norm)


@dataclasses.dataclass
class PackedTree:
  """A packed model of any architecture (module docstring)."""
  framework: str
  model: str
  layers: dict[str, LayerEntry]
  arrays: dict[str, np.ndarray]
  metadata: dict = dataclasses.field(default_factory=dict)

  def check(self) -> None:
    """PackedModelError unless the layers and arrays agree."""
    if self.framework not in FRAMEWORKS:
      raise PackedModelError(f"framework must be one of {FRAMEWORKS}, got "
                             f"{self.framework!r}")
    for path, entry in self.layers.items():
      name = CODES + path
      if entry.weight_spec is None:
        continue
      if name not in self.arrays:
        raise PackedModelError(f"layer {path!r} has no codes (array {name!r} is missing)")
      codes = self.arrays[name]
      if codes.dtype != np.uint32 or tuple(codes.shape) != entry.codes_shape:
        raise PackedModelError(
            f"layer {path!r} codes have shape {tuple(codes.shape)} of {codes.dtype}, "
            f"expected {entry.codes_shape} of uint32 ({entry.weight_spec.bits}-bit planes "
            f"of {list(entry.kernel_shape)})")
    for name in self.arrays:
      if not name.startswith((CODES, VARIABLES)) or (
          name.startswith(CODES) and self.spec_of(name[len(CODES):]) is None):
        raise PackedModelError(f"unexpected array {name!r} (arrays are codes/<layer> "
                               "of a layer or variables/<path>)")

  def spec_of(self, path: str) -> qz.Quantizer | None:
    """The weight spec of the layer at ``path`` (None: float, or no such layer)."""
    entry = self.layers.get(path)
    return None if entry is None else entry.weight_spec

  @property
  def quantized_layers(self) -> dict[str, LayerEntry]:
    """The layers that hold codes."""
    return {p: e for p, e in self.layers.items() if e.weight_spec is not None}

  def kernel_codes(self, path: str) -> np.ndarray:
    """Layer ``path``'s codes in its kernel's shape (uint8)."""
    entry = self.layers[path]
    return np.asarray(codes_lib.unpack_bitplanes(
        self.arrays[CODES + path], entry.weight_spec.bits, entry.kernel_shape))

  @property
  def variables(self) -> dict[str, np.ndarray]:
    """``{path: array}`` of everything but the codes."""
    return {k[len(VARIABLES):]: v for k, v in self.arrays.items() if k.startswith(VARIABLES)}

  def size_report(self) -> dict[str, Any]:
    """The stored bytes against float32: ``float32_weight_bytes`` counts each quantized
    weight and each element of the other variables as 4 bytes."""
    quantized = sum(math.prod(e.kernel_shape) for e in self.quantized_layers.values())
    code_words = sum(self.arrays[CODES + p].size for p in self.quantized_layers)
    others = sum(a.size for k, a in self.arrays.items() if k.startswith(VARIABLES))
    return {"float32_weight_bytes": 4 * (quantized + others),
            "array_bytes": sum(a.nbytes for a in self.arrays.values()),
            "quantized_weights": quantized,
            "bits_per_quantized_weight": (32 * code_words / quantized if quantized
                                          else None)}

  def to_bytes(self) -> bytes:
    self.check()
    return container.encode_container(VERSION, {
        "format": container.FORMAT_NAME,
        "writer": f"shiftjax {shiftjax.__version__}",
        "framework": self.framework, "model": self.model,
        "layers": {p: e.to_json() for p, e in self.layers.items()},
    }, self.arrays, self.metadata)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes the file atomically; FileExistsError if ``path`` exists, unless
    ``overwrite``. Returns the path."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    container.write_atomic(path, self.to_bytes(), overwrite=overwrite)
    return path


def from_header(version: int, header: dict, buf: bytes, head_end: int,
                data_start: int) -> PackedTree:
  """The ``PackedTree`` of a checked version 4 container (``format.from_bytes``)."""
  container.check_header_keys(version, header)
  if header["framework"] not in FRAMEWORKS:
    raise PackedModelError(f"framework must be one of {FRAMEWORKS}, got "
                           f"{header['framework']!r}")
  if not isinstance(header["model"], str):
    raise PackedModelError(f"model must be a string, got {header['model']!r}")
  if not isinstance(header["layers"], dict):
    raise PackedModelError("layers must be an object keyed by module path")
  layers = {p: _entry_from_json(p, e) for p, e in header["layers"].items()}
  arrays = container.read_arrays(version, header, buf, head_end, data_start)
  tree = PackedTree(header["framework"], header["model"], layers, arrays,
                    header["metadata"])
  tree.check()
  return tree
