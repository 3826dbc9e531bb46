"""Tests of shiftjax.activations: exact levels, straight-through gradients, specs, JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shiftjax import activations as act

ALPHAS = (1.5, 0.7)  # dyadic and not


def pact_params(alpha):
  return {"clip": jnp.asarray(alpha, jnp.float32)}


def pact_numpy(x, alpha, bits, signed):
  """Hand formula in float32, in the module's op order."""
  alpha = np.float32(alpha)
  n = np.float32(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
  lo = -alpha if signed else np.float32(0)
  step, inv_step = alpha / n, n / alpha
  return np.round(np.clip(x, lo, alpha) * inv_step) * step


def dense_grid(levels):
  return np.concatenate([np.linspace(-3, 3, 20001, dtype=np.float32), levels])


# ---------------------------------------------------------------------------------------
# PACT values.


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_pact_values_are_exactly_the_levels(bits, alpha, signed):
  spec = act.PACT(bits=bits, signed=signed)
  params = pact_params(alpha)
  levels = spec.levels(params)
  assert levels.dtype == np.float32
  assert np.all(np.diff(levels) > 0)
  assert len(levels) == (2 ** bits - 1 if signed else 2 ** bits)
  x = dense_grid(levels)
  q = np.asarray(spec.quantize(params, jnp.asarray(x)))
  assert q.shape == x.shape and q.dtype == np.float32
  np.testing.assert_array_equal(q, pact_numpy(x, alpha, bits, signed))
  assert np.all(np.isin(q, levels))
  assert np.array_equal(np.unique(q), levels)  # every level is hit
  lo = -np.float32(alpha) if signed else np.float32(0)
  # For these alphas n * (alpha / n) rounds back to alpha, so the ends are exact.
  assert levels[-1] == np.float32(alpha) and levels[0] == lo
  assert np.all(q[x >= alpha] == np.float32(alpha))
  assert np.all(q[x <= lo] == lo)
  # Each level quantizes to itself.
  np.testing.assert_array_equal(np.asarray(spec.quantize(params, jnp.asarray(levels))),
                                levels)


def test_pact_top_level_is_n_times_step_within_one_ulp_of_alpha():
  # 63.6998 / 7 * 7 != 63.6998 in float32: values above alpha map to the top level.
  spec, alpha = act.PACT(bits=3), np.float32(63.6998)
  step = alpha / np.float32(7)
  top = np.float32(7) * step
  assert top != alpha and abs(top - alpha) <= np.spacing(alpha)
  q = spec.quantize(pact_params(alpha), jnp.asarray([100.0, alpha], jnp.float32))
  np.testing.assert_array_equal(np.asarray(q), [top, top])
  assert spec.levels(pact_params(alpha))[-1] == top


@pytest.mark.parametrize("signed", [False, True])
def test_pact_is_bit_identical_eager_jit_vmap_and_constant(signed):
  # Training (jit, traced clip) and deployment (maybe eager, maybe a closed-over constant
  # clip, maybe batched) must agree bit for bit, also at exact ties such as 0.35 = 1.5
  # steps of 0.7 / 3, where an ulp in ``y / step`` decides the level.
  spec = act.PACT(bits=3, signed=signed)
  alpha = np.float32(0.7)
  levels = spec.levels(pact_params(alpha))
  ties = (levels[:-1] + levels[1:]) / 2
  x = np.concatenate([ties, np.float32([0.35, -0.35]), levels,
                      np.random.default_rng(0).uniform(-1, 1, 320).astype(np.float32)])[:320]
  want = pact_numpy(x, alpha, 3, signed)
  xj, params = jnp.asarray(x), pact_params(alpha)
  outs = {
      "eager": spec.quantize(params, xj),
      "eager_scalar": jnp.concatenate([spec.quantize(params, xj[i:i + 1])
                                       for i in range(40)]),
      "jit": jax.jit(spec.quantize)(params, xj),
      "jit_constant_clip": jax.jit(lambda x: spec.quantize(pact_params(alpha), x))(xj),
      "vmap_x": jax.vmap(spec.quantize, in_axes=(None, 0))(params, xj.reshape(-1, 8)),
      "vmap_clip": jax.vmap(lambda c: spec.quantize({"clip": c}, xj))(
          jnp.full((3,), alpha))[1],
      "grad_primal": jax.jvp(lambda x: spec.quantize(params, x), (xj,), (xj,))[0],
  }
  for name, q in outs.items():
    q = np.asarray(q).reshape(-1)
    np.testing.assert_array_equal(q, want[:len(q)], err_msg=name)


def test_pact_keeps_dtype_and_shape():
  spec = act.PACT(bits=4)
  x = jnp.linspace(-1, 8, 24, dtype=jnp.bfloat16).reshape(2, 3, 4)
  q = spec.quantize(spec.init(), x)
  assert q.shape == x.shape and q.dtype == jnp.bfloat16
  assert spec.init(jnp.bfloat16)["clip"].dtype == jnp.bfloat16
  assert spec.param_shapes() == {"clip": ()}
  assert float(spec.init()["clip"]) == 6.0


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(),
       alpha=st.floats(float(np.float32(0.01)), 100, width=32),
       seed=st.integers(0, 2 ** 31 - 1))
