"""The native C++ CPU conv and kernel gradient (shiftjax.kernels.cpu.native) against XLA."""

import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax.kernels.training import conv as sc
from shiftjax.kernels.cpu import native

DN = ("NHWC", "HWIO", "NHWC")
TARGET = "shiftjax_conv_kernel_grad"
CONV_TARGET = "shiftjax_conv"

# batch, H, W, Ci, Co, kernel (kh, kw), strides, padding; Co a multiple of 16
CASES = {
    "3x3_s1_same": (3, 8, 8, 16, 16, (3, 3), (1, 1), "SAME"),
    "3x3_s1_same_odd": (2, 7, 9, 5, 32, (3, 3), (1, 1), "SAME"),
    "3x3_s2_same": (3, 8, 8, 16, 32, (3, 3), (2, 2), "SAME"),
    "3x3_s2_same_odd": (2, 7, 7, 3, 16, (3, 3), (2, 2), "SAME"),
    "3x3_s1_valid": (2, 7, 7, 13, 16, (3, 3), (1, 1), "VALID"),
    "3x3_s2_valid": (2, 8, 8, 3, 48, (3, 3), (2, 2), "VALID"),
    "1x1_s1": (2, 7, 7, 40, 64, (1, 1), (1, 1), "VALID"),
    "1x1_s2": (3, 8, 8, 16, 32, (1, 1), (2, 2), "SAME"),
    "explicit_pads": (2, 8, 7, 3, 16, (3, 3), (2, 2), ((0, 1), (2, 1))),
    "negative_pads": (2, 8, 8, 2, 16, (3, 3), (1, 1), ((-1, 2), (2, -1))),
    "5x3_mixed_strides": (2, 9, 8, 2, 16, (5, 3), (1, 2), "SAME"),
    "one_image_wide": (1, 5, 6, 70, 80, (3, 3), (1, 1), "SAME"),  # odd row blocks of ci
}

needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the native kernels are CPU kernels")


def _data(case, seed=0):
  n, h, w, ci, co, k, s, p = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((*k, ci, co)) / np.sqrt(k[0] * k[1] * ci),
                       jnp.float32)
  y = lax.conv_general_dilated(x, kernel, s, p, dimension_numbers=DN)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  return x, kernel, g, s, p


def _kernel_grad(conv, x, kernel, g):
  return jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])(x, kernel, g)


def _uses_native(conv, x, kernel, g) -> bool:
  jaxpr = jax.make_jaxpr(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g))(x, kernel, g)
  return TARGET in str(jaxpr)


@needs_native
def test_native_kernels_build_here():
  # CI machines have g++ (the README's commands install it): a silent fallback would leave
  # the other tests here checking the XLA path twice.
  assert native.available()


