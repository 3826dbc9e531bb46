"""Tests of shiftjax.codes: decode bit layout, pack/unpack, shift_multiply."""

import math
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax import codes as sc

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
UINTS = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16}
HYPOTHESIS = dict(max_examples=50, deadline=None, derandomize=True)


def _bits(x, name):
  return np.asarray(x).view(UINTS[name])


def _assert_same_floats(got, want, name):
  """Bit for bit, except that any NaN equals any NaN (payloads are not compared)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype
  got_nan = np.isnan(got.astype(np.float32))
  want_nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(got_nan, want_nan, err_msg="NaN positions differ")
  got_bits, want_bits = _bits(got, name), _bits(want, name)
  bad = (got_bits != want_bits) & ~want_nan
  if bad.any():
    i = np.flatnonzero(bad)[:8]
    rows = [f"got {got_bits.flat[j]:#x} want {want_bits.flat[j]:#x}" for j in i]
    raise AssertionError(f"{bad.sum()} of {bad.size} differ: " + "; ".join(rows))


# ------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("name, fmt, code, expected", [
    ("float32", sc.CodeFormat(4), 0b1011, 0xC1000000),  # -2**3
    ("float32", sc.CodeFormat(4), 0b0000, 0x3F800000),  # +1
    ("float32", sc.CodeFormat(3, e0=-2), 0b001, 0x3F000000),  # +2**-1
    ("float32", sc.CodeFormat(2, e0=-126), 0b10, 0x80800000),  # -smallest normal
    ("float32", sc.CodeFormat(2, e0=126), 0b01, 0x7F000000),  # +2**127
    ("bfloat16", sc.CodeFormat(4), 0b1011, 0xC100),
    ("bfloat16", sc.CodeFormat(4), 0b0000, 0x3F80),
    ("bfloat16", sc.CodeFormat(3, e0=-5, has_zero=True), 0b110, 0xBE00),  # -2**-3
    ("float16", sc.CodeFormat(4), 0b1011, 0xC800),
    ("float16", sc.CodeFormat(4), 0b0000, 0x3C00),
    ("float16", sc.CodeFormat(2, e0=-14), 0b00, 0x0400),  # smallest normal
    ("float16", sc.CodeFormat(5, e0=0), 0b01111, 0x7800),  # 2**15, largest power
])
def test_decode_bit_pattern(name, fmt, code, expected):
  got = sc.decode(jnp.array([code], jnp.uint8), fmt, DTYPES[name])
  assert got.dtype == DTYPES[name]
  assert int(_bits(got, name)[0]) == expected


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_zero_code_decodes_to_positive_zero(name, bits):
  fmt = sc.CodeFormat(bits, e0=-2, has_zero=True)
  got = sc.decode(jnp.array([fmt.zero_code]), fmt, DTYPES[name])
  assert int(_bits(got, name)[0]) == 0


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("fmt", [
    sc.CodeFormat(1), sc.CodeFormat(2, e0=-1), sc.CodeFormat(2, e0=3, has_zero=True),
    sc.CodeFormat(3, e0=-4, has_zero=True), sc.CodeFormat(4, e0=-7),
    sc.CodeFormat(5, e0=-14, has_zero=True), sc.CodeFormat(5, e0=-14),
], ids=str)
def test_every_code_decodes_to_a_format_value(name, fmt):
  valid = sc.valid_codes(fmt)
  assert len(valid) == len(fmt.values())  # so equal sets mean one code per value
  # A fixed [256] shape lets jax reuse its compiled ops across formats.
  got = np.asarray(sc.decode(np.resize(valid, 256), fmt, DTYPES[name]), np.float64)
  np.testing.assert_array_equal(np.unique(got), fmt.values())


@pytest.mark.parametrize("fmt, dtype", [
    (sc.CodeFormat(3, e0=-20), jnp.float16),
    (sc.CodeFormat(2, e0=-15), jnp.float16),  # 2**-15 is a float16 denormal
    (sc.CodeFormat(5, e0=1), jnp.float16),  # 2**16 overflows float16
    (sc.CodeFormat(2, e0=-127), jnp.float32),
    (sc.CodeFormat(8, e0=1), jnp.bfloat16),  # 2**128
    (sc.CodeFormat(3), jnp.int32),
    (sc.CodeFormat(3), jnp.float64),
], ids=str)
def test_check_dtype_rejects(fmt, dtype):
  with pytest.raises(ValueError):
    fmt.check_dtype(dtype)
  with pytest.raises(ValueError):
    sc.decode(jnp.zeros(2, jnp.uint8), fmt, dtype)


@pytest.mark.parametrize("fmt, dtype", [
    (sc.CodeFormat(2, e0=-14), jnp.float16),
    (sc.CodeFormat(5, e0=0), jnp.float16),  # up to 2**15
    (sc.CodeFormat(8, e0=0), jnp.float32),  # up to 2**127
    (sc.CodeFormat(8, e0=-126, has_zero=True), jnp.bfloat16),
], ids=str)
def test_check_dtype_accepts_boundary(fmt, dtype):
  assert fmt.check_dtype(dtype) == sc.float_layout(dtype)


# ------------------------------------------------------------------------------------
# pack / unpack


@pytest.mark.parametrize("bits, codes, words", [
    (4, [1, 2, 3], [0x321]),
    (8, [1, 2, 3, 4, 5], [0x04030201, 0x5]),
    (2, [3] * 16 + [1], [0xFFFFFFFF, 0x1]),
    (3, [7] * 10 + [5], [0x3FFFFFFF, 0x5]),  # 10 per word, top 2 bits unused
    (5, [1, 31, 0, 0, 0, 2], [0x040003E1]),  # code j at bit 5j
    (1, [1, 0, 1] + [0] * 28 + [1, 1], [0x80000005, 0x1]),
])
def test_pack_layout(bits, codes, words):
  got = sc.pack(np.array(codes, np.uint8), bits)
  assert got.dtype == jnp.uint32
  assert [int(w) for w in got] == words
  np.testing.assert_array_equal(sc.unpack(got, bits, len(codes)), codes)


def _reference_pack(codes_1d, bits):
  """One word at a time, in Python: the layout as the spec states it."""
  per_word = 32 // bits
  words = []
  for start in range(0, len(codes_1d), per_word):
    word = 0
    for j, c in enumerate(codes_1d[start:start + per_word]):
      word |= int(c) << (j * bits)
    words.append(word)
  return np.array(words, np.uint32)


@pytest.mark.parametrize("array", ["numpy", "jax"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_edge_lengths_match_reference(bits, array):
  per_word = 32 // bits
  rng = np.random.default_rng(bits)
  lengths = {0, 1, per_word - 1, per_word, per_word + 1, 3 * per_word + 2}
  if array == "jax":  # the same code as numpy's, but every shape compiles: sample less
    lengths = {0, per_word + 1}
  for n in sorted(lengths):
    codes = rng.integers(0, 1 << bits, size=(n, 3)).astype(np.uint8)
    if array == "jax":
      codes = jnp.asarray(codes)
    words = sc.pack(codes, bits)
    assert isinstance(words, jax.Array if array == "jax" else np.ndarray)
    assert words.shape == (math.ceil(n / per_word), 3) and words.dtype == np.uint32
    for col in range(3):
      np.testing.assert_array_equal(words[:, col], _reference_pack(codes[:, col], bits))
    back = sc.unpack(words, bits, n)
    assert isinstance(back, jax.Array if array == "jax" else np.ndarray)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)


@st.composite
def _pack_cases(draw):
  bits = draw(st.integers(1, 8))
  per_word = 32 // bits
  ndim = draw(st.integers(1, 3))
  axis = draw(st.integers(-ndim, ndim - 1))
  n = draw(st.one_of(st.sampled_from([0, 1, per_word - 1, per_word, per_word + 1]),
                     st.integers(0, 3 * per_word + 5)))
  shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
  shape[axis] = n
  seed = draw(st.integers(0, 2**31 - 1))
  codes = np.random.default_rng(seed).integers(0, 1 << bits, size=shape)
  dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64]))
  return bits, axis, codes.astype(dtype)


@hypothesis.settings(**HYPOTHESIS)
@hypothesis.given(_pack_cases())
def test_pack_unpack_round_trip(case):
  bits, axis, codes = case
  n = codes.shape[axis]
  per_word = 32 // bits
  words = sc.pack(codes, bits, axis=axis)
  expected_shape = list(codes.shape)
  expected_shape[axis] = math.ceil(n / per_word)
  assert words.shape == tuple(expected_shape) and words.dtype == jnp.uint32
  if per_word * bits < 32:  # unused high bits stay zero
    assert not np.any(np.asarray(words) >> (per_word * bits))
  back = sc.unpack(words, bits, n, axis=axis)
  assert back.dtype == jnp.uint8
  np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pack_unpack_under_jit(bits):
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 1 << bits, (37, 4)), jnp.int32)
  pack = jax.jit(sc.pack, static_argnums=(1, 2))
  unpack = jax.jit(sc.unpack, static_argnums=(1, 2, 3))
  words = pack(codes, bits, 0)
  np.testing.assert_array_equal(words, sc.pack(np.asarray(codes), bits))
  np.testing.assert_array_equal(unpack(words, bits, 37, 0), codes)
  # A transposed layout packs the other axis.
  np.testing.assert_array_equal(unpack(pack(codes.T, bits, 1), bits, 37, 1), codes.T)


def test_bits_per_weight():
  expected = {1: 1.0, 2: 2.0, 3: 3.2, 4: 4.0, 5: 32 / 6, 6: 6.4, 7: 8.0, 8: 8.0}
  for bits, bpw in expected.items():
    assert sc.bits_per_weight(bits) == pytest.approx(bpw, rel=1e-12)
  for bits in (2, 3, 4):
    assert sc.bits_per_weight(bits) <= bits + 0.25
  # 6 codes of 5 bits fill 30 of 32 bits: 5.33 bits per weight, over the 0.25 bound.
  assert sc.bits_per_weight(5) == pytest.approx(5 + 1 / 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_packed_storage_matches_bits_per_weight(bits):
  n = 32 // bits * 100  # whole words, so no padding
  words = sc.pack(np.zeros((n, 8), np.uint8), bits)
  assert words.nbytes * 8 / (n * 8) == pytest.approx(sc.bits_per_weight(bits))


@pytest.mark.parametrize("bad_bits", [0, 9, -1, 2.0, True, "4"])
def test_bad_bits_raise(bad_bits):
  with pytest.raises(ValueError, match="code bits"):
    sc.pack(np.zeros(4, np.uint8), bad_bits)
  with pytest.raises(ValueError, match="code bits"):
    sc.unpack(np.zeros(1, np.uint32), bad_bits, 1)
  with pytest.raises(ValueError, match="code bits"):
    sc.bits_per_weight(bad_bits)


@pytest.mark.parametrize("codes, bits, axis, match", [
    (np.array([0, 4]), 2, 0, r"0\.\.3"),
    (np.array([-1, 2]), 3, 0, r"0\.\.7"),
    (np.array([256]), 8, 0, r"0\.\.255"),
    (jnp.array([[1, 16]]), 4, 1, r"0\.\.15"),
    (np.array([0.0, 1.0]), 4, 0, "integer"),
    (np.array([True, False]), 1, 0, "integer"),
    (np.array(3), 4, 0, "scalar"),
    (np.zeros((2, 3), np.uint8), 4, 2, "out of range"),
    (np.zeros((2, 3), np.uint8), 4, -3, "out of range"),
])
def test_pack_bad_inputs_raise(codes, bits, axis, match):
  with pytest.raises(ValueError, match=match):
    sc.pack(codes, bits, axis=axis)


@pytest.mark.parametrize("words, bits, n, axis, match", [
    (np.zeros(2, np.uint32), 4, 7, 0, "take 1 words"),
    (np.zeros(1, np.uint32), 4, 9, 0, "take 2 words"),
    (np.zeros(1, np.uint32), 3, 0, 0, "take 0 words"),
    (np.zeros((3, 2), np.uint32), 8, 4, 1, "take 1 words"),
    (np.zeros(1, np.int32), 4, 1, 0, "uint32"),
    (np.zeros(1, np.uint8), 4, 1, 0, "uint32"),
    (np.zeros(1, np.uint32), 4, -1, 0, "non-negative"),
    (np.zeros(1, np.uint32), 4, 1.0, 0, "non-negative"),
    (np.zeros(1, np.uint32), 4, 1, 1, "out of range"),
])
def test_unpack_bad_inputs_raise(words, bits, n, axis, match):
  with pytest.raises(ValueError, match=match):
    sc.unpack(words, bits, n, axis=axis)


def test_shape_errors_raise_while_tracing():
  # Raised at trace time, before anything is compiled.
  with pytest.raises(ValueError, match="take 2 words"):
    jax.jit(sc.unpack, static_argnums=(1, 2))(jnp.zeros(3, jnp.uint32), 4, 9)


# ------------------------------------------------------------------------------------
# pack_bitplanes / unpack_bitplanes


def _reference_bitplanes(codes, bits):
  """One bit at a time, in Python: words[b, j] bit i = bit j of flat code 32b + i."""
  flat = [int(c) for c in np.asarray(codes).reshape(-1)]
  words = np.zeros((math.ceil(len(flat) / 32), bits), np.uint32)
  for k, c in enumerate(flat):
    for j in range(bits):
      words[k // 32, j] |= np.uint32(((c >> j) & 1) << (k % 32))
  return words


def test_bitplane_layout_by_hand():
  # Codes 0..7 four times: bit 0 alternates (0b1010...), bit 1 goes in pairs, bit 2 in
  # fours, lane i (code i) at bit i of each word.
  codes = np.arange(32, dtype=np.uint8) % 8
  words = sc.pack_bitplanes(codes, 3)
  assert isinstance(words, np.ndarray) and words.dtype == np.uint32
  assert words.shape == (1, 3)
  assert [int(w) for w in words[0]] == [0xAAAAAAAA, 0xCCCCCCCC, 0xF0F0F0F0]
  # A 33rd code starts a second, zero-padded block: code 5 = 0b101 in lane 0.
  words = sc.pack_bitplanes(np.append(codes, 5), 3)
  assert [int(w) for w in words[1]] == [1, 0, 1]
  np.testing.assert_array_equal(sc.unpack_bitplanes(words, 3, (33,)), np.append(codes, 5))
  # Flattened in C order: row 1 of a [2, 16] array fills lanes 16..31.
  words = sc.pack_bitplanes(np.stack([np.zeros(16, np.uint8), np.ones(16, np.uint8)]), 1)
  assert [int(w) for w in words[0]] == [0xFFFF0000]


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitplanes_match_reference_at_edge_lengths(bits):
  rng = np.random.default_rng(bits)
  for n in (0, 1, 31, 32, 33, 64, 100):
    codes = rng.integers(0, 1 << bits, size=n).astype(np.uint8)
    words = sc.pack_bitplanes(codes, bits)
    assert isinstance(words, np.ndarray)
    assert words.shape == (math.ceil(n / 32), bits) and words.dtype == np.uint32
    assert words.size == sc.bitplane_words(n, bits)
    np.testing.assert_array_equal(words, _reference_bitplanes(codes, bits))
    back = sc.unpack_bitplanes(words, bits, (n,))
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)


@st.composite
def _bitplane_cases(draw):
  bits = draw(st.integers(1, 8))
  ndim = draw(st.integers(0, 3))
  shape = tuple(draw(st.one_of(st.sampled_from([0, 1, 31, 32, 33]), st.integers(1, 9)))
                for _ in range(ndim))
  seed = draw(st.integers(0, 2**31 - 1))
  codes = np.random.default_rng(seed).integers(0, 1 << bits, size=shape)
  dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64]))
  return bits, codes.astype(dtype)


@hypothesis.settings(**HYPOTHESIS)
@hypothesis.given(_bitplane_cases())
def test_bitplanes_round_trip(case):
  bits, codes = case
  n = codes.size
  words = sc.pack_bitplanes(codes, bits)
  assert words.shape == (math.ceil(n / 32), bits) and words.dtype == np.uint32
  # Exactly N bits per code, up to the padding of the last block of 32.
  assert words.size * 32 == bits * 32 * math.ceil(n / 32) == 32 * sc.bitplane_words(n, bits)
  if n % 32:  # padding lanes stay zero
    assert not np.any(words[-1] >> (n % 32))
  back = sc.unpack_bitplanes(words, bits, codes.shape)
  assert back.shape == codes.shape and back.dtype == np.uint8
  np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitplanes_jax_matches_numpy_under_jit(bits):
  shape = (37, 5)  # 185 codes: 5 full blocks and a padded one
  codes = np.random.default_rng(bits).integers(0, 1 << bits, shape).astype(np.int32)
  want = sc.pack_bitplanes(codes, bits)
  eager = sc.pack_bitplanes(jnp.asarray(codes), bits)
  assert isinstance(eager, jax.Array)
  np.testing.assert_array_equal(eager, want)
  pack = jax.jit(sc.pack_bitplanes, static_argnums=1)
  unpack = jax.jit(sc.unpack_bitplanes, static_argnums=(1, 2))
  words = pack(jnp.asarray(codes), bits)
  np.testing.assert_array_equal(words, want)
  back = unpack(words, bits, shape)
  assert isinstance(back, jax.Array) and back.dtype == jnp.uint8
  np.testing.assert_array_equal(back, codes)
  eager_back = sc.unpack_bitplanes(jnp.asarray(want), bits, shape)
  assert isinstance(eager_back, jax.Array)
  np.testing.assert_array_equal(eager_back, codes)


def test_bitplanes_under_jit_drop_high_bits():
  # Values cannot be checked while tracing; bits above `bits` must not leak into planes.
  codes = jnp.array([0b1101, 0b0110, -1], jnp.int32)
  words = jax.jit(sc.pack_bitplanes, static_argnums=1)(codes, 2)
  np.testing.assert_array_equal(words, sc.pack_bitplanes(np.array([0b01, 0b10, 0b11]), 2))


def test_bitplanes_decode_to_the_same_weights_as_words():
  fmt = sc.CodeFormat(3, e0=-4, has_zero=False)
  codes = np.random.default_rng(0).integers(0, 8, (576, 64)).astype(np.uint8)
  planes, words = sc.pack_bitplanes(codes, 3), sc.pack(codes, 3)
  assert planes.nbytes * 8 == 3 * codes.size < words.nbytes * 8
  from_planes = jax.jit(lambda w: sc.decode(sc.unpack_bitplanes(w, 3, (576, 64)), fmt))
  from_words = jax.jit(lambda w: sc.decode(sc.unpack(w, 3, 576), fmt))
  np.testing.assert_array_equal(from_planes(jnp.asarray(planes)), from_words(jnp.asarray(words)))


def test_bitplane_words():
  assert sc.bitplane_words(0, 3) == 0
  assert sc.bitplane_words(1, 3) == 3
  assert sc.bitplane_words(32, 5) == 5
  assert sc.bitplane_words(33, 5) == 10
  assert sc.bitplane_words(4096 * 4096, 3) * 32 == 3 * 4096 * 4096
  with pytest.raises(ValueError, match="-1"):
    sc.bitplane_words(-1, 3)
  with pytest.raises(ValueError, match="code bits.*got 9"):
    sc.bitplane_words(32, 9)


@pytest.mark.parametrize("bad_bits", [0, 9, -1, 2.0, True, "4"])
def test_bitplanes_bad_bits_raise(bad_bits):
  pattern = "code bits must be an integer in 1..8, got " + re.escape(repr(bad_bits))
  with pytest.raises(ValueError, match=pattern):
    sc.pack_bitplanes(np.zeros(4, np.uint8), bad_bits)
  with pytest.raises(ValueError, match=pattern):
    sc.unpack_bitplanes(np.zeros((1, 4), np.uint32), bad_bits, (4,))
  with pytest.raises(ValueError, match=pattern):
    sc.bitplane_words(4, bad_bits)


@pytest.mark.parametrize("codes, bits, match", [
    (np.array([0, 4]), 2, r"0\.\.3, got values in 0\.\.4"),
    (np.array([-1, 2]), 3, r"0\.\.7, got values in -1\.\.2"),
    (np.array([[256]]), 8, r"0\.\.255, got values in 256\.\.256"),
    (jnp.array([[1, 16]]), 4, r"0\.\.15"),
    (np.array(2), 1, r"0\.\.1, got values in 2\.\.2"),
    (np.array([0.0, 1.0]), 4, "integer array, got dtype float64"),
    (np.array([True, False]), 1, "integer array, got dtype bool"),
])
def test_pack_bitplanes_bad_inputs_raise(codes, bits, match):
  with pytest.raises(ValueError, match=match):
    sc.pack_bitplanes(codes, bits)


@pytest.mark.parametrize("words, bits, shape, match", [
    (np.zeros((1, 3), np.int32), 3, (32,), "uint32, got dtype int32"),
    (np.zeros((1, 3), np.uint8), 3, (32,), "uint32, got dtype uint8"),
    (np.zeros((1, 3), np.float32), 3, (32,), "uint32, got dtype float32"),
    (np.zeros((1, 3), np.uint32), 3, (33,), r"shape \(2, 3\).*has shape \(1, 3\)"),
    (np.zeros((2, 3), np.uint32), 3, (4, 8), r"shape \(1, 3\).*has shape \(2, 3\)"),
    (np.zeros((1, 4), np.uint32), 3, (32,), r"shape \(1, 3\).*has shape \(1, 4\)"),
    (np.zeros((3, 1), np.uint32), 3, (32,), r"shape \(1, 3\).*has shape \(3, 1\)"),
    (np.zeros(3, np.uint32), 3, (32,), r"shape \(1, 3\).*has shape \(3,\)"),
    (np.zeros((1, 1, 3), np.uint32), 3, (32,), r"has shape \(1, 1, 3\)"),
    (np.zeros((1, 3), np.uint32), 3, (0,), r"shape \(0, 3\)"),
    (np.zeros((1, 3), np.uint32), 3, 32, "tuple of non-negative integers, got 32"),
    (np.zeros((1, 3), np.uint32), 3, (-1, 2), r"non-negative integers, got \(-1, 2\)"),
    (np.zeros((1, 3), np.uint32), 3, (32.0,), r"non-negative integers, got \(32\.0,\)"),
])
def test_unpack_bitplanes_bad_inputs_raise(words, bits, shape, match):
  with pytest.raises(ValueError, match=match):
    sc.unpack_bitplanes(words, bits, shape)


def test_bitplane_shape_errors_raise_while_tracing():
  with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
    jax.jit(sc.unpack_bitplanes, static_argnums=(1, 2))(jnp.zeros((1, 4), jnp.uint32), 4, (40,))


# ------------------------------------------------------------------------------------
# shift_multiply


def _jax_product(x, codes, fmt):
  """The golden value: jax's own multiply by the decoded weight, on this backend."""
  return jnp.asarray(x) * sc.decode(jnp.asarray(codes), fmt, jnp.asarray(x).dtype)


