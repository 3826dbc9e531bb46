"""Packed model files: ``load`` (every version), and the packed ResNets of versions 1-3.

Version 4 (``deploy.packed_tree``, written by ``PackedTree.save``, ``save_model`` and
``shiftjax.export``) holds any model's packed layers by module path. Versions 1-3 held
one of the zoo's ResNets as a flax-free description (``PackedModel``, read here, never
written again): ``shiftjax.export.upgrade`` maps one onto the ResNet's flax module as a
version 4 tree, and ``shiftjax.export.load`` runs it.

The container (``deploy.container``; all integers little-endian)::

  bytes [0, 8)         magic b"SHIFTJAX"
  bytes [8, 12)        format version, uint32
  bytes [12, 20)       header length H, uint64
  bytes [20, 20 + H)   header: a UTF-8 JSON object
  bytes [20 + H, +32)  SHA-256 of bytes [0, 20 + H): the header's own digest (v2+)
  bytes [.., D)        zeros, D = 20 + H + 32 rounded up to a multiple of 64
  bytes [D, D + S)     array data: each array's raw C-order little-endian bytes at
                       D + its offset (offsets are multiples of 64; zeros between)
  bytes [D + S, +32)   SHA-256 of bytes [0, D + S)

A version 1-3 header::

  {"format": "shiftjax.packed_model", "writer": "shiftjax 0.1.0",
   "architecture": {"name": "CifarResNet", "config": {...}},
   "quantizer": {"name": "DenseShift", "fields": {...}, "repr": "..."} | null,
   "code_format": {"bits": 3, "e0": 0, "has_zero": false} | null,
   "code_layout": "bitplanes" | "words",   (absent in version 1: "words")
   "float_dtype": "float32" | "bfloat16",
   "layers": [{"op": "conv", "name": "stem", "shape": [3, 3, 1, 16], ...}, ...],
   "arrays": [{"name": "stem/kernel", "dtype": "float32", "shape": [3, 3, 1, 16],
               "offset": 0, "nbytes": 576, "crc32": 2914163817}, ...],
   "data_bytes": S, "metadata": {...}}

Each conv and dense layer has ``'<name>/kernel'`` (codes in the ``code_layout``:
``'bitplanes'`` ``[ceil(n / 32), bits]`` or ``'words'`` ``[ceil(K / floor(32/bits)), O]``;
a float kernel with its BatchNorm's scale folded in), ``'<name>/bias'`` and, for a
quantized conv, ``'<name>/scale'``; a layer with a quantized input its activation
quantizer's ``'<name>/activation_<param>'``. Version 3 added each layer's own
``quantizer`` and ``activation`` and the policy's rules in the architecture config.

The digests locate damage: a corrupted header is refused by its own SHA-256 and a
corrupted array by its entry's CRC-32, each naming the bytes it covers; a non-zero
padding byte by its offset; a truncated file by the byte it ends at. ``load`` reads bytes
and JSON only (no pickle, nothing that can run code) and checks, before returning
anything, the magic, the version, the length, the checksums, every array's dtype, size
and place, and that every array is the one its layer implies. A file from a stranger is
data only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

import shiftjax
from shiftjax import codes as codes_lib
from shiftjax import pooling
from shiftjax import quantizers as qz
# FILE_SUFFIX, FLOAT_DTYPES, ARRAY_DTYPES and write_atomic are imported from here too.
from shiftjax.deploy.container import (  # pylint: disable=unused-import
    ARRAY_DTYPES, DIGEST_BYTES, FILE_SUFFIX, FLOAT_DTYPES, MAGIC, MAX_HEADER_BYTES,
    READABLE_VERSIONS, _PREFIX, _data_start, _no_duplicate_keys, _reject_constant,
    check_header_keys, read_arrays, write_atomic)
from shiftjax.deploy.resnet_config import POLICY_KEYS, check_architecture
from shiftjax.deploy.spec_json import (PackedModelError, activation_from_json, is_int,
                                       quantizer_from_json)

FORMAT_VERSION = 4  # what is written (PackedTree.save); READABLE_VERSIONS lists what is read
_MAX_LAYERS = 4096
_LAYER_OPS = ("conv", "dense", "max_pool", "mean_pool",
              *(f"speech_{how}_pool" for how in pooling.POOLINGS))


# ------------------------------------------------------- versions 1-3: packed ResNets


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


def _format_to_json(fmt: codes_lib.CodeFormat | None) -> dict | None:
  return None if fmt is None else {"bits": fmt.bits, "e0": fmt.e0, "has_zero": fmt.has_zero}


@dataclasses.dataclass(frozen=True)
class FileLayer:
  """A conv or dense layer of a version 1-3 file: its flax module path, logical weight
  shape (HWIO or ``(in, out)``), weight spec (None: float) and input spec."""
  name: str
  op: str
  shape: tuple[int, ...]
  quantizer: qz.Quantizer | None
  activation: Any = None

  @property
  def quantized(self) -> bool:
    return self.quantizer is not None


@dataclasses.dataclass(frozen=True, eq=False)
class PackedModel:
  """A packed ResNet of format version 1-3, as read (``load``); never written again.

  ``shiftjax.export.upgrade`` turns it into a version 4 ``PackedTree`` of the ResNet's
  flax module, and ``shiftjax.export.load`` runs it.

  Attributes:
    architecture: one of ``architecture.ARCHITECTURES``.
    config: the module's fields (``check_architecture``), ``in_channels`` and the
      policy's rules.
    quantizer: the default weight spec (None: float).
    layers: the conv and dense layers, in the file's order.
    arrays: ``{'<layer>/kernel' | '/scale' | '/bias' | '/activation_<p>': array}``.
    float_dtype: ``'float32'`` or ``'bfloat16'``, storage of float kernels.
    metadata: the file's JSON metadata.
    code_layout: ``'bitplanes'`` or ``'words'`` (version 1).
  """
  architecture: str
  config: dict
  quantizer: qz.Quantizer | None
  layers: tuple[FileLayer, ...]
  arrays: dict[str, np.ndarray]
  float_dtype: str = "float32"
  metadata: dict = dataclasses.field(default_factory=dict)
  code_layout: str = "bitplanes"

  def size_report(self) -> dict[str, Any]:
    """Stored bytes against the float32 weights of the trained network (conv and dense
    kernels, conv BatchNorm's four and the dense bias, as ``train.weight_bytes``)."""
    quantized = quantized_words = float_weights = 0
    for layer in self.layers:
      n = math.prod(layer.shape)
      float_weights += n + (4 if layer.op == "conv" else 1) * layer.shape[-1]
      if layer.quantized:
        quantized += n
        quantized_words += self.arrays[f"{layer.name}/kernel"].size
    return {"float32_weight_bytes": 4 * float_weights,
            "array_bytes": sum(a.nbytes for a in self.arrays.values()),
            "quantized_weights": quantized,
            "bits_per_quantized_weight": 32 * quantized_words / quantized if quantized
                                         else None}


def _spec_from_entry(name: str, spec: Any) -> qz.Quantizer | None:
  """A version 3 layer entry's weight spec (name and fields, without the repr)."""
  if spec is None:
    return None
  if not isinstance(spec, dict) or set(spec) != {"name", "fields"}:
    raise PackedModelError(f"layer {name!r} quantizer must be null or an object with "
                           f"name and fields, got {spec!r}")
  return quantizer_from_json({**spec, "repr": ""})


def _file_layers(stored: Any, version: int, quantizer: qz.Quantizer | None
                 ) -> tuple[FileLayer, ...]:
  """The conv and dense layers of a header's ``layers`` list, checked as data (that they
  are the module's is ``export.upgrade``'s check)."""
  if not isinstance(stored, list) or len(stored) > _MAX_LAYERS:
    raise PackedModelError(f"layers must be a list of at most {_MAX_LAYERS} entries")
  out, names = [], set()
  for i, entry in enumerate(stored):
    if not isinstance(entry, dict) or entry.get("op") not in _LAYER_OPS:
      raise PackedModelError(f"layer {i} must be an object with an op of {_LAYER_OPS}, "
                             f"got {entry!r}")
    if entry["op"] not in ("conv", "dense"):
      continue
    name, shape = entry.get("name"), entry.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 256 or name in names:
      raise PackedModelError(f"layer {i} has a missing, long or repeated name {name!r}")
    rank = 4 if entry["op"] == "conv" else 2
    if (not isinstance(shape, list) or len(shape) != rank
        or not all(is_int(d) and 0 < d <= 1 << 20 for d in shape)
        or math.prod(shape) > 1 << 31):
      raise PackedModelError(f"layer {name!r} shape must be {rank} positive integers, "
                             f"got {shape!r}")
    if not isinstance(entry.get("quantized"), bool):
      raise PackedModelError(f"layer {name!r} quantized must be true or false")
    if version >= 3:
      spec = _spec_from_entry(name, entry.get("quantizer"))
      activation = activation_from_json(entry.get("activation"))
    else:
      spec, activation = (quantizer if entry["quantized"] else None), None
    if entry["quantized"] != (spec is not None):
      raise PackedModelError(f"layer {name!r} is quantized={entry['quantized']} with "
                             f"weight spec {spec}")
    names.add(name)
    out.append(FileLayer(name, entry["op"], tuple(shape), spec, activation))
  return tuple(out)


def _file_arrays(layers: Sequence[FileLayer], float_dtype: str, code_layout: str
                 ) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{array name: (dtype name, shape)}`` that a version 1-3 file of ``layers`` holds."""
  out = {}
  for layer in layers:
    n_out = layer.shape[-1]
    if layer.activation is not None:
      for param, shape in layer.activation.param_shapes().items():
        out[f"{layer.name}/activation_{param}"] = ("float32", tuple(shape))
    if layer.quantized:
      out[f"{layer.name}/kernel"] = ("uint32", packed_kernel_shape(
          layer.shape, layer.quantizer.bits, code_layout))
      if layer.op == "conv":
        out[f"{layer.name}/scale"] = ("float32", (n_out,))
    else:
      out[f"{layer.name}/kernel"] = (float_dtype, layer.shape)
    out[f"{layer.name}/bias"] = ("float32", (n_out,))
  return out


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
  layers = _file_layers(header["layers"], version, quantizer)
  arrays = read_arrays(version, header, buf, head_end, data_start,
                       _file_arrays(layers, float_dtype, code_layout))
  return PackedModel(arch["name"], config, quantizer, layers, arrays, float_dtype,
                     header["metadata"], code_layout)


def load(path: str | os.PathLike):
  """Reads a packed model file: a ``PackedTree`` (version 4) or a ``PackedModel``
  (versions 1-3); PackedModelError naming the problem if it is bad.

  Reads bytes and JSON only: nothing in the file is executed or unpickled.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    buf = f.read()
  return from_bytes(buf, source=path)
