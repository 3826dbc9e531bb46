"""Tests of shiftjax.batch_norm: flax's BatchNorm with a hand-written training gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import batch_norm as bn

EPS = 1e-5
SHAPES = {"nhwc": (6, 5, 4, 8), "nc": (32, 5)}


def _data(shape, seed=0, offset=3.0):
  """x with per-channel means of a few stds (the cancellation case), g, scale, bias."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = offset * rng.standard_normal(c) + rng.uniform(0.5, 2.0, c) * rng.standard_normal(shape)
  g = rng.standard_normal(shape)
  scale, bias = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
  return tuple(jnp.asarray(a, jnp.float32) for a in (x, g, scale, bias))


def _modules(train=True, momentum=0.9):
  kwargs = dict(use_running_average=not train, momentum=momentum, epsilon=EPS)
  return bn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)


def _assert_close(got, want, rtol=1e-5):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_variables_are_flax_batch_norm_variables():
  x = _data(SHAPES["nhwc"])[0]
  ours, flax_bn = _modules()
  v_ours = ours.init(jax.random.key(0), x)
  v_flax = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_flax)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


@pytest.mark.parametrize("name", list(SHAPES))
def test_training_forward_and_running_stats_equal_flax(name):
  x, _, scale, bias = _data(SHAPES[name])
  ours, flax_bn = _modules()
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.full_like(scale, 0.5), "var": jnp.full_like(scale, 2.0)}}
  y_ours, s_ours = ours.apply(variables, x, mutable=["batch_stats"])
  y_flax, s_flax = flax_bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y_ours, y_flax)
  for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_flax)):
    np.testing.assert_array_equal(a, b)
  # the update itself: 0.9 * running + 0.1 * batch (biased variance)
  x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  np.testing.assert_allclose(s_ours["batch_stats"]["mean"], 0.45 + 0.1 * x64.mean(0), rtol=1e-5)
  np.testing.assert_allclose(s_ours["batch_stats"]["var"], 1.8 + 0.1 * x64.var(0), rtol=1e-5)


def test_eval_mode_equals_flax():
  x, _, scale, bias = _data(SHAPES["nhwc"])
  ours, flax_bn = _modules(train=False)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": scale - 1, "var": scale * 2}}
  np.testing.assert_array_equal(ours.apply(variables, x), flax_bn.apply(variables, x))


def _hand_gradient(x, g, scale):
  """dx, dscale, dbias of BatchNorm in float64 from the textbook formula (centered sums)."""
  x, g, scale = (np.asarray(a, np.float64) for a in (x, g, scale))
  c = x.shape[-1]
  x, g = x.reshape(-1, c), g.reshape(-1, c)
  m = x.shape[0]
  inv = 1 / np.sqrt(x.var(0) + EPS)
  xhat = (x - x.mean(0)) * inv
  dbias = g.sum(0)
  dscale = (g * xhat).sum(0)
  dx = scale * inv / m * (m * g - dbias - xhat * dscale)
  return dx, dscale, dbias


@pytest.mark.parametrize("name", list(SHAPES))
def test_gradient_equals_hand_formula_and_flax_autodiff(name):
  x, g, scale, bias = _data(SHAPES[name])

  def grads(module):
    def f(x, scale, bias):
      variables = {"params": {"scale": scale, "bias": bias},
                   "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
      return module.apply(variables, x, mutable=["batch_stats"])[0]
    _, vjp = jax.vjp(f, x, scale, bias)
    return jax.jit(vjp)(g)

  ours, flax_bn = _modules()
  got, flax_grads = grads(ours), grads(flax_bn)
  want = _hand_gradient(x, g, scale)
  for a, b, w in zip(got, flax_grads, want):
    _assert_close(a, b)
    _assert_close(np.asarray(a, np.float64).reshape(w.shape), w, 1e-4)


def test_bfloat16_input():
  x, g, scale, bias = _data(SHAPES["nhwc"])
  x16 = x.astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, s, b: bn.normalize(x, s, b, EPS), x16, scale, bias)
  assert y.dtype == jnp.float32
  dx, dscale, dbias = vjp(g)
  assert (dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  want = _hand_gradient(x16.astype(jnp.float32), g, scale)
  _assert_close(dscale, want[1].astype(np.float32), 1e-4)
  _assert_close(dx.astype(jnp.float32), want[0].reshape(x.shape).astype(np.float32), 2e-2)


def test_model_fast_path_equals_plain_path():
  """A ResNet with fast_grad (our convs and BatchNorm) against flax/XLA: same params, same
  loss, updated batch_stats equal to 1e-5 and gradients to 1e-4 of each leaf's largest
  entry."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 12, 12, 3)), jnp.float32)
  fast, plain = (sj.models.resnet20(num_classes=10, quantizer=sj.DenseShift(bits=3),
                                    fast_grad=flag) for flag in (True, False))
  variables = plain.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(fast.init(jax.random.key(0), x, train=False)) == \
      jax.tree.structure(variables)

  def loss_and_grads(model):
    def loss(params):
      out, state = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(out * jnp.arange(10.0)), state
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (l_fast, s_fast), g_fast = loss_and_grads(fast)
  (l_plain, s_plain), g_plain = loss_and_grads(plain)
  np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5)
  # On CPU the fast path's convs are the native kernels, not XLA's: the forward differs in
  # rounding, layer after layer, so statistics agree to 1e-5 of each leaf's largest entry.
  for a, b in zip(jax.tree.leaves(s_fast), jax.tree.leaves(s_plain)):
    _assert_close(a, b, 1e-5)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
    _assert_close(a, b, 1e-4)