# Formats whose values are all normal in every dtype (float16: 2**-14 .. 2**15), and
# extreme ones for the 8-bit-exponent dtypes.
SMALL_FORMATS = [
    sc.CodeFormat(2, e0=-14, has_zero=True), sc.CodeFormat(3, e0=9),
    sc.CodeFormat(4, e0=-7), sc.CodeFormat(4, e0=5, has_zero=True),
    sc.CodeFormat(5, e0=-14), sc.CodeFormat(5, e0=-14, has_zero=True),
]
WIDE_FORMATS = [
    sc.CodeFormat(5, e0=-126), sc.CodeFormat(5, e0=112, has_zero=True),
    sc.CodeFormat(3, e0=-60, has_zero=True),
]
CODE_COLUMNS = 32  # every code of a format up to 5 bits, repeated to a fixed width


def _formats(name):
  return SMALL_FORMATS + (WIDE_FORMATS if name != "float16" else [])


def _code_row(fmt):
  """Every valid code of fmt, repeated to [1, 32]: one shape, so jax reuses its ops."""
  return np.resize(sc.valid_codes(fmt), (1, CODE_COLUMNS))


def _edge_values(name):
  """Special and boundary values of a dtype, both signs, as a [n, 1] column."""
  dtype = DTYPES[name]
  info = jnp.finfo(dtype)
  tiny, den, ulp = float(info.tiny), float(info.smallest_subnormal), 2.0**-info.nmant
  mags = [0.0, den, 3 * den, tiny - den, tiny / 2, tiny / 2 + den, tiny, tiny * (1 + ulp),
          tiny * (1.5 + ulp), tiny * 3, 2.0**-10, 1.0, 1.5, 2.0 - ulp, 3.0, 2.0**10,
          float(info.max) / 256, float(info.max) / 2, float(info.max), math.inf, math.nan]
  mags = np.array(mags, np.float64).astype(dtype)
  return np.concatenate([mags, -mags])[:, None]


