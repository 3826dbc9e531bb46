"""The packed model and its file: ``PackedModel``, ``save`` / ``load``, nothing that runs code.

A ``PackedModel`` is an architecture (``deploy.architecture``), its quantizer, its layers
and named numpy arrays: packed uint32 code words, float kernels, per-channel scales and
biases (``deploy.folding`` makes them from trained variables).

File format, version 3 (all integers little-endian; ``PackedModel.save`` / ``load``)::

  bytes [0, 8)         magic b"SHIFTJAX"
  bytes [8, 12)        format version, uint32 (3)
  bytes [12, 20)       header length H, uint64
  bytes [20, 20 + H)   header: a UTF-8 JSON object (below)
  bytes [20 + H, +32)  SHA-256 of bytes [0, 20 + H): the header's own digest
  bytes [.., D)        zeros, D = 20 + H + 32 rounded up to a multiple of 64
  bytes [D, D + S)     array data: each array's raw C-order little-endian bytes at
                       D + its offset (offsets are multiples of 64; zeros between)
  bytes [D + S, +32)   SHA-256 of bytes [0, D + S)

  header = {"format": "shiftjax.packed_model", "writer": "shiftjax 0.1.0",
            "architecture": {"name": "CifarResNet", "config": {...}},
            "quantizer": {"name": "DenseShift", "fields": {...}, "repr": "..."} | null,
            "code_format": {"bits": 3, "e0": 0, "has_zero": false} | null,
            "code_layout": "bitplanes" | "words",
            "float_dtype": "float32" | "bfloat16",
            "layers": [{"op": "conv", "name": "stem", "input": "input", ...}, ...],
            "arrays": [{"name": "stem/kernel", "dtype": "float32", "shape": [3, 3, 1, 16],
                        "offset": 0, "nbytes": 576, "crc32": 2914163817}, ...],
            "data_bytes": S, "metadata": {...}}

A quantized kernel is a uint32 array in its ``code_layout`` (``architecture.CODE_LAYOUTS``):
``'bitplanes'`` ``[ceil(kh*kw*I*O / 32), bits]``, exactly ``bits`` bits per weight, or
``'words'`` ``[ceil(kh*kw*I / floor(32/bits)), O]``, each at its own layer's width. A
layer whose input is quantized stores its activation quantizer's learned parameters as
float32 ``'<layer>/activation_<param>'`` (PACT's clipping range: ``activation_clip``).

Version 3 added each layer's own ``quantizer`` and ``activation`` to its layer entry
and the policy's rules (``layer_quantizers``, ``activation``, ``layer_activations``) to
the architecture config. Version 2 files (still read) have one quantizer and float
activations. Version 1 files (still read) also have no header digest, no per-array CRCs
and no ``code_layout`` (always ``'words'``).

The digests locate damage: a corrupted header is refused by its own SHA-256 and a
corrupted array by its entry's CRC-32 (4 bytes of header per array, where a SHA-256 in
hex took 76), each naming the bytes it covers; a non-zero padding byte by its offset; a
truncated file by the byte it ends at. The final SHA-256 still covers the whole file.

Array dtypes are limited to uint32, float32 and bfloat16. ``load`` reads bytes and JSON
only (no pickle, nothing that can run code) and checks, before returning anything: the
magic, the version, the length (``truncated at byte N (expected M)``), the checksum,
every array's dtype, size and place in the data section, and that the layers and every
array shape are those the architecture config implies (``layer X has shape Y, expected
Z``). A file from a stranger is data only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import shiftjax
from shiftjax import codes as codes_lib
from shiftjax import quantizers as qz
# FILE_SUFFIX, FLOAT_DTYPES, ARRAY_DTYPES and write_atomic are imported from here too.
from shiftjax.deploy.container import (  # pylint: disable=unused-import
    ARRAY_DTYPES, DIGEST_BYTES, FILE_SUFFIX, FLOAT_DTYPES, FORMAT_NAME, MAGIC,
    MAX_HEADER_BYTES, READABLE_VERSIONS, _PREFIX, _check_array_specs, _data_start,
    _dtype_name, _no_duplicate_keys, _reject_constant, check_header_keys,
    encode_container, read_arrays, write_atomic)
from shiftjax.deploy.architecture import (  # pylint: disable=unused-import
    CODE_LAYOUTS, POLICY_KEYS, Layer, PackedModelError, build_layers, check_architecture,
    expected_arrays, is_int, quantizer_from_json, quantizer_to_json)

FORMAT_VERSION = 3  # what PackedModel.save writes; READABLE_VERSIONS lists what load reads


def _format_to_json(fmt: codes_lib.CodeFormat | None) -> dict | None:
  return None if fmt is None else {"bits": fmt.bits, "e0": fmt.e0, "has_zero": fmt.has_zero}


# ---------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, eq=False)
class PackedModel:
  """A deployable shift network: architecture, quantizer, layers and numpy arrays.

  Build one with ``shiftjax.export.export`` (a trained flax model), ``deploy.pack`` or
  ``load``; run it with ``deploy.packed_apply``; write it with ``save``.

  Attributes:
    architecture: one of ``ARCHITECTURES``.
    config: the architecture's fields (``check_architecture``), including
      ``in_channels`` and the ``full_precision`` layer patterns.
    quantizer: the default weight spec (None: float); each layer's own, which mixed
      widths set apart, is its ``Layer.quantizer``.
    layers: the forward pass (``build_layers(architecture, config, quantizer)``).
    arrays: ``{'<layer>/kernel' | '/scale' | '/bias': numpy array}``.
    float_dtype: ``'float32'`` or ``'bfloat16'``, storage of float kernels.
    metadata: JSON-serializable extra facts (source step, dataset, input normalization).
    code_layout: how the quantized kernels' codes sit in their uint32 words
      (``architecture.CODE_LAYOUTS``): ``'bitplanes'`` (exactly N bits per weight, what
      ``pack`` writes by default) or ``'words'`` (the kernels' layout; version 1 files).
  """
  architecture: str
  config: dict
  quantizer: qz.Quantizer | None
  layers: tuple[Layer, ...]
  arrays: dict[str, np.ndarray]
  float_dtype: str = "float32"
  metadata: dict = dataclasses.field(default_factory=dict)
  code_layout: str = "bitplanes"

  @property
  def code_format(self) -> codes_lib.CodeFormat | None:
    """The code format of the packed kernels (None for a float model)."""
    return None if self.quantizer is None else self.quantizer.code_format

  @property
  def plan(self) -> tuple:
    """The static part of the forward pass (hashable; a ``jax.jit`` static argument)."""
    return (self.layers, self.code_layout)

  @functools.cached_property
  def device_arrays(self) -> dict[str, jax.Array]:
    """The arrays on the default device, still packed (computed once)."""
    return {k: jnp.asarray(v) for k, v in self.arrays.items()}

  def check(self) -> None:
    """Raises PackedModelError unless the layers and arrays fit the architecture."""
    config = check_architecture(self.architecture, self.config)
    if self.float_dtype not in FLOAT_DTYPES:
      raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got "
                             f"{self.float_dtype!r}")
    if self.code_layout not in CODE_LAYOUTS:
      raise PackedModelError(f"code_layout must be one of {CODE_LAYOUTS}, got "
                             f"{self.code_layout!r}")
    _check_layers([l.to_json() for l in self.layers],
                  build_layers(self.architecture, config, self.quantizer))
    declared = {name: (_dtype_name(a.dtype), tuple(a.shape))
                for name, a in self.arrays.items()}
    _check_array_specs(declared, expected_arrays(self.layers,
                                                 self.float_dtype, self.code_layout))

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
    """The file's bytes, format version 3 (see the module docstring); checks the model first."""
    self.check()
    return encode_container(FORMAT_VERSION, {
        "format": FORMAT_NAME,
        "writer": f"shiftjax {shiftjax.__version__}",
        "architecture": {"name": self.architecture, "config": self.config},
        "quantizer": quantizer_to_json(self.quantizer),
        "code_format": _format_to_json(self.code_format),
        "code_layout": self.code_layout,
        "float_dtype": self.float_dtype,
        "layers": [l.to_json() for l in self.layers],
    }, self.arrays, self.metadata)

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes the model file atomically (a temporary file in the same directory, then a
    rename); FileExistsError if ``path`` exists, unless ``overwrite``. Returns the path."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    write_atomic(path, self.to_bytes(), overwrite=overwrite)
    return path


# ------------------------------------------------------------------------------ loading


# Layer fields that format version 3 added: each layer's own weight and input specs.
_LAYER_KEYS_SINCE_3 = ("quantizer", "activation")


def _layer_json(layer: Layer, version: int) -> dict:
  out = layer.to_json()
  return out if version >= 3 else {k: v for k, v in out.items()
                                   if k not in _LAYER_KEYS_SINCE_3}


def _check_layers(stored: Any, expected: Sequence[Layer],
                  version: int = FORMAT_VERSION) -> None:
  if not isinstance(stored, list):
    raise PackedModelError(f"layers must be a list, got {type(stored).__name__}")
  for i, layer in enumerate(expected):
    want = _layer_json(layer, version)
    if i >= len(stored):
      raise PackedModelError(f"the file has {len(stored)} layers, the architecture "
                             f"{len(expected)} (layer {layer.name!r} is missing)")
    if stored[i] != want:
      got = stored[i]
      name = got.get("name") if isinstance(got, dict) else None
      if isinstance(got, dict) and name == layer.name and got.get("shape") != list(
          layer.shape):
        raise PackedModelError(f"layer {name!r} has shape {got.get('shape')}, "
                               f"expected {list(layer.shape)}")
      raise PackedModelError(f"layer {i} is {got}, but the architecture implies {want}")
  if len(stored) > len(expected):
    raise PackedModelError(f"the file has {len(stored)} layers, the architecture "
                           f"{len(expected)}")


def from_bytes(buf: bytes, *, source: str = "packed model") -> PackedModel:
  """Parses and checks a packed model file's bytes (``load`` without the file).

  Reads versions 1 and 2. Damage is reported where it is: a truncated file by the byte
  it ends at, a version 2 or 3 file's corrupted header or array by the bytes its digest
  covers, a non-zero padding byte by its offset; a version 1 file has one digest only.
  """
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
  if version not in READABLE_VERSIONS:
    raise fail(f"unsupported format version {version} at byte 8 (this shiftjax "
               f"{shiftjax.__version__} reads versions "
               f"{', '.join(map(str, READABLE_VERSIONS))})")
  digest_ok = hashlib.sha256(memoryview(buf)[:n - DIGEST_BYTES]).digest() == (
      buf[n - DIGEST_BYTES:])
  checksum_error = fail("checksum mismatch: the file is corrupted (SHA-256 of bytes "
                        f"0..{n - DIGEST_BYTES} differs from the one stored at its end)")
  if header_len > MAX_HEADER_BYTES:
    if not digest_ok:
      raise checksum_error
    raise fail(f"header of {header_len} bytes (the length at byte 12) exceeds the "
               f"{MAX_HEADER_BYTES} byte limit")
  head_end = _PREFIX.size + header_len
  data_start = _data_start(version, header_len)
  if n < data_start + DIGEST_BYTES:
    raise fail(f"truncated at byte {n} (expected at least {data_start + DIGEST_BYTES})")
  if version >= 2 and hashlib.sha256(memoryview(buf)[:head_end]).digest() != (
      buf[head_end:head_end + DIGEST_BYTES]):
    raise fail(f"header corrupted: the SHA-256 of bytes 0..{head_end} differs from the "
               f"one stored at bytes {head_end}..{head_end + DIGEST_BYTES}")
  try:
    header = json.loads(buf[_PREFIX.size:head_end].decode("utf-8"),
                        object_pairs_hook=_no_duplicate_keys,
                        parse_constant=_reject_constant)
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not digest_ok:
      raise checksum_error from None
    raise fail(f"header is not valid JSON: {e}") from None
  if not isinstance(header, dict) or not is_int(header.get("data_bytes")) or (
      header["data_bytes"] < 0):
    if not digest_ok:
      raise checksum_error
    raise fail("header must be a JSON object with a non-negative integer data_bytes")
  expected_size = data_start + header["data_bytes"] + DIGEST_BYTES
  if n < expected_size:
    raise fail(f"truncated at byte {n} (expected {expected_size})")
  if n > expected_size:
    raise fail(f"{n - expected_size} unexpected bytes after byte {expected_size} (file is "
               f"{n} bytes, expected {expected_size})")
  if version == 1 and not digest_ok:
    raise checksum_error
  try:
    if version >= 4:
      from shiftjax.deploy import packed_tree  # pylint: disable=g-import-not-at-top
      model = packed_tree.from_header(version, header, buf, head_end, data_start)
    else:
      model = _model_from_header(version, header, buf, head_end, data_start)
  except PackedModelError as e:
    raise fail(str(e)) from None
  if not digest_ok:  # every part checked out: the damage is in the final digest itself
    raise fail(f"checksum corrupted: bytes {n - DIGEST_BYTES}..{n} (the file's SHA-256) "
               "do not match the file, whose parts all match their own digests")
  return model


def _model_from_header(version: int, header: dict, buf: bytes, head_end: int,
                       data_start: int) -> PackedModel:
  check_header_keys(version, header)
  arch = header["architecture"]
  if not isinstance(arch, dict) or set(arch) != {"name", "config"}:
    raise PackedModelError(f"architecture must be an object with name and config, got "
                           f"{arch!r}")
  if version < 3 and isinstance(arch["config"], dict) and set(arch["config"]) & set(
      POLICY_KEYS):
    raise PackedModelError(f"architecture config fields {sorted(POLICY_KEYS)} need format "
                           f"version 3, the file is version {version}")
  config = check_architecture(arch["name"], arch["config"])
  quantizer = quantizer_from_json(header["quantizer"])
  fmt = None if quantizer is None else quantizer.code_format
  if header["code_format"] != _format_to_json(fmt):
    raise PackedModelError(f"code_format {header['code_format']} does not match the "
                           f"quantizer's {_format_to_json(fmt)}")
  code_layout = header.get("code_layout", "words")  # version 1 knew one layout
  if code_layout not in CODE_LAYOUTS:
    raise PackedModelError(f"code_layout must be one of {CODE_LAYOUTS}, got "
                           f"{code_layout!r}")
  float_dtype = header["float_dtype"]
  if float_dtype not in FLOAT_DTYPES:
    raise PackedModelError(f"float_dtype must be one of {FLOAT_DTYPES}, got "
                           f"{float_dtype!r}")
  layers = build_layers(arch["name"], config, quantizer)
  _check_layers(header["layers"], layers, version)
  arrays = read_arrays(version, header, buf, head_end, data_start,
                       expected_arrays(layers, float_dtype, code_layout))
  return PackedModel(arch["name"], config, quantizer, layers, arrays, float_dtype,
                     header["metadata"], code_layout)


def load(path: str | os.PathLike) -> PackedModel:
  """Reads a packed model file; PackedModelError naming the problem if it is bad.

  Reads bytes and JSON only: nothing in the file is executed or unpickled.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    buf = f.read()
  return from_bytes(buf, source=path)
