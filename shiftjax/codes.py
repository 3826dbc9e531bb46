"""The N-bit code format shared by the quantizers, export and the kernels.

An N-bit code is ``sign_bit << (N-1) | exponent_index`` and stands for the value
``(-1)**sign_bit * 2**(e0 + exponent_index)``, ``e0`` being an integer offset of the
layer. Zero-free formats (DenseShift, DeepShift-Q) use all ``2**N`` codes. Formats with
a zero (S3, DeepShift-PS) give up the largest negative magnitude: the all-ones code
``2**N - 1`` means 0, so their exponent index runs over ``0 .. 2**(N-1) - 2``.

Decoding assembles the float's bit pattern (sign bit, biased exponent field, zero
mantissa) and bitcasts it: no lookup table and no multiply, exactly what a kernel does.

Codes are stored packed in uint32 words, in one of two layouts:

* "words" (:func:`pack` / :func:`unpack`, the kernel layout): ``floor(32/N)`` whole
  codes per word along one axis, code j at bits ``[j*N, (j+1)*N)``. A code is one shift
  and one mask away, but widths that do not divide 32 leave bits unused: 3.2 bits per
  weight at N = 3, 5.33 at N = 5 (:func:`bits_per_weight`).
* "bitplanes" (:func:`pack_bitplanes` / :func:`unpack_bitplanes`): the flattened codes
  in blocks of 32, one word per bit of the code, so N words hold bit j of 32 codes and
  a tensor whose size is a multiple of 32 takes exactly N bits per code, for every
  width. Decoding one code reads N words (N shifts and masks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_BITS = 8


@dataclasses.dataclass(frozen=True)
class FloatLayout:
  """Bit layout of an IEEE binary float type."""
  uint_dtype: type
  mantissa_bits: int
  exponent_bits: int

  @property
  def bias(self) -> int:
    """Exponent bias: ``2**(exponent_bits - 1) - 1``."""
    return (1 << (self.exponent_bits - 1)) - 1

  @property
  def min_normal_exponent(self) -> int:
    """Smallest normal exponent, ``1 - bias``."""
    return 1 - self.bias

  @property
  def max_exponent(self) -> int:
    """Largest normal exponent (the bias)."""
    return self.bias


FLOAT_LAYOUTS = {
    jnp.dtype(jnp.float32): FloatLayout(jnp.uint32, 23, 8),
    jnp.dtype(jnp.bfloat16): FloatLayout(jnp.uint16, 7, 8),
    jnp.dtype(jnp.float16): FloatLayout(jnp.uint16, 10, 5),
}


def float_layout(dtype) -> FloatLayout:
  """Sign/exponent/mantissa layout of float32, bfloat16 or float16; ValueError else."""
  dtype = jnp.dtype(dtype)
  if dtype not in FLOAT_LAYOUTS:
    allowed = ", ".join(str(d) for d in FLOAT_LAYOUTS)
    raise ValueError(f"dtype must be one of {allowed}, got {dtype}")
  return FLOAT_LAYOUTS[dtype]


@dataclasses.dataclass(frozen=True)
class CodeFormat:
  """How integer codes map to power-of-two values.

  Attributes:
    bits: code width N, 1..8.
    e0: exponent of the smallest magnitude (code index 0 means ``+-2**e0``).
    has_zero: whether the all-ones code ``2**N - 1`` stands for 0.
  """
  bits: int
  e0: int = 0
  has_zero: bool = False

  def __post_init__(self):
    if not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= MAX_BITS:
      raise ValueError(f"code bits must be an integer in 1..{MAX_BITS}, got {self.bits!r}")
    if not isinstance(self.e0, (int, np.integer)) or isinstance(self.e0, bool):
      raise ValueError(f"e0 must be an integer exponent offset, got {self.e0!r}")
    if self.has_zero and self.bits < 2:
      raise ValueError("a format with a zero code needs at least 2 bits")

  @property
  def num_exponents(self) -> int:
    """Number of distinct magnitudes ``2**(e0 + i)``."""
    return (1 << (self.bits - 1)) - int(self.has_zero)

  @property
  def zero_code(self) -> int | None:
    """The code of 0 (``2**bits - 1``) for formats with a zero, else None."""
    return (1 << self.bits) - 1 if self.has_zero else None

  @property
  def max_exponent(self) -> int:
    """Exponent of the largest magnitude: ``e0 + num_exponents - 1``."""
    return self.e0 + self.num_exponents - 1

  def values(self) -> np.ndarray:
    """Every representable value, sorted, as float64 numpy."""
    mags = 2.0 ** (self.e0 + np.arange(self.num_exponents))
    vals = np.concatenate([-mags, mags] + ([np.zeros(1)] if self.has_zero else []))
    return np.sort(vals)

  def check_dtype(self, dtype) -> FloatLayout:
    """Raises unless every value of this format is a normal number of ``dtype``."""
    layout = float_layout(dtype)
    if self.e0 < layout.min_normal_exponent or self.max_exponent > layout.max_exponent:
      raise ValueError(
          f"exponents {self.e0}..{self.max_exponent} of {self} are not all normal "
          f"{jnp.dtype(dtype)} exponents ({layout.min_normal_exponent}.."
          f"{layout.max_exponent})")
    return layout


def code_dtype(bits: int):
  """Storage dtype of unpacked ``bits``-bit codes (uint8 for every supported width)."""
  del bits  # every supported width fits a byte
  return jnp.uint8


def valid_codes(fmt: CodeFormat) -> np.ndarray:
  """Every code that stands for a value of ``fmt``, ascending, uint8 numpy.

  A format with a zero has one unused code, ``2**(N-1) - 1`` (positive sign, exponent
  index one past the last): it is left out.
  """
  all_codes = np.arange(1 << fmt.bits, dtype=np.uint8)
  if fmt.has_zero:
    all_codes = all_codes[all_codes != fmt.num_exponents]
  return all_codes


def encode(negative: jax.Array, index: jax.Array, fmt: CodeFormat,
           is_zero: jax.Array | None = None) -> jax.Array:
  """Builds codes from a sign, an exponent index in 0..num_exponents-1 and a zero mask."""
  codes = (negative.astype(jnp.uint8) << (fmt.bits - 1)) | index.astype(jnp.uint8)
  if is_zero is not None:
    if not fmt.has_zero:
      raise ValueError(f"{fmt} has no zero code")
    codes = jnp.where(is_zero, jnp.uint8(fmt.zero_code), codes)
  return codes


def split(codes: jax.Array, fmt: CodeFormat) -> tuple[jax.Array, jax.Array]:
  """Codes -> (sign bit, exponent index), both uint32."""
  codes = codes.astype(jnp.uint32)
  return codes >> (fmt.bits - 1), codes & ((1 << (fmt.bits - 1)) - 1)


def decode(codes: jax.Array, fmt: CodeFormat, dtype=jnp.float32) -> jax.Array:
  """Integer codes -> exact float values, by assembling the float's bits.

  Args:
    codes: integer array of N-bit codes (any shape, any integer dtype).
    fmt: the code format.
    dtype: float32, bfloat16 or float16.
  Returns:
    array of ``codes.shape`` and ``dtype``.
  """
  layout = fmt.check_dtype(dtype)
  sign, index = split(codes, fmt)
  total_bits = 8 * jnp.dtype(layout.uint_dtype).itemsize
  exponent_field = index + jnp.uint32(layout.bias + fmt.e0)
  bits = (sign << (total_bits - 1)) | (exponent_field << layout.mantissa_bits)
  if fmt.has_zero:
    bits = jnp.where(codes.astype(jnp.uint32) == fmt.zero_code, jnp.uint32(0), bits)
  return jax.lax.bitcast_convert_type(bits.astype(layout.uint_dtype), dtype)


# ------------------------------------------------------------------------------------
# Packing: floor(32 / bits) codes per uint32 word along one axis.

WORD_BITS = 32


def _check_bits(bits) -> int:
  if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
      or not 1 <= bits <= MAX_BITS):
    raise ValueError(f"code bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
  return int(bits)


def _check_axis(axis, ndim: int, what: str) -> int:
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise ValueError(f"axis must be an integer, got {axis!r}")
  if ndim == 0:
    raise ValueError(f"{what} must have at least one dimension, got a scalar")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for {what} of rank {ndim}")
  return int(axis) % ndim


def _is_concrete(x) -> bool:
  # Under jit the values are unknown; only shapes and dtypes can be checked then.
  return not isinstance(x, jax.core.Tracer)


def codes_per_word(bits: int) -> int:
  """How many ``bits``-wide codes one uint32 word holds: ``floor(32 / bits)``."""
  return WORD_BITS // _check_bits(bits)


def bits_per_weight(bits: int) -> float:
  """Stored bits per weight when packed: 2 -> 2.0, 3 -> 3.2, 4 -> 4.0, 5 -> 5.33."""
  return WORD_BITS / codes_per_word(bits)


def num_words(n: int, bits: int) -> int:
  """Number of uint32 words that hold ``n`` codes of ``bits`` bits (the last one padded)."""
  return -(-n // codes_per_word(bits))


def _field_shifts(bits: int) -> np.ndarray:
  """Bit offset of each code inside a word: code j sits at bits [j*bits, (j+1)*bits)."""
  return np.arange(codes_per_word(bits), dtype=np.uint32) * np.uint32(bits)


def _check_codes(codes, bits: int):
  """``codes`` as an integer array (numpy for a list), its values in 0..2**bits-1 when
  they are concrete (under ``jit`` they cannot be checked)."""
  if not hasattr(codes, "dtype"):
    codes = np.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
  if _is_concrete(codes) and codes.size:
    values = np.asarray(codes)
    lo, hi = values.min(), values.max()
    if lo < 0 or hi >= 1 << bits:
      raise ValueError(f"{bits}-bit codes must lie in 0..{(1 << bits) - 1}, got values in "
                       f"{lo}..{hi}")
  return codes


def pack(codes, bits: int, axis: int = 0):
  """Packs N-bit codes into uint32 words along ``axis``.

  Code j of each group of ``floor(32/bits)`` consecutive codes along ``axis`` sits at
  bits ``[j*bits, (j+1)*bits)`` of its word (code 0 in the low bits); the last word is
  zero-padded. Axis 0 is the contraction dimension of a ``[K, N]`` weight.

  Args:
    codes: integer array of codes in ``0 .. 2**bits - 1``, rank >= 1. Values are
      checked when the array is concrete; under ``jit`` they cannot be, and bits above
      ``bits`` are dropped so a bad code never spills into its neighbours.
    bits: code width, 1..8 (static).
    axis: the axis to pack along (static).
  Returns:
    uint32 array of ``codes.shape`` with ``shape[axis] = ceil(n / floor(32/bits))``:
    numpy for numpy (or list) input, computed on the host without compiling
    anything (export packs every layer shape once), else a jax array.
  """
  bits = _check_bits(bits)
  codes = _check_codes(codes, bits)
  axis = _check_axis(axis, codes.ndim, "codes")
  if isinstance(codes, (np.ndarray, np.generic)):
    return _pack_checked(np, codes, bits, axis)
  return _pack_jit(codes, bits, axis)


def _pack_checked(xp, codes, bits: int, axis: int):
  """The packing itself; ``xp`` is numpy or jax.numpy, which share these calls."""
  per_word = codes_per_word(bits)
  n = codes.shape[axis]
  words = num_words(n, bits)
  c = xp.moveaxis(codes, axis, -1).astype(np.uint32) & np.uint32((1 << bits) - 1)
  c = xp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, words * per_word - n)])
  c = c.reshape(c.shape[:-1] + (words, per_word))
  # The bit fields are disjoint, so a sum is the OR of the shifted codes.
  w = xp.sum(c << _field_shifts(bits), axis=-1, dtype=np.uint32)
  return xp.moveaxis(w, -1, axis)


# jit so that an eager call compiles once per shape, not once per op and shape.
_pack_jit = jax.jit(functools.partial(_pack_checked, jnp), static_argnums=(1, 2))


def unpack(words, bits: int, n: int, axis: int = 0):
  """Inverse of :func:`pack`: uint32 words -> the first ``n`` codes along ``axis``.

  Args:
    words: uint32 array with ``shape[axis] = ceil(n / floor(32/bits))``.
    bits: code width, 1..8 (static).
    n: number of codes along ``axis`` (static).
    axis: the packed axis (static).
  Returns:
    uint8 array of ``words.shape`` with ``shape[axis] = n``: numpy for numpy (or list)
    input, else a jax array.
  """
  bits = _check_bits(bits)
  if not hasattr(words, "dtype"):
    words = np.asarray(words, dtype=np.uint32)
  if words.dtype != np.uint32:
    raise ValueError(f"packed words must be uint32, got dtype {words.dtype}")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative integer number of codes, got {n!r}")
  axis = _check_axis(axis, words.ndim, "words")
  per_word = codes_per_word(bits)
  expected = num_words(n, bits)
  if words.shape[axis] != expected:
    raise ValueError(
        f"{n} codes of {bits} bits take {expected} words ({per_word} per word) along "
        f"axis {axis}, but words has {words.shape[axis]} there (shape {words.shape})")
  if isinstance(words, (np.ndarray, np.generic)):
    return _unpack_checked(np, words, bits, int(n), axis)
  return _unpack_jit(words, bits, int(n), axis)


def _unpack_checked(xp, words, bits: int, n: int, axis: int):
  w = xp.moveaxis(words, axis, -1)
  c = (w[..., None] >> _field_shifts(bits)) & np.uint32((1 << bits) - 1)
  c = c.reshape(w.shape[:-1] + (w.shape[-1] * codes_per_word(bits),))[..., :n]
  return xp.moveaxis(c.astype(np.uint8), -1, axis)


_unpack_jit = jax.jit(functools.partial(_unpack_checked, jnp), static_argnums=(1, 2, 3))


# ------------------------------------------------------------------------------------
# Bit planes: exactly N bits per code, 32 codes per group of N words.


def _check_count(n, what: str = "n") -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"{what} must be a non-negative integer number of codes, got {n!r}")
  return int(n)


def bitplane_words(n: int, bits: int) -> int:
  """Number of uint32 words that hold ``n`` codes as bit planes: ``ceil(n / 32) * bits``."""
  bits = _check_bits(bits)
  return -(-_check_count(n) // WORD_BITS) * bits


def _lane_shifts() -> np.ndarray:
  """Bit i of a plane word belongs to code i of its block of 32."""
  return np.arange(WORD_BITS, dtype=np.uint32)


def pack_bitplanes(codes, bits: int):
  """Packs N-bit codes as bit planes: exactly N bits per code.

  ``codes`` is flattened in C order and cut into blocks of 32 (the last one
  zero-padded); ``words[b, j]`` holds bit j of the 32 codes of block b, bit i of the
  word being bit j of flat code ``32*b + i``.

  Args:
    codes: integer array of codes in ``0 .. 2**bits - 1``, any shape (a scalar is one
      code; an empty array gives ``[0, bits]`` words). Values are checked when the
      array is concrete; under ``jit`` they cannot be, and bits above ``bits`` are
      dropped.
    bits: code width, 1..8 (static).
  Returns:
    uint32 array of shape ``[ceil(codes.size / 32), bits]``: numpy for numpy (or list)
    input, computed on the host without compiling anything, else a jax array.
  """
  bits = _check_bits(bits)
  codes = _check_codes(codes, bits)
  if isinstance(codes, (np.ndarray, np.generic)):
    return _pack_bitplanes_checked(np, np.asarray(codes), bits)
  return _pack_bitplanes_jit(codes, bits)


def _pack_bitplanes_checked(xp, codes, bits: int):
  n = codes.size
  blocks = -(-n // WORD_BITS)
  c = codes.reshape(-1).astype(np.uint32)
  c = xp.pad(c, (0, blocks * WORD_BITS - n)).reshape(blocks, WORD_BITS)
  lanes = _lane_shifts()
  # One plane at a time (at most 8), so numpy holds one [blocks, 32] temporary, not N.
  # The lanes are disjoint bits, so a sum is their OR.
  planes = [xp.sum(((c >> np.uint32(j)) & np.uint32(1)) << lanes, axis=-1, dtype=np.uint32)
            for j in range(bits)]
  return xp.stack(planes, axis=-1).reshape(blocks, bits)


_pack_bitplanes_jit = jax.jit(functools.partial(_pack_bitplanes_checked, jnp),
                              static_argnums=(1,))


def _check_shape(shape) -> tuple[int, ...]:
  if (not isinstance(shape, (tuple, list))
      or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                 for d in shape)):
    raise ValueError(f"shape must be a tuple of non-negative integers, got {shape!r}")
  return tuple(int(d) for d in shape)


def unpack_bitplanes(words, bits: int, shape):
  """Inverse of :func:`pack_bitplanes`: uint32 bit planes -> codes of ``shape``.

  Jit-friendly and vectorized (each plane shifted by ``arange(32)``): the XLA decode
  path of the bit-plane layout, words -> codes here, then :func:`decode`.

  Args:
    words: uint32 array of shape exactly ``[ceil(n / 32), bits]``, n = ``prod(shape)``.
    bits: code width, 1..8 (static).
    shape: shape of the codes, a tuple of non-negative integers (static; ``()`` is one
      code).
  Returns:
    uint8 array of ``shape``: numpy for numpy (or list) input, computed on the host
    without compiling anything, else a jax array.
  """
  bits = _check_bits(bits)
  shape = _check_shape(shape)
  if not hasattr(words, "dtype"):
    words = np.asarray(words, dtype=np.uint32)
  if words.dtype != np.uint32:
    raise ValueError(f"packed words must be uint32, got dtype {words.dtype}")
  n = math.prod(shape)
  expected = (-(-n // WORD_BITS), bits)
  if tuple(words.shape) != expected:
    raise ValueError(
        f"{n} codes (shape {shape}) of {bits} bits take bit-plane words of shape "
        f"{expected} (one word per bit per 32 codes), but words has shape "
        f"{tuple(words.shape)}")
  if isinstance(words, (np.ndarray, np.generic)):
    return _unpack_bitplanes_checked(np, words, bits, shape)
  return _unpack_bitplanes_jit(words, bits, shape)


def _unpack_bitplanes_checked(xp, words, bits: int, shape: tuple[int, ...]):
  lanes = _lane_shifts()
  c = xp.zeros((words.shape[0], WORD_BITS), np.uint32)
  for j in range(bits):  # bit j of all 32 codes of each block, from plane j
    c = c | (((words[:, j:j + 1] >> lanes) & np.uint32(1)) << np.uint32(j))
  return c.reshape(-1)[:math.prod(shape)].astype(np.uint8).reshape(shape)


_unpack_bitplanes_jit = jax.jit(functools.partial(_unpack_bitplanes_checked, jnp),
                                static_argnums=(1, 2))


# ------------------------------------------------------------------------------------
# Multiplying a float by a code without a float multiply.


def xla_flushes_denormals(dtype, backend: str | None = None) -> bool:
  """Whether XLA's multiply of ``dtype`` flushes denormal inputs and results to zero.

  Measured with jax 0.10 on CPU: float32 and bfloat16 flush (XLA runs with FTZ/DAZ set
  and computes bfloat16 in float32); float16 keeps denormals, because it is computed in
  float32 (where float16 denormals are normal) and rounded once to float16. GPU: XLA
  leaves flush-to-zero off by default (``--xla_gpu_ftz``), so nothing flushes
  (UNVERIFIED: no GPU was available when this was written). Other backends are
  treated like CPU (UNVERIFIED).
  """
  layout_dtype = jnp.dtype(dtype)
  float_layout(layout_dtype)
  backend = jax.default_backend() if backend is None else backend
  if backend in ("gpu", "cuda", "rocm"):
    return False
  return layout_dtype != jnp.dtype(jnp.float16)


def _round_shift_right(sig: jax.Array, shift: jax.Array, max_shift: int) -> jax.Array:
  """``sig / 2**shift`` rounded to nearest, ties to even; int32, ``shift >= 1``.

  ``shift`` is clamped to ``max_shift``, which must make every ``sig`` round to 0.
  """
  shift = jnp.clip(shift, 1, max_shift)
  q = sig >> shift
  rem = sig & ((1 << shift) - 1)
  half = 1 << (shift - 1)
  up = (rem > half) | ((rem == half) & ((q & 1) == 1))
  return q + up.astype(jnp.int32)


def _scale_gradual(ex, mx, p, layout: FloatLayout) -> jax.Array:
  """|x| * 2**p for finite x, with denormals, as a magnitude bit pattern (int32).

  The general, slower path of :func:`shift_multiply`, for denormal x and denormal
  results. ``x = sig * 2**(e - bias - M)`` with ``e = max(ex, 1)``; the product's
  leading bit then has biased exponent ``e + p + top - M`` (top: index of sig's top
  bit).
  A normal result is exact (only a left shift of sig); a denormal one is ``sig *
  2**(e + p - 1)`` in units of the smallest denormal, rounded to nearest even, as IEEE
  does when it rounds the exact product once.
  """
  m = layout.mantissa_bits
  emax = (1 << layout.exponent_bits) - 1
  sig = jnp.where(ex > 0, mx | (1 << m), mx)
  t = jnp.maximum(ex, 1) + p
  top = 31 - jax.lax.clz(sig)  # -1 for sig == 0, handled by the sig == 0 select
  biased = t + top - m
  normal = ((biased - 1) << m) + (sig << jnp.clip(m - top, 0, m))
  left = sig << jnp.clip(t - 1, 0, m)  # denormal x scaled up, still denormal: exact
  right = _round_shift_right(sig, 1 - t, m + 2)
  denormal = jnp.where(t >= 1, left, right)
  mag = jnp.where(biased >= 1, normal, denormal)
  mag = jnp.where(biased >= emax, emax << m, mag)
  return jnp.where(sig == 0, 0, mag)


def shift_multiply(x, codes, fmt: CodeFormat, *,
                   flush_denormals: bool | None = None) -> jax.Array:
  """``x * decode(codes, fmt, x.dtype)``, bit for bit, by integer ops on x's bits.

  For a normal x and a weight ``s * 2**p`` whose product stays normal,
  ``bits(x * s * 2**p) = bits(x) + (p << M) ^ (s < 0) << (E + M)``: one integer add
  and a sign xor replace the multiply. Guards (all ``jnp.where``, no float op):
    * zero weight code: ``+-0`` with x's sign, NaN for inf/NaN x;
    * x = +-0, inf, NaN: ``+-0``, ``+-inf`` (sign xor), quiet NaN;
    * exponent overflow: ``+-inf``;
    * denormal x or a result below the normal range: ``+-0`` when the backend flushes
      denormals (float32/bfloat16 on CPU), else the exact product rounded to nearest
      even by integer shifts (float16 on CPU; every dtype on GPU). No case uses a float
      multiply: IEEE rounds the exact product once, and the exact product of a power
      of two is a shift of x's significand, so integer rounding reproduces it.
  NaN payloads and the sign of a NaN may differ from the hardware's (a NaN is a NaN).

  Codes outside the format (the unused code ``2**(N-1) - 1`` of a format with a zero)
  give whatever the integer add gives, as they do in :func:`decode`.

  Cost per element, all 32-bit integer ops on the bit pattern, no float op: about 30
  in flush mode (field extraction, the add, the sign xor, compares and 5 selects; 7
  more with a zero code) and about 75 in gradual mode (a count-leading-zeros, shifts
  and a round-half-even for the denormal cases), all evaluated for every element
  since ``jnp.where`` computes both sides. So under XLA on a CPU this emulation is
  slower than the multiply it replaces (measured 3-4x on a [1024, 1024] float32 /
  float16 array, 2 busy cores): it pins down the semantics a shift kernel must keep;
  a kernel takes the add for the common case and branches out for the rare ones.

  Args:
    x: float32, bfloat16 or float16 array.
    codes: integer codes of ``fmt``, broadcastable against x as in ``x * w``.
    fmt: the code format; its values must be normal numbers of x's dtype.
    flush_denormals: whether denormal inputs and results become (signed) zero; None
      follows XLA's multiply on ``jax.default_backend()`` at trace time
      (:func:`xla_flushes_denormals`); pass it when computing on another backend.
  Returns:
    array of x's dtype and the broadcast shape of x and codes.
  """
  x, codes = jnp.asarray(x), jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
  fmt.check_dtype(x.dtype)
  if flush_denormals is None:
    flush_denormals = xla_flushes_denormals(x.dtype)
  return _shift_multiply(x, codes, jnp.int32(fmt.e0), jnp.uint32(fmt.bits),
                         flush_denormals=bool(flush_denormals), has_zero=fmt.has_zero)


# e0 and bits are traced, so one compilation serves every format of a shape and dtype.
@functools.partial(jax.jit, static_argnames=("flush_denormals", "has_zero"))
def _shift_multiply(x: jax.Array, codes: jax.Array, e0: jax.Array, bits: jax.Array, *,
                    flush_denormals: bool, has_zero: bool) -> jax.Array:
  layout = float_layout(x.dtype)
  m = layout.mantissa_bits
  width = 8 * jnp.dtype(layout.uint_dtype).itemsize
  emax = (1 << layout.exponent_bits) - 1  # exponent field of inf and NaN
  inf_mag = emax << m
  nan_mag = inf_mag | (1 << (m - 1))

  xbits = jax.lax.bitcast_convert_type(x, layout.uint_dtype).astype(jnp.uint32)
  x_sign = xbits >> (width - 1)
  mag = (xbits & jnp.uint32((1 << (width - 1)) - 1)).astype(jnp.int32)
  ex, mx = mag >> m, mag & ((1 << m) - 1)
  codes = codes.astype(jnp.uint32)
  one = jnp.uint32(1)
  w_sign, index = codes >> (bits - one), codes & ((one << (bits - one)) - one)
  p = index.astype(jnp.int32) + e0

  # The paper's integer add; exact while x is normal and ex + p stays in 1..emax-1.
  t = ex + p
  out = mag + (p << m)
  normal_x = (ex >= 1) & (ex < emax)
  if flush_denormals:
    out = jnp.where(normal_x & (t <= 0), 0, out)
    out = jnp.where(ex == 0, 0, out)
  else:
    slow = (ex == 0) | (normal_x & (t <= 0))
    out = jnp.where(slow, _scale_gradual(ex, mx, p, layout), out)
  out = jnp.where(normal_x & (t >= emax), inf_mag, out)
  out = jnp.where(ex == emax, jnp.where(mx == 0, inf_mag, mag | (1 << (m - 1))), out)
  sign = x_sign ^ w_sign
  if has_zero:
    w_zero = codes == (one << bits) - one
    # x * (+0): signed zero with x's sign, NaN for inf and NaN.
    out = jnp.where(w_zero, jnp.where(ex == emax, nan_mag, 0), out)
    sign = jnp.where(w_zero, x_sign, sign)
  out_bits = (sign << (width - 1)) | out.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(out_bits.astype(layout.uint_dtype), x.dtype)
