"""Quantizers: value sets, exact codes, and gradients written out from PAPERS.md."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import codes as codes_lib
from shiftjax import quantizers as qz

LN2 = math.log(2.0)

ALL_SPECS = (
    [sj.DenseShift(bits=b) for b in range(2, 6)]
    + [sj.DenseShift(bits=b, encoding="binary") for b in range(2, 6)]
    + [sj.DenseShift(bits=3, surrogate="exact"), sj.DenseShift(bits=3, init_method="he")]
    + [sj.S3(bits=b) for b in range(2, 6)] + [sj.S3(bits=3, init_method="dense")]
    + [sj.DeepShiftQ(bits=b) for b in range(2, 8)] + [sj.DeepShiftQ(bits=8, e0=1)]
    + [sj.DeepShiftPS(bits=b) for b in range(2, 9)]
    + [sj.DenseShift(bits=3, e0=-4), sj.S3(bits=4, e0=2), sj.DeepShiftQ(bits=5, e0=3),
       sj.DeepShiftPS(bits=4, e0=-1)]
)


def spec_id(q):
  return repr(q)


def bits_of(x):
  """Raw bit pattern, so that -0.0 and +0.0 differ."""
  return np.asarray(jax.lax.bitcast_convert_type(
      x, jnp.uint32 if x.dtype == jnp.float32 else jnp.uint16))


# --------------------------------------------------------------------------- value sets


def binary_pattern_latents(q, dtype=jnp.float32):
  """Latents that enumerate every binarized pattern (each latent +-0.5) in one tensor."""
  if isinstance(q, sj.DenseShift):
    n = 1 + q.num_exponent_latents
  elif isinstance(q, sj.S3):
    n = 2 + q.num_shift_latents
  else:
    raise TypeError(q)
  patterns = np.array(list(itertools.product([-0.5, 0.5], repeat=n)), np.float32).T
  patterns = jnp.asarray(patterns.reshape(n, -1, 1), dtype)  # each latent: [2**n, 1]
  if isinstance(q, sj.DenseShift):
    return {"sign": patterns[0], "exponent": patterns[1:]}
  latents = {"sign": patterns[0], "sparse": patterns[1]}
  if q.num_shift_latents:
    latents["shift"] = patterns[2:]
  return latents


@pytest.mark.parametrize("q", [s for s in ALL_SPECS if isinstance(s, (sj.DenseShift, sj.S3))],
                         ids=spec_id)
def test_every_binarized_pattern_gives_exactly_the_value_set(q):
  w = q.weight(binary_pattern_latents(q))
  np.testing.assert_array_equal(np.unique(np.asarray(w)), q.values())


def test_reference_value_sets_at_3_bits():
  np.testing.assert_array_equal(sj.S3(bits=3).values(), [-4, -2, -1, 0, 1, 2, 4])
  np.testing.assert_array_equal(sj.DenseShift(bits=3).values(), [-8, -4, -2, -1, 1, 2, 4, 8])
  np.testing.assert_array_equal(
      sj.DenseShift(bits=3, e0=-1).values(), [-4, -2, -1, -0.5, 0.5, 1, 2, 4])
  assert len(sj.DenseShift(bits=5).values()) == 32  # zero-free: all 2**N codes
  assert len(sj.S3(bits=5).values()) == 31  # one code reserved for zero


@pytest.mark.parametrize("bits", range(2, 9))
def test_deepshift_value_sets_follow_its_shift_ranges(bits):
  q = sj.DeepShiftQ(bits=bits, e0=1 if bits == 8 else 0)
  p_min = -(2 ** (bits - 1) - 1)
  assert q.p_min == p_min
  # Latents on and between every power of two, beyond both ends, both signs.
  mags = 2.0 ** np.linspace(p_min - 3, 4, 8 * (4 - p_min + 3))
  lat = {"weight": jnp.asarray(np.concatenate([mags, -mags]), jnp.float32)}
  np.testing.assert_array_equal(np.unique(np.asarray(q.weight(lat))), q.values())
  expected = 2.0 ** (q.e0 + np.arange(p_min, 1))
  np.testing.assert_array_equal(q.values(), np.sort(np.concatenate([-expected, expected])))

  ps = sj.DeepShiftPS(bits=bits)
  assert ps.p_min == -(2 ** (bits - 1) - 2)
  shift, sign = np.meshgrid(np.arange(ps.p_min - 3, 3, 0.5), np.linspace(-2, 2, 9))
  lat = {"shift": jnp.asarray(shift, jnp.float32), "sign": jnp.asarray(sign, jnp.float32)}
  np.testing.assert_array_equal(np.unique(np.asarray(ps.weight(lat))), ps.values())


def test_deepshift_ps_5_bit_range_is_minus_14_to_0():
  ps = sj.DeepShiftPS(bits=5)
  positive = ps.values()[ps.values() > 0]
  np.testing.assert_array_equal(np.log2(positive), np.arange(-14, 1))


# -------------------------------------------------------------------------- exact codes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("q", ALL_SPECS, ids=spec_id)
def test_decode_of_codes_reproduces_weight_bit_for_bit(q, dtype):
  latents = q.init(jax.random.key(1), (3, 3, 4, 8), dtype)
  # Spread the latents so every code occurs (low-variance init sits near thresholds).
  latents = jax.tree.map(
      lambda x: x / jnp.maximum(jnp.std(x.astype(jnp.float32)), 1e-6).astype(dtype), latents)
  if isinstance(q, sj.DeepShiftQ):
    latents = {"weight": latents["weight"] * jnp.asarray(2.0 ** (q.e0 - 3), dtype)}
  if isinstance(q, sj.DeepShiftPS):
    latents = {"shift": latents["shift"] * 3 + q.p_min / 2, "sign": latents["sign"]}
  w = q.weight(latents)
  c = q.codes(latents)
  assert c.dtype == jnp.uint8 and c.shape == w.shape
  assert int(c.max()) < 2 ** q.bits
  assert w.dtype == dtype
  np.testing.assert_array_equal(bits_of(codes_lib.decode(c, q.code_format, dtype)), bits_of(w))


def test_code_layout_is_sign_bit_then_exponent_index():
  q = sj.DenseShift(bits=3)
  lat = {"sign": jnp.array([1.0, -1.0, -1.0]),
         "exponent": jnp.array([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])}
  # Columns are weights; S = trailing ones of (b1, b2, b3): (1,1,1)->3, (1,0,1)->1,
  # (0,1,1)->2; code = sign << 2 | S.
  np.testing.assert_array_equal(q.codes(lat), [3, 5, 6])
  np.testing.assert_array_equal(q.weight(lat), [8.0, -2.0, -4.0])
  s3 = sj.S3(bits=3)
  lat = {"sign": jnp.array([1.0, -1.0, -1.0]), "sparse": jnp.array([1.0, 1.0, -1.0]),
         "shift": jnp.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])}
  np.testing.assert_array_equal(s3.codes(lat), [2, 5, 7])  # +4, -2, zero
  np.testing.assert_array_equal(bits_of(s3.weight(lat)), bits_of(jnp.array([4.0, -2.0, 0.0])))


# ------------------------------------------------------------------------------ gradients


def random_latents(q, shape, seed=0):
  """Latents far enough from thresholds that a tiny perturbation keeps the pattern."""
  latents = q.init(jax.random.key(seed), shape)
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(np.where(rng.random(v.shape) < 0.5, -1.0, 1.0)
                         * (0.1 + rng.random(v.shape)), jnp.float32)
          for k, v in latents.items()}


def grads(q, latents, cotangent):
  return jax.grad(lambda lat: jnp.sum(q.weight(lat) * cotangent))(latents)


def step(x):
  return (np.asarray(x) > 0).astype(np.float64)


def sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def chain_exponent_derivative(b, k):
  """dS_K/db_k for S_K = sum_{m=1..K} prod_{j=m..K} b_j (the unrolled recursion)."""
  K = b.shape[0]
  total = np.zeros(b.shape[1:])
  for m in range(k + 1):
    term = np.ones(b.shape[1:])
    for j in range(m, K):
      if j != k:
        term = term * b[j]
    total += term
  return total


def chain_exponent_value(b):
  return sum(np.prod(b[m:], axis=0) for m in range(b.shape[0]))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("surrogate", ["sqrt", "exact"])
@pytest.mark.parametrize("e0", [0, -2])
def test_denseshift_chain_gradients_match_paper_formulas(bits, surrogate, e0):
  q = sj.DenseShift(bits=bits, surrogate=surrogate, e0=e0)
  lat = random_latents(q, (3, 3, 4, 5))
  g = np.asarray(jax.random.normal(jax.random.key(7), (3, 3, 4, 5)))
  got = grads(q, lat, jnp.asarray(g))
  b = step(lat["exponent"])
  s = chain_exponent_value(b)
  B = sign(lat["sign"])
  if surrogate == "sqrt":
    # W_bw = B * sqrt(S + 1) * 2**e0.
    d_sign = np.sqrt(s + 1) * 2.0 ** e0
    d_s = B / (2 * np.sqrt(s + 1)) * 2.0 ** e0
  else:
    d_sign = 2.0 ** (s + e0)
    d_s = B * 2.0 ** (s + e0) * LN2
  np.testing.assert_allclose(got["sign"], g * d_sign, rtol=1e-6)
  for k in range(q.num_exponent_latents):
    np.testing.assert_allclose(got["exponent"][k], g * d_s * chain_exponent_derivative(b, k),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_denseshift_binary_encoding_gradients(bits):
  q = sj.DenseShift(bits=bits, encoding="binary")
  lat = random_latents(q, (6, 7))
  g = np.asarray(jax.random.normal(jax.random.key(3), (6, 7)))
  got = grads(q, lat, jnp.asarray(g))
  b = step(lat["exponent"])
  s = sum(2.0 ** i * b[i] for i in range(bits - 1))
  B = sign(lat["sign"])
  np.testing.assert_allclose(np.asarray(q.weight(lat)), B * 2.0 ** s)
  np.testing.assert_allclose(got["sign"], g * np.sqrt(s + 1), rtol=1e-6)
  for i in range(bits - 1):
    np.testing.assert_allclose(got["exponent"][i], g * B / (2 * np.sqrt(s + 1)) * 2.0 ** i,
                               rtol=1e-6)


def test_s3_3bit_gradients_match_reference_formulas():
  q = sj.S3(bits=3)
  lat = random_latents(q, (3, 3, 8, 4))
  g = np.asarray(jax.random.normal(jax.random.key(5), (3, 3, 8, 4)))
  got = grads(q, lat, jnp.asarray(g))
  s1, s2 = step(lat["shift"][1]), step(lat["shift"][0])  # reference W_s1, W_s2
  p = s1 * (s2 + 1)
  B, nz = sign(lat["sign"]), step(lat["sparse"])
  ternary = B * nz
  np.testing.assert_array_equal(np.asarray(q.weight(lat)), ternary * 2.0 ** p)
  np.testing.assert_allclose(got["sign"], g * nz * 2.0 ** p, rtol=1e-6)
  np.testing.assert_allclose(got["sparse"], g * B * 2.0 ** p, rtol=1e-6)
  np.testing.assert_allclose(got["shift"][1], g * ternary * 2.0 ** p * LN2 * (s2 + 1),
                             rtol=1e-6)
  np.testing.assert_allclose(got["shift"][0], g * ternary * 2.0 ** p * LN2 * s1, rtol=1e-6)
  pruned = nz == 0
  assert pruned.any() and (~pruned).any()
  # Pruned weights: no gradient to sign and shift, but the sparse latent still learns.
  assert np.all(np.asarray(got["sign"])[pruned] == 0)
  assert np.all(np.asarray(got["shift"])[:, pruned] == 0)
  assert np.all(np.asarray(got["sparse"])[pruned] != 0)


@pytest.mark.parametrize("bits", [2, 4, 5])
def test_s3_general_bits_gradients(bits):
  q = sj.S3(bits=bits, e0=1)
  lat = random_latents(q, (5, 6))
  g = np.asarray(jax.random.normal(jax.random.key(9), (5, 6)))
  got = grads(q, lat, jnp.asarray(g))
  if bits == 2:  # ternary: no shift latents at all
    assert set(lat) == set(got) == {"sign", "sparse"}
  b = step(lat["shift"]) if bits > 2 else np.zeros((0, 5, 6))
  p = chain_exponent_value(b) if b.shape[0] else np.zeros((5, 6))
  B, nz = sign(lat["sign"]), step(lat["sparse"])
  scale = 2.0 ** (p + 1)
  np.testing.assert_allclose(got["sign"], g * nz * scale, rtol=1e-6)
  np.testing.assert_allclose(got["sparse"], g * B * scale, rtol=1e-6)
  for k in range(q.num_shift_latents):
    np.testing.assert_allclose(
        got["shift"][k], g * B * nz * scale * LN2 * chain_exponent_derivative(b, k),
        rtol=1e-6, atol=1e-7)


def test_deepshift_gradients():
  q = sj.DeepShiftQ(bits=5)
  lat = {"weight": jax.random.normal(jax.random.key(0), (4, 5))}
  g = jax.random.normal(jax.random.key(1), (4, 5))
  np.testing.assert_array_equal(grads(q, lat, g)["weight"], g)  # straight through

  ps = sj.DeepShiftPS(bits=5)
  lat = ps.init(jax.random.key(2), (4, 5))
  got = grads(ps, lat, g)
  w = np.asarray(ps.weight(lat))
  np.testing.assert_allclose(got["shift"], np.asarray(g) * w * LN2, rtol=1e-6)
  np.testing.assert_array_equal(got["sign"], g)


def test_deepshift_stochastic_rounding_is_unbiased_in_the_exponent():
  q = sj.DeepShiftQ(bits=5, rounding="stochastic")
  lat = {"weight": jnp.full((20000,), 2.0 ** -2.25)}
  w = q.weight(lat, rng=jax.random.key(0))
  assert set(np.unique(np.asarray(w))) == {0.125, 0.25}
  assert abs(float(jnp.mean(w == 0.25)) - 0.75) < 0.02  # P(round up) = fractional part
  np.testing.assert_array_equal(q.weight(lat), 0.25)  # no rng: round to nearest
  ps = sj.DeepShiftPS(bits=5, rounding="stochastic")
  lat = {"shift": jnp.full((20000,), -3.6), "sign": jnp.ones((20000,))}
  w = ps.weight(lat, rng=jax.random.key(1))
  assert abs(float(jnp.mean(w == 0.125)) - 0.4) < 0.02


# ---------------------------------------------------------------- transformations, dtypes


@pytest.mark.parametrize("shape", [(16, 8), (3, 3, 4, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("q", [sj.DenseShift(3), sj.S3(3), sj.DeepShiftQ(5), sj.DeepShiftPS(5)],
                         ids=spec_id)
def test_weight_under_jit_vmap_and_grad(q, shape, dtype):
  lat = q.init(jax.random.key(0), shape, dtype)
  w = q.weight(lat)
  assert w.shape == shape and w.dtype == dtype
  np.testing.assert_array_equal(jax.jit(lambda l: q.weight(l))(lat), w)
  np.testing.assert_array_equal(jax.jit(q.weight)(lat), w)  # the spec is hashable
  stacked = jax.tree.map(lambda x: jnp.stack([x, -x]), lat)
  batched = jax.vmap(q.weight)(stacked)
  np.testing.assert_array_equal(batched[0], w)
  np.testing.assert_array_equal(batched[1], q.weight(jax.tree.map(lambda x: -x, lat)))
  g = jax.jit(jax.grad(lambda l: jnp.sum(q.weight(l).astype(jnp.float32) ** 2)))(lat)
  assert jax.tree.structure(g) == jax.tree.structure(lat)
  for leaf in jax.tree.leaves(g):
    assert leaf.dtype == dtype and bool(jnp.all(jnp.isfinite(leaf)))


# ------------------------------------------------------------------------ inits, regularizer


def test_initializations():
  shape = (3, 3, 64, 128)
  lv = sj.DenseShift(bits=3).init(jax.random.key(0), shape)
  assert lv["exponent"].shape == (3,) + shape
  for leaf in lv.values():
    assert abs(float(jnp.std(leaf)) - 1e-3) < 5e-5
  he = sj.S3(bits=3, init_method="he").init(jax.random.key(0), shape)
  expected = math.sqrt(2 / (3 * 3 * 128))  # He fan-out
  for leaf in he.values():
    assert abs(float(jnp.std(leaf)) / expected - 1) < 0.02
  s3_lv = sj.S3(bits=3).init(jax.random.key(0), shape)  # the default
  assert s3_lv["shift"].shape == (2,) + shape
  for leaf in s3_lv.values():
    assert abs(float(jnp.std(leaf)) - 1e-3) < 5e-5
  dense = sj.S3(bits=3, init_method="dense")
  np.testing.assert_array_equal(jnp.abs(dense.weight(dense.init(jax.random.key(0), shape))), 1)
  ps = sj.DeepShiftPS(bits=5).init(jax.random.key(0), shape)
  assert float(ps["shift"].min()) >= -10 and float(ps["shift"].max()) <= -1
  assert float(jnp.abs(ps["sign"]).max()) <= 1


def test_s3_regularizer_sums_negative_sparse_latents_over_layers():
  layer = {"sign": jnp.array([-5.0]), "sparse": jnp.array([-1.0, 2.0, -0.5]),
           "shift": jnp.array([[-3.0]])}
  assert float(sj.s3_regularizer(layer)) == 1.5
  params = {"block1": {"conv": {"kernel": layer}},
            "block2": {"conv": {"kernel": {"sparse": jnp.array([[-2.0, -0.25]])}}},
            "dense": {"kernel": jnp.array([-100.0])}}
  assert float(sj.s3_regularizer(params)) == 3.75
  g = jax.grad(sj.s3_regularizer)(layer)
  np.testing.assert_array_equal(g["sparse"], [-1.0, 0.0, -1.0])


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, message", [
    (lambda: sj.DenseShift(bits=7), "DenseShift supports bits in 2..5, got 7"),
    (lambda: sj.DenseShift(bits=1), "got 1"),
    (lambda: sj.S3(bits=6), "S3 supports bits in 2..5, got 6"),
    (lambda: sj.DeepShiftQ(bits=9), "DeepShiftQ supports bits in 2..8, got 9"),
    (lambda: sj.DeepShiftPS(bits=3.0), "got 3.0"),
    (lambda: sj.DenseShift(bits=3, encoding="unary"), "encoding must be one of"),
    (lambda: sj.DenseShift(bits=3, surrogate="tanh"), "'tanh'"),
    (lambda: sj.DenseShift(bits=3, init_method="xavier"), "'xavier'"),
    (lambda: sj.S3(bits=3, init_method="xavier"), "('he', 'dense', 'low_variance')"),
    (lambda: sj.DeepShiftQ(rounding="up"), "rounding"),
    (lambda: sj.DenseShift(bits=3, e0=0.5), "e0 must be an integer"),
    (lambda: sj.DeepShiftQ(bits=8), "outside float32's normal range"),
    (lambda: qz.get("ternary"), "unknown quantizer 'ternary'"),
])
def test_invalid_arguments_raise_at_construction(make, message):
  with pytest.raises(ValueError, match=None) as info:
    make()
  assert message in str(info.value)


def test_get_by_name():
  assert qz.get("float") is None
  assert qz.get("densesHIFT".lower(), bits=2) == sj.DenseShift(bits=2)
  assert qz.get("S3", bits=4, init_method="dense") == sj.S3(bits=4, init_method="dense")
