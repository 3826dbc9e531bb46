"""The packed file's container, shared by every format version: bytes, digests, arrays.

Layout (all integers little-endian)::

  bytes [0, 8)         magic b"SHIFTJAX"
  bytes [8, 12)        format version, uint32
  bytes [12, 20)       header length H, uint64
  bytes [20, 20 + H)   header: a UTF-8 JSON object, with "arrays", "data_bytes" and
                       "metadata" besides its version's own fields
  bytes [20 + H, +32)  SHA-256 of bytes [0, 20 + H) (from version 2)
  bytes [.., D)        zeros, D = 20 + H + 32 rounded up to a multiple of 64
  bytes [D, D + S)     array data, each array at D + its offset (a multiple of 64)
  bytes [D + S, +32)   SHA-256 of bytes [0, D + S)

``deploy.format`` (versions 1-3: the ResNets' ``PackedModel``) and
``deploy.packed_tree`` (version 4: any model) build on it; ``format.from_bytes`` reads
every version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from shiftjax.deploy.spec_json import PackedModelError, is_int

MAGIC = b"SHIFTJAX"
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
