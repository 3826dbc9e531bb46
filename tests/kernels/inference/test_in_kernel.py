"""Tests of shiftjax.kernels.inference.in_kernel, the decoders the Pallas kernels run on
packed words, and of the word layout they read (``shiftjax.codes.pack`` along K) against
the format's definition."""

from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax import codes as codes_lib
from shiftjax.kernels.inference import in_kernel
from shiftjax.kernels.inference.matmul import SUPPORTED_BITS


def _pack_local(codes, bits):
  """Reference packer written from the format's definition (numpy, axis 0)."""
  codes = np.asarray(codes, np.uint64)
  p = 32 // bits
  k, n = codes.shape
  words = -(-k // p)
  padded = np.zeros((words * p, n), np.uint64)
  padded[:k] = codes
  padded = padded.reshape(words, p, n)
  out = np.zeros((words, n), np.uint64)
  for j in range(p):
    out |= padded[:, j] << np.uint64(j * bits)
  return out.astype(np.uint32)


def _pack(codes, bits):
  return jnp.asarray(codes_lib.pack(np.asarray(codes), bits, axis=0))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_decode_slot_decodes_every_code_in_every_slot(bits):
  p = 32 // bits
  codes = np.resize(np.arange(1 << bits), (p * 2, 1 << bits))  # every code in every slot
  packed = _pack(codes, bits)
  np.testing.assert_array_equal(np.asarray(codes_lib.unpack(packed, bits, p * 2)), codes)
  sign, index = codes >> (bits - 1), codes & ((1 << (bits - 1)) - 1)
  for e0 in (-126, -9, 0, 7):
    want = np.where(sign == 1, -1.0, 1.0) * np.ldexp(1.0, e0 + index)
    for dtype in (jnp.float32, jnp.bfloat16):
      got = jnp.stack([in_kernel.decode_slot(packed, j, bits, e0, dtype) for j in range(p)],
                      axis=1).reshape(codes.shape)
      assert got.dtype == dtype
      np.testing.assert_array_equal(np.asarray(got, np.float64), want)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_decode_pair_bf16_is_two_slots_in_one_word(bits):
  # Every code in every slot (each column runs through all codes, shifted per slot):
  # the low half of pair i is slot i's bfloat16, the high half slot i + P/2's.
  p = 32 // bits
  codes = (np.arange(1 << bits)[None, :] + 3 * np.arange(p * 2)[:, None]) % (1 << bits)
  packed = _pack(codes, bits)
  to_bits = lambda v: np.asarray(lax.bitcast_convert_type(v, jnp.uint16))
  for e0 in (-126, -9, 0, 7):
    for i in range(p // 2):
      pair = np.asarray(in_kernel.decode_pair_bf16(packed, i, bits, e0))
      assert pair.dtype == np.uint32
      low = to_bits(in_kernel.decode_slot(packed, i, bits, e0, jnp.bfloat16))
      high = to_bits(in_kernel.decode_slot(packed, i + p // 2, bits, e0, jnp.bfloat16))
      np.testing.assert_array_equal(pair & 0xFFFF, low)
      np.testing.assert_array_equal(pair >> 16, high)


def test_packing_agrees_with_shiftjax_codes():
  rng = np.random.default_rng(0)
  for bits in SUPPORTED_BITS:
    codes = rng.integers(0, 1 << bits, size=(37, 5))
    np.testing.assert_array_equal(np.asarray(codes_lib.pack(codes, bits)),
                                  _pack_local(codes, bits))
    np.testing.assert_array_equal(
        np.asarray(codes_lib.unpack(jnp.asarray(_pack_local(codes, bits)), bits, 37)), codes)
