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
import struct
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import shiftjax
from shiftjax import codes as codes_lib
from shiftjax import quantizers as qz
from shiftjax.deploy.architecture import (  # pylint: disable=unused-import
    CODE_LAYOUTS, POLICY_KEYS, Layer, PackedModelError, build_layers, check_architecture,
    expected_arrays, is_int, quantizer_from_json, quantizer_to_json)

MAGIC = b"SHIFTJAX"
FORMAT_VERSION = 3  # what save writes; READABLE_VERSIONS lists what load reads
FORMAT_NAME = "shiftjax.packed_model"
FILE_SUFFIX = ".shiftjax"
ALIGN = 64
DIGEST_BYTES = 32
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
MAX_HEADER_BYTES = 64 << 20

# dtype name in the file -> (little-endian storage dtype, dtype of the loaded array).
ARRAY_DTYPES = {
    "uint32": (np.dtype("<u4"), np.dtype(np.uint32)),
    "float32": (np.dtype("<f4"), np.dtype(np.float32)),
    "bfloat16": (np.dtype("<u2"), np.dtype(jnp.bfloat16)),
}
# Storage of the full-precision kernels (stem, classifier).
FLOAT_DTYPES = ("float32", "bfloat16")


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


def encode_container(version: int, fields: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> bytes:
  """The file's bytes (module docstring): the header ``fields`` plus the ``arrays``
  entries, ``data_bytes`` and ``metadata``, the digests, and the aligned array data."""
  entries, blobs, data_bytes = [], [], 0
  for name, a in arrays.items():
    dtype = _dtype_name(a.dtype)
    storage = ARRAY_DTYPES[dtype][0]
    # Same-size native view, then little-endian bytes (a no-op on little-endian hosts).
    raw = np.ascontiguousarray(a).view(storage.newbyteorder("=")).astype(
        storage, copy=False).tobytes()
    offset = _align(data_bytes)
    entries.append({"name": name, "dtype": dtype, "shape": list(a.shape),
                    "offset": offset, "nbytes": len(raw), "crc32": zlib.crc32(raw)})
    blobs.append((offset, raw))
    data_bytes = offset + len(raw)
  header = {**fields, "arrays": entries, "data_bytes": data_bytes, "metadata": dict(metadata)}
  head = json.dumps(header, sort_keys=False, allow_nan=False,
                    separators=(",", ":")).encode("utf-8")
  head_end = _PREFIX.size + len(head)
  start = _data_start(version, len(head))
  buf = bytearray(start + data_bytes)
  _PREFIX.pack_into(buf, 0, MAGIC, version, len(head))
  buf[_PREFIX.size:head_end] = head
  buf[head_end:head_end + DIGEST_BYTES] = hashlib.sha256(buf[:head_end]).digest()
  for off, raw in blobs:
    buf[start + off:start + off + len(raw)] = raw
  buf += hashlib.sha256(buf).digest()
  return bytes(buf)


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


# Header fields and array-entry fields of each readable version.
_HEADER_KEYS = {1: {"format", "writer", "architecture", "quantizer", "code_format",
                    "float_dtype", "layers", "arrays", "data_bytes", "metadata"}}
_HEADER_KEYS[2] = _HEADER_KEYS[1] | {"code_layout"}
_ARRAY_KEYS = {1: {"name", "dtype", "shape", "offset", "nbytes"}}
_ARRAY_KEYS[2] = _ARRAY_KEYS[1] | {"crc32"}
# Version 3: each layer's own weight and input specs (mixed widths, quantized
# activations) in the layers and the architecture config; the same header fields.
_HEADER_KEYS[3], _ARRAY_KEYS[3] = _HEADER_KEYS[2], _ARRAY_KEYS[2]
# Version 4: any model, its layers keyed by module path (``deploy.packed_tree``).
_HEADER_KEYS[4] = {"format", "writer", "framework", "model", "layers", "arrays",
                   "data_bytes", "metadata"}
_ARRAY_KEYS[4] = _ARRAY_KEYS[3]
READABLE_VERSIONS = tuple(sorted(_HEADER_KEYS))


def _data_start(version: int, header_len: int) -> int:
  """Where the array data begins: after the header (and, from version 2, its digest)."""
  return _align(_PREFIX.size + header_len + (DIGEST_BYTES if version >= 2 else 0))


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


def _check_padding(buf: bytes, gaps: Sequence[tuple[int, int]]) -> None:
  """Raises naming the first non-zero byte in the ``[start, end)`` gaps."""
  for start, end in gaps:
    gap = buf[start:end]
    if gap.strip(b"\0"):
      offset = start + next(i for i, b in enumerate(gap) if b)
      raise PackedModelError(f"corrupted padding: byte {offset} is {buf[offset]}, expected 0")


def check_header_keys(version: int, header: dict) -> None:
  keys = _HEADER_KEYS[version]
  missing, unknown = keys - set(header), set(header) - keys
  if missing or unknown:
    raise PackedModelError(f"header fields differ from version {version}: missing "
                           f"{sorted(missing)}, unknown {sorted(unknown)}")
  if header["format"] != FORMAT_NAME:
    raise PackedModelError(f"header format is {header['format']!r}, expected "
                           f"{FORMAT_NAME!r}")
  if not isinstance(header["metadata"], dict):
    raise PackedModelError("metadata must be a JSON object")


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


def read_arrays(version: int, header: dict, buf: bytes, head_end: int, data_start: int,
                expected: Mapping[str, tuple[str, tuple]] | None = None
                ) -> dict[str, np.ndarray]:
  """The header's arrays, checked (entries, overlap, ``expected`` names, dtypes and
  shapes when given, CRC-32s, zero padding) and copied out of ``buf``, in the order of
  ``expected`` (else the file's)."""
  array_keys = _ARRAY_KEYS[version]
  entries = header["arrays"]
  if not isinstance(entries, list):
    raise PackedModelError("arrays must be a list")
  data_bytes = header["data_bytes"]
  declared, spans = {}, []
  for e in entries:
    if not isinstance(e, dict) or set(e) != array_keys:
      raise PackedModelError(f"array entries need exactly the fields "
                             f"{sorted(array_keys)}, got {e!r}")
    name, dtype, shape = e["name"], e["dtype"], e["shape"]
    if not isinstance(name, str) or name in declared:
      raise PackedModelError(f"array name {name!r} is not a string or is repeated")
    if dtype not in ARRAY_DTYPES:
      raise PackedModelError(f"array {name!r} has dtype {dtype!r}; allowed: "
                             f"{', '.join(ARRAY_DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
      raise PackedModelError(f"array {name!r} has shape {shape!r}, not a list of "
                             "non-negative integers")
    offset, nbytes = e["offset"], e["nbytes"]
    size = math.prod(shape) * ARRAY_DTYPES[dtype][0].itemsize
    if not is_int(nbytes) or nbytes != size:
      raise PackedModelError(f"array {name!r} declares {nbytes!r} bytes, but shape "
                             f"{shape} of {dtype} takes {size}")
    if not is_int(offset) or offset < 0 or offset % ALIGN:
      raise PackedModelError(f"array {name!r} offset {offset!r} is not a non-negative "
                             f"multiple of {ALIGN}")
    if offset + nbytes > data_bytes:
      raise PackedModelError(f"array {name!r} occupies bytes [{offset}, {offset + nbytes}) "
                             f"of the data section, which has {data_bytes} bytes")
    if version >= 2 and not (is_int(e["crc32"]) and 0 <= e["crc32"] < 1 << 32):
      raise PackedModelError(f"array {name!r} crc32 must be an integer in 0..2**32-1, got "
                             f"{e['crc32']!r}")
    declared[name] = (dtype, tuple(shape))
    spans.append((offset, offset + nbytes, name))
  spans.sort()
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise PackedModelError(f"arrays {a!r} and {b!r} overlap")
  if expected is not None:
    _check_array_specs(declared, expected)
  if version >= 2:
    for e in entries:
      start = data_start + e["offset"]
      if zlib.crc32(buf[start:start + e["nbytes"]]) != e["crc32"]:
        raise PackedModelError(
            f"array {e['name']!r} is corrupted: its bytes {start}..{start + e['nbytes']} "
            "do not match its CRC-32")
    ends = [data_start] + [data_start + end for _, end, _ in spans]
    starts = [data_start + start for start, _, _ in spans] + [data_start + data_bytes]
    header_gap = (head_end + DIGEST_BYTES, data_start)  # after the header's digest
    _check_padding(buf, [header_gap, *zip(ends, starts)])

  arrays = {}
  for e in entries:
    storage, loaded = ARRAY_DTYPES[e["dtype"]]
    a = np.frombuffer(buf, dtype=storage, count=math.prod(e["shape"]),
                      offset=data_start + e["offset"])
    arrays[e["name"]] = a.astype(storage.newbyteorder("="), copy=True).view(
        loaded).reshape(e["shape"])
  return {name: arrays[name] for name in (expected if expected is not None else arrays)}




def load(path: str | os.PathLike) -> PackedModel:
  """Reads a packed model file; PackedModelError naming the problem if it is bad.

  Reads bytes and JSON only: nothing in the file is executed or unpickled.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    buf = f.read()
  return from_bytes(buf, source=path)
