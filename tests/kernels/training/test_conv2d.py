"""Tests of shiftjax.kernels.training.conv: conv2d's fast gradients equal XLA's own (autodiff of lax.conv)."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax.kernels.training import conv as sc

DN = ("NHWC", "HWIO", "NHWC")

# batch, H, W, Ci, Co, kernel (kh, kw), strides, padding
CASES = {
    "3x3_s1_same_8x8": (3, 8, 8, 3, 5, (3, 3), (1, 1), "SAME"),
    "3x3_s1_same_7x7": (2, 7, 7, 4, 6, (3, 3), (1, 1), "SAME"),
    "3x3_s2_same_8x8": (3, 8, 8, 4, 6, (3, 3), (2, 2), "SAME"),
    "3x3_s2_same_7x7": (2, 7, 7, 5, 3, (3, 3), (2, 2), "SAME"),
    "3x3_s1_valid_7x7": (2, 7, 7, 3, 4, (3, 3), (1, 1), "VALID"),
    "3x3_s2_valid_8x8": (2, 8, 8, 3, 4, (3, 3), (2, 2), "VALID"),
    "1x1_s1_valid_7x7": (2, 7, 7, 6, 4, (1, 1), (1, 1), "VALID"),
    "1x1_s2_valid_8x8": (3, 8, 8, 4, 6, (1, 1), (2, 2), "VALID"),
    "1x1_s2_same_7x7": (2, 7, 7, 4, 6, (1, 1), (2, 2), "SAME"),
    "3x3_s1_explicit": (2, 7, 8, 3, 2, (3, 3), (1, 1), ((1, 0), (0, 2))),
    "3x3_s2_explicit": (2, 8, 7, 3, 2, (3, 3), (2, 2), ((0, 1), (2, 1))),
    "3x3_s1_negative_pad": (2, 8, 8, 2, 3, (3, 3), (1, 1), ((-1, 2), (2, -1))),
    "5x3_mixed_strides": (2, 9, 8, 2, 3, (5, 3), (1, 2), "SAME"),
    "2x2_s2_1_valid": (2, 8, 7, 2, 3, (2, 2), (2, 1), "VALID"),
    # 32 KiB per image: the kernel gradient loops over the batch (2 steps of 6 images;
    # a prime batch: 19 steps of 1)
    "loop_12": (12, 16, 16, 32, 8, (3, 3), (1, 1), "SAME"),
    "loop_prime_batch": (19, 16, 16, 32, 8, (3, 3), (2, 2), "SAME"),
}


def _data(case, dtype=jnp.float32, seed=0):
  n, h, w, ci, co, k, s, p = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, ci)), dtype)
  kernel = jnp.asarray(rng.standard_normal((*k, ci, co)) / np.sqrt(k[0] * k[1] * ci), dtype)
  y = lax.conv_general_dilated(x, kernel, s, p, dimension_numbers=DN)
  g = jnp.asarray(rng.standard_normal(y.shape), dtype)
  return x, kernel, g, s, p


def _grads(conv, x, kernel, g):
  """(y, dx, dkernel) of ``conv(x, kernel)`` for cotangent g, compiled."""
  def f(x, kernel, g):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(g))
  return jax.jit(f)(x, kernel, g)


def _plain(s, p):
  return lambda x, k: lax.conv_general_dilated(x, k, s, p, dimension_numbers=DN)


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("name", list(CASES))
def test_fast_grad_equals_xla(name):
  x, kernel, g, s, p = _data(CASES[name])
  y0, dx0, dk0 = _grads(_plain(s, p), x, kernel, g)
  y1, dx1, dk1 = _grads(lambda x, k: sc.conv2d(x, k, s, p, fast_grad=True), x, kernel, g)
  np.testing.assert_array_equal(y1, y0)  # the forward is the same op
  _assert_close(dx1, dx0, 1e-5)
  _assert_close(dk1, dk0, 1e-5)
  assert dx1.dtype == x.dtype and dk1.dtype == kernel.dtype


@pytest.mark.parametrize("name", ["3x3_s2_explicit"])
def test_fast_grad_off_is_plain_conv(name):
  x, kernel, g, s, p = _data(CASES[name])
  want = _grads(_plain(s, p), x, kernel, g)
  got = _grads(lambda x, k: sc.conv2d(x, k, s, p, fast_grad=False), x, kernel, g)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  jaxpr = str(jax.make_jaxpr(lambda x, k: sc.conv2d(x, k, s, p, fast_grad=False))(x, kernel))
  assert "custom_vjp" not in jaxpr


def test_default_is_decided_by_backend():
  x, kernel, _, s, p = _data(CASES["3x3_s1_same_8x8"])
  assert sc.default_fast_grad() == (jax.default_backend() == "cpu")
  jaxpr = str(jax.make_jaxpr(lambda x, k: sc.conv2d(x, k, s, p))(x, kernel))
  assert ("custom_vjp" in jaxpr) == sc.default_fast_grad()


def test_eigen_conv_options_compute_the_same_gradients():
  opts = sc.eigen_conv_options()
  if jax.default_backend() == "cpu":
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  # 32 channels: the convs that YNNPACK would otherwise take.
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
  loss = lambda x, k: jnp.sum(jnp.sin(sc.conv2d(x, k, 1, "SAME")))
  grads = jax.grad(loss, argnums=(0, 1))
  want = jax.jit(grads)(x, kernel)
  got = jax.jit(grads, compiler_options=opts)(x, kernel)
  for a, b in zip(got, want):
    _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("name", ["loop_12"])
def test_bfloat16(name):
  """bf16 gradients are as close to the float32 gradient as XLA's own bf16 gradients."""
  x, kernel, g, s, p = _data(CASES[name], jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  _, dx_ref, dk_ref = _grads(_plain(s, p), f32(x), f32(kernel), f32(g))
  _, dx_xla, dk_xla = _grads(_plain(s, p), x, kernel, g)
  _, dx, dk = _grads(lambda x, k: sc.conv2d(x, k, s, p, fast_grad=True), x, kernel, g)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
  for got, xla, ref in ((dx, dx_xla, dx_ref), (dk, dk_xla, dk_ref)):
    err = np.abs(np.asarray(f32(got)) - np.asarray(ref)).max()
    err_xla = np.abs(np.asarray(f32(xla)) - np.asarray(ref)).max()
    assert err <= max(2 * err_xla, 1e-2 * np.abs(np.asarray(ref)).max())


def test_gradient_inside_scan():
  """Gradient accumulation in lax.scan gives the same sums as one batch."""
  x, kernel, g, s, p = _data(CASES["3x3_s2_same_8x8"])
  loss = lambda k, x, g: jnp.vdot(sc.conv2d(x, k, s, p, fast_grad=True), g)

  @jax.jit
  def accumulated(k, x, g):
    def body(acc, xg):
      return acc + jax.grad(loss)(k, *xg), None
    xs = x.reshape(3, 1, *x.shape[1:])
    gs = g.reshape(3, 1, *g.shape[1:])
    return lax.scan(body, jnp.zeros_like(k), (xs, gs))[0]

  _assert_close(accumulated(kernel, x, g), jax.grad(loss)(kernel, x, g), 1e-5)


def test_loop_steps():
  assert sc._loop_steps(128, 32 * 32 * 16 * 4) == 32  # 4 images of 64 KiB per step
  assert sc._loop_steps(12, 16 * 16 * 32 * 4) == 2
  assert sc._loop_steps(19, 16 * 16 * 32 * 4) == 19  # prime: one image per step
  assert sc._loop_steps(128, 8 * 8 * 64 * 4) == 8
  assert sc._loop_steps(4, 100) == 1


def test_data_parallel_stays_sharded():
  """With the batch sharded over 4 CPU devices, no device gathers x or g (own process)."""
  code = textwrap.dedent("""
      import re, jax, jax.numpy as jnp, numpy as np
      from jax import lax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from shiftjax.kernels.training import conv as sc
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rng = np.random.default_rng(0)
      x = jax.device_put(jnp.asarray(rng.standard_normal((32, 16, 16, 32)), jnp.float32),
                         NamedSharding(mesh, P("data")))
      k = jnp.asarray(rng.standard_normal((3, 3, 32, 8)), jnp.float32) / 50
      grads = {}
      for fast in (False, True):
        loss = lambda k, x: jnp.sum(sc.conv2d(x, k, fast_grad=fast) ** 2)
        c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(k, x).compile()
        assert not re.search(r"all-gather|all-to-all", c.as_text()), fast
        grads[fast] = c(k, x)
      for a, b in zip(grads[True], grads[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
      print("ok")
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_flax_drop_in():
  """nn.Conv(conv_general_dilated=sc.conv_general_dilated) matches nn.Conv."""
  x, _, _, _, _ = _data(CASES["3x3_s2_same_7x7"])
  for kwargs, custom in (({"strides": 2}, True),
                         ({"kernel_dilation": 2}, False)):  # dilation: lax's own conv
    plain = nn.Conv(6, (3, 3), **kwargs)
    fast = nn.Conv(6, (3, 3), conv_general_dilated=sc.conv_general_dilated, **kwargs)
    params = plain.init(jax.random.key(0), x)
    assert ("custom_vjp" in str(jax.make_jaxpr(fast.apply)(params, x))) == custom
    run = lambda m: jax.jit(jax.value_and_grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x)))))
    (l_fast, g_fast), (l_plain, g_plain) = run(fast)(params), run(plain)(params)
    np.testing.assert_array_equal(l_fast, l_plain)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
      _assert_close(a, b, 1e-5)


def test_bad_shapes_raise():
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match="expects 4"):
    sc.conv2d(x, jnp.zeros((3, 3, 4, 5)))
  with pytest.raises(ValueError, match="4-D"):
    sc.conv2d(x[0], jnp.zeros((3, 3, 3, 5)))