def test_pact_property(bits, signed, alpha, seed):
  spec = act.PACT(bits=bits, signed=signed)
  params = pact_params(alpha)
  alpha = np.float32(alpha)
  x = np.random.default_rng(seed).normal(0, 2 * alpha, 64).astype(np.float32)
  q = np.asarray(spec.quantize(params, jnp.asarray(x)))
  lo = -alpha if signed else np.float32(0)
  ulp = np.spacing(alpha)
  # The top level n * (alpha / n) may be one ulp off alpha.
  assert np.all(q >= lo - ulp) and np.all(q <= alpha + ulp)
  step = alpha / np.float32(spec.n)
  assert np.all(np.abs(q - np.clip(x, lo, alpha)) <= step / 2 + 4 * ulp)
  k = q / step
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)
  assert np.all(np.isin(q, spec.levels(params)))


# ---------------------------------------------------------------------------------------
# PACT gradients.


def pact_case(signed, alpha, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2 * alpha, 2 * alpha, 200).astype(np.float32)
  x[:6] = [0.0, alpha, -alpha, 2 * alpha, -2 * alpha, 0.5 * alpha]  # boundaries included
  w = rng.normal(size=x.shape).astype(np.float32)
  lo = -np.float32(alpha) if signed else np.float32(0)
  in_range = ((x >= lo) & (x <= np.float32(alpha))).astype(np.float32)
  dalpha = np.sum(w * (x > np.float32(alpha)))
  if signed:
    dalpha -= np.sum(w * (x < -np.float32(alpha)))
  return jnp.asarray(x), jnp.asarray(w), w * in_range, dalpha