def _random_bits(name, n, seed):
  """[n, 1] random bit patterns, half with extreme exponents so edges are common.

  16-bit dtypes take every bit pattern instead (n is ignored).
  """
  if name != "float32":
    return np.arange(1 << 16, dtype=np.uint16).view(DTYPES[name])[:, None]
  bits = np.random.default_rng(seed).integers(0, 1 << 32, size=n, dtype=np.uint64)
  bits = bits.astype(np.uint32)
  bits[: n // 4] &= np.uint32(0x83FFFFFF)  # exponent field < 8: underflow side
  bits[n // 4: n // 2] |= np.uint32(0x7C000000)  # exponent field >= 248: overflow side
  return bits.view(np.float32)[:, None]


def _check_against_jax(x, name):
  """Compares for every format of the dtype; returns the golden products, [n, 32] each."""
  products = []
  for fmt in _formats(name):
    codes = _code_row(fmt)
    want = _jax_product(x, codes, fmt)
    _assert_same_floats(sc.shift_multiply(x, codes, fmt), want, name)
    products.append(np.asarray(want, np.float32))
  return products


@pytest.mark.parametrize("name", DTYPES)
def test_shift_multiply_edge_cases(name):
  x = _edge_values(name)
  assert np.isnan(x.astype(np.float32)).sum() == 2 and np.isinf(x).sum() == 2
  want = np.stack(_check_against_jax(x, name))
  # The edges were reached: overflow of finite x, underflow of nonzero x to zero.
  xf = np.broadcast_to(x.astype(np.float32), want.shape)
  assert np.any(np.isinf(want) & np.isfinite(xf))
  assert np.any((want == 0) & (xf != 0) & np.isfinite(xf))
  if name == "float16":  # this backend keeps float16 denormal results
    tiny = float(jnp.finfo(jnp.float16).tiny)
    assert np.any((np.abs(want) < tiny) & (want != 0) & (np.abs(xf) >= tiny))


@pytest.mark.parametrize("name", DTYPES)
def test_shift_multiply_random_bit_patterns(name):
  _check_against_jax(_random_bits(name, 1 << 16, seed=0), name)


def _reference_product(x, codes, fmt, flush):
  """Exact product in float64, rounded once to x's dtype, optionally flushed (numpy)."""
  w = np.asarray(sc.decode(jnp.asarray(codes), fmt, jnp.float32), np.float64)
  tiny = float(jnp.finfo(x.dtype).tiny)
  with np.errstate(all="ignore"):
    xf = x.astype(np.float64)
    if flush:
      xf = np.where(np.abs(xf) < tiny, np.copysign(0.0, xf), xf)
    exact = xf * w
    if flush:
      exact = np.where(np.abs(exact) < tiny, np.copysign(0.0, exact), exact)
    # float64 -> bfloat16 goes through float32 in ml_dtypes; that double rounding only
    # touches products below 2**-141, far under bfloat16's half-denormal 2**-134.
    return exact.astype(x.dtype)


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("name", DTYPES)
def test_shift_multiply_both_denormal_modes(name, flush):
  """Both modes in every dtype, against a float64 reference (not a backend)."""
  x = np.concatenate([_edge_values(name), _random_bits(name, 1 << 16, seed=1)])
  for fmt in _formats(name)[::2]:
    codes = _code_row(fmt)
    got = sc.shift_multiply(x, codes, fmt, flush_denormals=flush)
    _assert_same_floats(got, _reference_product(x, codes, fmt, flush), name)


@st.composite
def _multiply_cases(draw):
  name = draw(st.sampled_from(list(DTYPES)))
  bits = draw(st.integers(2, 5))
  has_zero = draw(st.booleans())
  fmt = sc.CodeFormat(bits, e0=0, has_zero=has_zero)
  layout = sc.float_layout(DTYPES[name])
  lo, hi = layout.min_normal_exponent, layout.max_exponent - fmt.num_exponents + 1
  e0 = draw(st.one_of(st.sampled_from([lo, hi, -1, 0]), st.integers(lo, hi)))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  width = 8 * np.dtype(UINTS[name]).itemsize
  x = rng.integers(0, 1 << width, size=128, dtype=np.uint64).astype(UINTS[name])
  codes = rng.choice(sc.valid_codes(fmt), size=128)
  return name, sc.CodeFormat(bits, e0=e0, has_zero=has_zero), x.view(DTYPES[name]), codes


@hypothesis.settings(**HYPOTHESIS)
@hypothesis.given(_multiply_cases())
def test_shift_multiply_matches_jax_property(case):
  name, fmt, x, codes = case
  _assert_same_floats(sc.shift_multiply(x, codes, fmt), _jax_product(x, codes, fmt), name)


@pytest.mark.parametrize("name", DTYPES)
def test_shift_multiply_under_jit(name):
  fmt = sc.CodeFormat(4, e0=-14, has_zero=True)
  x = _edge_values(name)
  codes = _code_row(fmt)
  mul = jax.jit(sc.shift_multiply, static_argnums=2)
  _assert_same_floats(mul(x, codes, fmt), jax.jit(_jax_product, static_argnums=2)(
      x, codes, fmt), name)


def test_shift_multiply_broadcasts_like_multiply():
  fmt = sc.CodeFormat(3, e0=-2, has_zero=True)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 1, 5)), jnp.float32)
  codes = jnp.asarray(rng.choice(sc.valid_codes(fmt), size=(4, 1)), jnp.int32)
  got = sc.shift_multiply(x, codes, fmt)
  assert got.shape == (2, 4, 5)
  _assert_same_floats(got, _jax_product(x, codes, fmt), "float32")