@needs_native
@pytest.mark.parametrize("name", list(CASES))
def test_native_kernel_grad_equals_xla(name):
  x, kernel, g, s, p = _data(CASES[name])
  fast = lambda x, k: sc.conv2d(x, k, s, p, fast_grad=True)
  assert _uses_native(fast, x, kernel, g)
  want = _kernel_grad(lambda x, k: lax.conv_general_dilated(x, k, s, p, dimension_numbers=DN),
                      x, kernel, g)
  got = _kernel_grad(fast, x, kernel, g)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with native.disabled():  # the XLA path it replaces computes the same
    assert not _uses_native(fast, x, kernel, g)
    xla_path = _kernel_grad(fast, x, kernel, g)
  np.testing.assert_allclose(got, xla_path, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize("name", list(CASES))
def test_native_conv_equals_xla(name):
  x, kernel, g, s, p = _data(CASES[name])
  fast = lambda x, k: sc.conv2d(x, k, s, p, fast_grad=True)
  assert CONV_TARGET in str(jax.make_jaxpr(fast)(x, kernel))
  want = lax.conv_general_dilated(x, kernel, s, p, dimension_numbers=DN)
  got = jax.jit(fast)(x, kernel)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # the input gradient: one native conv per output phase of g
  dx = jax.jit(lambda x, k, g: jax.vjp(fast, x, k)[1](g)[0])(x, kernel, g)
  dx_xla = jax.jit(lambda x, k, g: jax.vjp(
      lambda x: lax.conv_general_dilated(x, k, s, p, dimension_numbers=DN), x)[1](g)[0])(
          x, kernel, g)
  np.testing.assert_allclose(dx, dx_xla, rtol=1e-5, atol=1e-5 * np.abs(dx_xla).max())


@needs_native
def test_exact_on_integers():
  # Small integers: every product and partial sum is exact in float32, so any order of
  # summation gives the exact answer, which numpy computes in int64.
  n, h, w, ci, co, (kh, kw), (sh, sw), pads = 2, 7, 6, 3, 16, (3, 3), (2, 1), ((1, 1), (1, 0))
  rng = np.random.default_rng(1)
  x = rng.integers(-4, 5, (n, h, w, ci))
  ho, wo = (h + 2 - kh) // sh + 1, (w + 1 - kw) // sw + 1
  g = rng.integers(-4, 5, (n, ho, wo, co))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  want = np.zeros((kh, kw, ci, co), np.int64)
  for i in range(kh):
    for j in range(kw):
      taps = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      want[i, j] = np.einsum("nhwc,nhwo->co", taps, g)
  got = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, (kh, kw), (sh, sw), pads))(
      jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
  kernel = rng.integers(-4, 5, (kh, kw, ci, co))
  y_want = np.zeros((n, ho, wo, co), np.int64)
  for i in range(kh):
    for j in range(kw):
      taps = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      y_want += np.einsum("nhwc,co->nhwo", taps, kernel[i, j])
  y = jax.jit(lambda x, k: native.conv(x, k, (sh, sw), pads))(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
  np.testing.assert_array_equal(np.asarray(y), y_want.astype(np.float32))


FUSED_TARGET = "shiftjax_fused_conv"


@needs_native
@pytest.mark.parametrize("parts", ["none", "scale", "bias", "residual", "relu", "all"])
@pytest.mark.parametrize("name", ["3x3_s1_same_odd", "3x3_s2_same", "1x1_s2", "explicit_pads",
                                  "one_image_wide"])
def test_fused_conv_equals_conv_then_xla_epilogue(name, parts):
  x, kernel, g, s, p = _data(CASES[name])
  pads = sc._explicit(p, x.shape, kernel.shape[:2], s)  # pylint: disable=protected-access
  rng = np.random.default_rng(3)
  co = kernel.shape[-1]
  use = lambda part: parts in (part, "all")
  scale = jnp.asarray(rng.uniform(0.5, 2, co), jnp.float32) if use("scale") else None
  bias = jnp.asarray(rng.standard_normal(co), jnp.float32) if use("bias") else None
  residual = g if use("residual") else None  # g has the conv output's shape
  relu = use("relu")
  y = lax.conv_general_dilated(x, kernel, s, pads, dimension_numbers=DN,
                               precision=lax.Precision.HIGHEST)
  want = y * (1 if scale is None else scale) + (0 if bias is None else bias)
  want = want + (0 if residual is None else residual)
  want = jnp.maximum(want, 0) if relu else want
  fused = lambda x, k: native.fused_conv(x, k, s, pads, scale=scale, bias=bias,
                                         residual=residual, relu=relu)
  assert FUSED_TARGET in str(jax.make_jaxpr(fused)(x, kernel))
  got = jax.jit(fused)(x, kernel)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  if relu:
    assert float(jnp.min(got)) == 0.0


@needs_native
def test_fused_conv_exact_on_integers_and_powers_of_two():
  # Integer x, kernel, bias and residual, power-of-two scales: every step is exact in
  # float32, so the fused epilogue must equal numpy's int64 result bit for bit, relu
  # included (negative sums present).
  n, h, w, ci, co = 2, 6, 5, 3, 32
  rng = np.random.default_rng(4)
  x = rng.integers(-4, 5, (n, h, w, ci))
  kernel = rng.integers(-4, 5, (3, 3, ci, co))
  bias = rng.integers(-20, 21, co)
  scale_exp = rng.integers(-2, 3, co)
  residual = rng.integers(-30, 31, (n, h, w, co))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], kernel[i, j])
          for i in range(3) for j in range(3)).astype(np.float64)
  want = np.maximum(y * 2.0 ** scale_exp + bias + residual, 0)
  assert (y * 2.0 ** scale_exp + bias + residual < 0).any()
  got = jax.jit(lambda *a: native.fused_conv(
      a[0], a[1], (1, 1), ((1, 1), (1, 1)), scale=a[2], bias=a[3], residual=a[4],
      relu=True))(*(jnp.asarray(v, jnp.float32) for v in (
          x, kernel, 2.0 ** scale_exp, bias, residual)))
  np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@needs_native