@pytest.mark.parametrize("transform", ["plain", "jit"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_pact_gradients_match_hand_formulas(alpha, signed, transform):
  spec = act.PACT(bits=3, signed=signed)
  x, w, want_dx, want_dalpha = pact_case(signed, alpha)

  def loss(clip, x):
    return jnp.sum(w * spec.quantize({"clip": clip}, x))

  grad = jax.grad(loss, argnums=(0, 1))
  if transform == "jit":
    grad = jax.jit(grad)
  dalpha, dx = grad(jnp.float32(alpha), x)
  np.testing.assert_array_equal(np.asarray(dx), want_dx)
  np.testing.assert_allclose(float(dalpha), want_dalpha, rtol=1e-5, atol=1e-5)
  assert dalpha.shape == ()

  # Forward mode: the directional derivative along (talpha, tx).
  tx = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  f = lambda clip, x: spec.quantize({"clip": clip}, x)
  if transform == "jit":
    f = jax.jit(f)
  out, tangent = jax.jvp(f, (jnp.float32(alpha), x), (jnp.float32(0.5), tx))
  np.testing.assert_array_equal(np.asarray(out), pact_numpy(np.asarray(x), alpha, 3, signed))
  sign = (np.asarray(x) > alpha).astype(np.float32)
  if signed:
    sign -= (np.asarray(x) < -alpha)
  in_range = np.asarray(want_dx) / np.asarray(w)
  np.testing.assert_allclose(np.asarray(tangent), np.asarray(tx) * in_range + 0.5 * sign,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients_under_vmap(signed):
  spec = act.PACT(bits=4, signed=signed)
  alphas = np.asarray(ALPHAS, np.float32)
  cases = [pact_case(signed, a, seed=i) for i, a in enumerate(alphas)]
  xs = jnp.stack([c[0] for c in cases])
  ws = jnp.stack([c[1] for c in cases])

  def loss(clip, x, w):
    return jnp.sum(w * spec.quantize({"clip": clip}, x))

  dalpha, dx = jax.vmap(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(alphas), xs, ws)
  for i, (_, _, want_dx, want_dalpha) in enumerate(cases):
    np.testing.assert_array_equal(np.asarray(dx[i]), want_dx)
    np.testing.assert_allclose(float(dalpha[i]), want_dalpha, rtol=1e-5, atol=1e-5)
  q = jax.vmap(lambda c, x: spec.quantize({"clip": c}, x))(jnp.asarray(alphas), xs)
  for i, a in enumerate(alphas):
    np.testing.assert_array_equal(np.asarray(q[i]),
                                  pact_numpy(np.asarray(xs[i]), a, 4, signed))


def test_pact_rejects_non_scalar_clip_and_integer_x():
  spec = act.PACT()
  with pytest.raises(ValueError, match="scalar"):
    spec.quantize({"clip": jnp.ones((3,))}, jnp.ones((3,)))
  with pytest.raises(ValueError, match="floating"):
    spec.quantize(spec.init(), jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="clip > 0"):
    spec.levels({"clip": jnp.float32(0)})


# ---------------------------------------------------------------------------------------
# FixedPoint.


def fixed_numpy(x, integer_bits, fraction_bits):
  delta = np.float32(2.0 ** -fraction_bits)
  bound = np.float32(2.0 ** (integer_bits - 1))
  return np.clip(np.floor(x / delta) * delta, -bound, bound - 1)


def test_fixed_point_hand_example():
  spec = act.FixedPoint(integer_bits=3, fraction_bits=2)
  assert spec.bits == 5
  q = spec.quantize({}, jnp.asarray([1.3, -1.3, 10.0, -10.0, 2.9, 3.2, 0.0, -0.1]))
  np.testing.assert_array_equal(np.asarray(q), [1.25, -1.5, 3.0, -4.0, 2.75, 3.0, 0.0, -0.25])


@pytest.mark.parametrize("integer_bits,fraction_bits", [(3, 2), (2, 0), (16, 16), (8, 4)])
def test_fixed_point_matches_reference_formula(integer_bits, fraction_bits):
  spec = act.FixedPoint(integer_bits, fraction_bits)
  bound = 2.0 ** (integer_bits - 1)
  x = np.random.default_rng(0).uniform(-2 * bound, 2 * bound, 5000).astype(np.float32)
  q = np.asarray(jax.jit(lambda x: spec.quantize({}, x))(jnp.asarray(x)))
  np.testing.assert_array_equal(q, fixed_numpy(x, integer_bits, fraction_bits))
  assert np.any(x > bound) and np.any(x < -bound)  # the clamp was exercised
  assert q.max() == bound - 1 and q.min() == -bound


def test_fixed_point_levels_are_what_quantize_outputs():
  spec = act.FixedPoint(integer_bits=3, fraction_bits=2)
  levels = spec.levels({})
  # k from -4 / 0.25 = -16 to 3 / 0.25 = 12.
  assert len(levels) == 29 and levels[0] == -4.0 and levels[-1] == 3.0
  x = np.linspace(-6, 6, 20001, dtype=np.float32)
  q = np.asarray(spec.quantize({}, jnp.asarray(x)))
  np.testing.assert_array_equal(np.unique(q), levels)
  with pytest.raises(ValueError, match=str(65535 * 2 ** 16 + 1)):
    act.FixedPoint().levels({})


def test_fixed_point_gradient_is_identity_everywhere():
  spec = act.FixedPoint(integer_bits=3, fraction_bits=2)
  x = jnp.asarray([-100.0, -4.0, -1.3, 0.0, 1.3, 3.0, 3.5, 100.0])
  g = jax.grad(lambda x: jnp.sum(spec.quantize({}, x)))(x)
  np.testing.assert_array_equal(np.asarray(g), np.ones(8))
  w = jnp.arange(8.0)
  g = jax.jit(jax.grad(lambda x: jnp.sum(w * spec.quantize({}, x))))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  _, t = jax.jvp(lambda x: spec.quantize({}, x), (x,), (w,))
  np.testing.assert_array_equal(np.asarray(t), np.asarray(w))
  assert spec.param_shapes() == {} and spec.init() == {}


# ---------------------------------------------------------------------------------------
# Validation, registry, JSON, hashing.


@pytest.mark.parametrize("kwargs,needle", [
    (dict(bits=1), "bits in 2..8, got 1"),
    (dict(bits=9), "bits in 2..8, got 9"),
    (dict(bits=3.0), "bits in 2..8, got 3.0"),
    (dict(bits=True), "bits in 2..8, got True"),
    (dict(init_clip=0), "> 0, got 0"),
    (dict(init_clip=-1), "> 0, got -1"),
    (dict(init_clip=math.nan), "> 0, got nan"),
    (dict(init_clip=math.inf), "> 0, got inf"),
    (dict(signed=1), "True or False, got 1"),
])
def test_pact_validation(kwargs, needle):
  with pytest.raises(ValueError, match="PACT") as e:
    act.PACT(**kwargs)
  assert needle in str(e.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(integer_bits=1), "integer_bits in 2..32, got 1"),
    (dict(integer_bits=33), "integer_bits in 2..32, got 33"),
    (dict(fraction_bits=-1), "fraction_bits in 0..32, got -1"),
    (dict(fraction_bits=33), "fraction_bits in 0..32, got 33"),
    (dict(fraction_bits=2.0), "fraction_bits in 0..32, got 2.0"),
])
def test_fixed_point_validation(kwargs, needle):
  with pytest.raises(ValueError, match="FixedPoint") as e:
    act.FixedPoint(**kwargs)
  assert needle in str(e.value)


def test_get():
  for name in ("float", "None", "", "FLOAT"):
    assert act.get(name) is None
  assert act.get("pact", bits=8) == act.PACT(bits=8)
  assert act.get("FIXEDPOINT", integer_bits=4) == act.FixedPoint(integer_bits=4)
  with pytest.raises(ValueError) as e:
    act.get("lsq")
  for allowed in ("'lsq'", "float", "PACT", "FixedPoint"):
    assert allowed in str(e.value)
  with pytest.raises(ValueError, match="got 9"):
    act.get("pact", bits=9)


SPECS = [act.PACT(), act.PACT(bits=2, init_clip=0.7, signed=True), act.PACT(init_clip=6),
         act.FixedPoint(), act.FixedPoint(3, 2), None]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_json_round_trip(spec):
  obj = act.to_json(spec)
  back = act.from_json(json.loads(json.dumps(obj)))
  assert back == spec and repr(back) == repr(spec)
  if spec is not None:
    assert obj["name"] == spec.name
    assert json.loads(json.dumps(obj)) == obj  # types survive JSON unchanged


def test_json_field_types():
  obj = act.to_json(act.PACT(bits=np.int64(3), init_clip=6))
  assert obj == {"name": "PACT", "fields": {"bits": 3, "init_clip": 6.0, "signed": False}}
  assert type(obj["fields"]["bits"]) is int and type(obj["fields"]["init_clip"]) is float


@pytest.mark.parametrize("obj,needle", [
    ({"name": "LSQ", "fields": {}}, "unknown activation quantizer 'LSQ'"),
    ({"name": "PACT", "fields": {"bitz": 3}}, "bitz"),
    ({"name": "PACT"}, "missing ['fields']"),
    ({"name": "PACT", "fields": {}, "repr": "x"}, "extra ['repr']"),
    ({"name": "PACT", "fields": {"bits": 9}}, "bits in 2..8, got 9"),
    ({"name": "PACT", "fields": {"bits": True}}, "got True"),
    ({"name": "PACT", "fields": [3]}, "fields must be an object"),
    ({"name": 3, "fields": {}}, "unknown activation quantizer 3"),
    ({"name": "FixedPoint", "fields": {"integer_bits": 1}}, "integer_bits in 2..32"),
    ("PACT", "object"),
])
def test_from_json_rejects_malformed(obj, needle):
  with pytest.raises(ValueError) as e:
    act.from_json(obj)
  assert needle in str(e.value)


def test_to_json_rejects_non_specs():
  with pytest.raises(ValueError, match="not an activation quantizer"):
    act.to_json("PACT")


def test_specs_are_hashable_static_jit_args():
  a, b = act.PACT(bits=3), act.PACT(bits=3)
  assert a == b and hash(a) == hash(b) and len({a, b, act.PACT(bits=4)}) == 2
  assert hash(act.FixedPoint(3, 2)) == hash(act.FixedPoint(3, 2))
  traces = []

  def f(spec, params, x):
    traces.append(spec)
    return spec.quantize(params, x)

  jf = jax.jit(f, static_argnums=0)
  x = jnp.linspace(-1.0, 8.0, 11)
  q3 = jf(a, a.init(), x)
  jf(b, b.init(), x)  # equal spec: cache hit, no retrace
  assert len(traces) == 1
  q4 = jf(act.PACT(bits=4), a.init(), x)
  assert len(traces) == 2 and not np.array_equal(np.asarray(q3), np.asarray(q4))
  np.testing.assert_array_equal(np.asarray(q3), np.asarray(a.quantize(a.init(), x)))
  np.testing.assert_array_equal(np.asarray(jf(act.FixedPoint(3, 2), {}, x)),
                                fixed_numpy(np.asarray(x), 3, 2))
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.bits = 5