def _float_ops(jaxpr):
  """Names of float multiplies/divides anywhere in a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("mul", "div", "dot_general", "integer_pow", "pow", "exp2"):
      if any(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
        found.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _float_ops(sub)
  return found


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("flush", [False, True])
def test_shift_multiply_has_no_float_multiply(name, flush):
  fmt = sc.CodeFormat(4, e0=-3, has_zero=True)
  x = jnp.ones((4, 3), DTYPES[name])
  mul = lambda x, c: sc.shift_multiply(x, c, fmt, flush_denormals=flush)
  jaxpr = jax.make_jaxpr(mul)(x, jnp.zeros(3, jnp.uint8))
  assert _float_ops(jaxpr.jaxpr) == []
  # The walk does see a multiply, also inside a jit.
  nested = jax.make_jaxpr(jax.jit(lambda a, b: a * b))(x, x)
  assert _float_ops(nested.jaxpr) == ["mul"]


def test_xla_flushes_denormals():
  assert sc.xla_flushes_denormals(jnp.float32, "cpu")
  assert sc.xla_flushes_denormals(jnp.bfloat16, "cpu")
  assert not sc.xla_flushes_denormals(jnp.float16, "cpu")
  assert not sc.xla_flushes_denormals(jnp.float32, "gpu")
  with pytest.raises(ValueError):
    sc.xla_flushes_denormals(jnp.int32)


def test_shift_multiply_bad_inputs_raise():
  with pytest.raises(ValueError, match="dtype must be"):
    sc.shift_multiply(jnp.ones(3, jnp.int32), jnp.zeros(3, jnp.uint8), sc.CodeFormat(3))
  with pytest.raises(ValueError, match="not all normal"):
    sc.shift_multiply(jnp.ones(3, jnp.float16), jnp.zeros(3, jnp.uint8),
                      sc.CodeFormat(3, e0=-20))
  with pytest.raises(ValueError, match="integer"):
    sc.shift_multiply(jnp.ones(3), jnp.zeros(3, jnp.float32), sc.CodeFormat(3))