def test_fused_conv_checks_epilogue_shapes():
  x, kernel, g, s, p = _data(CASES["3x3_s2_same"])
  pads = ((1, 1), (1, 1))
  with pytest.raises(ValueError, match=r"bias must have shape \(32,\), got \(16,\)"):
    native.fused_conv(x, kernel, s, pads, bias=jnp.zeros(16))
  with pytest.raises(ValueError, match=r"residual must have shape \(3, 4, 4, 32\)"):
    native.fused_conv(x, kernel, s, pads, residual=jnp.zeros((3, 4, 4, 16)))
  with pytest.raises(ValueError, match="multiple of 16"):
    native.fused_conv(x, kernel[..., :12], s, pads)


@needs_native
def test_deterministic():
  x, kernel, g, s, p = _data((16, 8, 8, 16, 32, (3, 3), (1, 1), "SAME"), seed=2)
  f = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, (3, 3), s, ((1, 1), (1, 1))))
  first = np.asarray(f(x, g))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x, g)), first)


@needs_native
def test_vmap():
  x, kernel, g, s, p = _data(CASES["3x3_s2_same"])
  pads = tuple(lax.padtype_to_pads(x.shape[1:3], (3, 3), s, p))
  one = lambda x, g: native.conv_kernel_grad(x, g, (3, 3), s, pads)
  batched = jax.vmap(one)(jnp.stack([x, 2 * x]), jnp.stack([g, g]))
  np.testing.assert_allclose(batched[1], 2 * one(x, g), rtol=1e-6)
  np.testing.assert_allclose(batched[0], one(x, g), rtol=1e-6)


@needs_native
def test_unsupported_operands_take_the_xla_path():
  x, kernel, g, s, p = _data((2, 8, 8, 4, 12, (3, 3), (1, 1), "SAME"))  # Co = 12
  fast = lambda x, k: sc.conv2d(x, k, s, p, fast_grad=True)
  assert not _uses_native(fast, x, kernel, g)
  assert not native.supports_conv(x.astype(jnp.bfloat16), g.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"multiple of 16.*\(2, 8, 8, 12\)"):
    native.conv_kernel_grad(x, g, (3, 3), s, ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match=r"multiple of 16.*\(3, 3, 4, 12\)"):
    native.conv(x, kernel, s, ((1, 1), (1, 1)))
  jaxpr = str(jax.make_jaxpr(fast)(x, kernel))
  assert CONV_TARGET not in jaxpr


@needs_native
def test_conv_empty_output_raises():
  x = jnp.zeros((1, 2, 2, 3), jnp.float32)
  with pytest.raises(ValueError, match="empty output"):
    native.conv(x, jnp.zeros((3, 3, 3, 16), jnp.float32), (1, 1), ((0, 0), (0, 0)))


def test_disabled_context_restores():
  before = native.available()
  with native.disabled():
    assert not native.available()
  assert native.available() == before


def test_no_compiler_warns_and_falls_back(monkeypatch):
  monkeypatch.setattr(native, "_compiler", lambda: None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = native._library.__wrapped__()  # uncached: the real library stays registered
  if jax.default_backend() == "cpu":
    assert lib is None
    assert any("no C++ compiler" in str(w.message) for w in caught)


@needs_native
def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
  monkeypatch.setenv("SHIFTJAX_CACHE_DIR", str(tmp_path))
  compiler = native._compiler()
  first = native.build(compiler)
  assert first.parent == tmp_path and first.exists()
  mtime = first.stat().st_mtime_ns
  assert native.build(compiler) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
  source = tmp_path / "changed.cc"
  source.write_text(native._SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(native, "_SOURCE", source)
  assert native.build(compiler) != first  # a changed source never loads a stale library
  assert [p.suffix for p in tmp_path.iterdir()].count(".so") == 2  # no temporary left over
