"""The N-bit code format shared by the quantizers, export and the kernels.

An N-bit code is ``sign_bit << (N-1) | exponent_index`` and stands for the value
``(-1)**sign_bit * 2**(e0 + exponent_index)``, ``e0`` being an integer offset of the
layer. Zero-free formats (DenseShift, DeepShift-Q) use all ``2**N`` codes. Formats with
a zero (S3, DeepShift-PS) give up the largest negative magnitude: the all-ones code
``2**N - 1`` means 0, so their exponent index runs over ``0 .. 2**(N-1) - 2``.

Decoding assembles the float's bit pattern (sign bit, biased exponent field, zero
mantissa) and bitcasts it: no lookup table and no multiply, exactly what a kernel does.
"""

from __future__ import annotations

import dataclasses

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
    return (1 << (self.exponent_bits - 1)) - 1

  @property
  def min_normal_exponent(self) -> int:
    return 1 - self.bias

  @property
  def max_exponent(self) -> int:
    return self.bias


FLOAT_LAYOUTS = {
    jnp.dtype(jnp.float32): FloatLayout(jnp.uint32, 23, 8),
    jnp.dtype(jnp.bfloat16): FloatLayout(jnp.uint16, 7, 8),
    jnp.dtype(jnp.float16): FloatLayout(jnp.uint16, 10, 5),
}


def float_layout(dtype) -> FloatLayout:
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
    return (1 << self.bits) - 1 if self.has_zero else None

  @property
  def max_exponent(self) -> int:
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
  del bits  # every supported width fits a byte
  return jnp.uint8


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
