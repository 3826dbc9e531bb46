"""The native CPU matmul by packed power-of-two weights (``cpu_pow2_matmul.cc`` through
``shiftjax.kernels.cpu.native``) against a float32 sum in order of k (bit for bit) and the
XLA path (``backend='xla'``, to float32 summation-order rounding); its dispatch from
``shiftjax.kernels.pow2_matmul``, its sharding rule on 4 forced CPU devices, its errors;
the same for the tiled layout (``kernels.tile_words``), which must equal the words layout
bit for bit, and the layout's round trip.

The kernel sums each output's K products in order of k into one float32 accumulator (a
product by a power of two is exact), then multiplies by scale and adds bias, each rounded:
``_sequential`` below computes exactly that with numpy. XLA's dot sums in another order,
and so does the kernel's bfloat16 path (bfloat16 x on CPUs with AVX512-BF16: two
products per add).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax.kernels.cpu import layout
from shiftjax.kernels.cpu import native
from shiftjax.kernels.inference import matmul as mm

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TARGET = "shiftjax_pow2_matmul"

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not native.available(),
                                reason="the native kernels are CPU kernels (needs g++)")

# (M, K, N): K and N not multiples of 16, of P or of the kernel's column blocks (64, 128);
# M across the register-tile path (M <= 16, rows in one tile) and the panel path (M > 16,
# 6-row tiles with a remainder).
SHAPES = [(1, 37, 20), (3, 100, 33), (16, 64, 130), (37, 300, 70), (130, 50, 17)]


def _case(m, k, n, bits, e0, dtype, epilogue, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 1 << bits, size=(k, n))
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32) if epilogue else None
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if epilogue else None
  packed = jnp.asarray(codes_lib.pack(codes, bits, axis=0))
  return codes, packed, x, scale, bias


def _sequential(x, codes, scale, bias, bits, e0):
  """The kernel's arithmetic in numpy: float32 sums in order of k, then scale, then bias."""
  w = codes_lib.CodeFormat(bits=bits, e0=e0).values()  # sorted: -2**top .. -2**e0, 2**e0 ..
  half = 1 << (bits - 1)
  order = np.concatenate([half + np.arange(half)[::-1], np.arange(half)])
  values = np.empty(1 << bits, np.float32)
  values[order] = w  # values[code]
  w = values[codes]
  x = np.asarray(jnp.asarray(x, jnp.float32))
  y = np.zeros((x.shape[0], w.shape[1]), np.float32)
  for k in range(x.shape[1]):
    y = y + x[:, k:k + 1] * w[k]
  if scale is not None:
    y = y * np.asarray(scale)
  if bias is not None:
    y = y + np.asarray(bias)
  return y


def _assert_close_to_xla(y, x, packed, scale, bias, bits, e0):
  """Within twice the float32 recursive-summation bound of the XLA path: the two sum in
  different orders."""
  ref = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                            backend="xla")
  _assert_within_rounding(y, ref, x, packed, scale, bits, e0)


def _assert_within_rounding(y, ref, x, packed, scale, bits, e0):
  """|y - ref| <= 2 K 2**-24 sum |x| |w| (* scale), plus a rounding of ref's magnitude."""
  fmt = codes_lib.CodeFormat(bits=bits, e0=e0)
  w = codes_lib.decode(codes_lib.unpack(packed, bits, x.shape[-1]), fmt)
  size = jnp.dot(jnp.abs(x.astype(jnp.float32)), jnp.abs(w),
                 precision=jax.lax.Precision.HIGHEST)
  if scale is not None:
    size = size * scale
  bound = 2 * x.shape[-1] * 2.0**-24 * size + 2.0**-22 * jnp.abs(ref) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(y) - np.asarray(ref)), np.asarray(bound))


@pytest.mark.parametrize("bits", kernels.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_sequential_sum_and_xla(bits, shape):
  # Alternate dtype, epilogue and the sign of e0 over the grid rather than multiplying it.
  i = SHAPES.index(shape) + bits
  dtype = (jnp.float32, jnp.bfloat16)[i % 2]
  epilogue = i % 3 != 0
  e0 = (-6, 3)[(i // 2) % 2]
  codes, packed, x, scale, bias = _case(*shape, bits, e0, dtype, epilogue, seed=i)
  y = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias)
  assert y.dtype == jnp.float32 and y.shape == (shape[0], shape[2])
  want = _sequential(x, codes, scale, bias, bits, e0)
  if dtype == jnp.bfloat16:  # maybe the bfloat16 pair path
    _assert_within_rounding(y, want, x, packed, scale, bits, e0)
  else:
    np.testing.assert_array_equal(np.asarray(y), want)
  _assert_close_to_xla(y, x, packed, scale, bias, bits, e0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", kernels.SUPPORTED_BITS)
def test_every_vector_path_gives_the_same_bits(bits, dtype):
  # avx512 runs the register tiles at M = 5 and the decoded panels at M = 23; avx2 and
  # scalar run one kind of tile. The paths this CPU lacks are skipped.
  # 'avx512_bf16' is 'avx512' but for bfloat16 x: checked to rounding only.
  isas = [i for i in ("avx512", "avx2", "scalar") if _cpu_has(i)]
  for m in (5, 23):
    codes, packed, x, scale, bias = _case(m, 75, 50, bits, -4, dtype, True, seed=m)
    want = _sequential(x, codes, scale, bias, bits, -4)
    for isa in isas + ["avx512_bf16"] * _cpu_has("avx512_bf16"):
      y = native.pow2_matmul(x, packed, scale, bias, bits=bits, e0=-4, isa=isa)
      if isa == "avx512_bf16" and dtype == jnp.bfloat16:
        _assert_within_rounding(y, want, x, packed, scale, bits, -4)
      else:
        np.testing.assert_array_equal(np.asarray(y), want, err_msg=f"{isa} at M = {m}")


def _cpu_has(isa: str) -> bool:
  cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  flags = {"avx512_bf16": ("avx512bw", "avx512_bf16"), "avx512": ("avx512f",),
           "avx2": ("avx2", "fma"), "scalar": ()}[isa]
  return all(f" {flag}" in cpu for flag in flags)


def test_padding_codes_and_unused_bits_are_ignored():
  # Random words: the codes past K in the last word and the 2 unused top bits of 3-bit
  # words hold anything; they meet x's zero padding (every code is a finite value).
  bits, k, n = 3, 23, 40
  rng = np.random.default_rng(5)
  packed = jnp.asarray(rng.integers(0, 2**32, (3, n), dtype=np.uint64).astype(np.uint32))
  x = jnp.asarray(rng.standard_normal((4, k)), jnp.float32)
  codes = np.asarray(codes_lib.unpack(packed, bits, k))
  y = kernels.pow2_matmul(x, packed, bits=bits, e0=-2)
  np.testing.assert_array_equal(np.asarray(y), _sequential(x, codes, None, None, bits, -2))


def test_leading_dims_and_jit():
  codes, packed, x, scale, bias = _case(6, 40, 24, 4, -3, jnp.float32, True)
  f = jax.jit(lambda x, w, s, b: kernels.pow2_matmul(x, w, bits=4, e0=-3, scale=s, bias=b))
  y = f(x.reshape(2, 3, 40), packed, scale, bias)
  assert y.shape == (2, 3, 24)
  np.testing.assert_array_equal(np.asarray(y).reshape(6, 24),
                                _sequential(x, codes, scale, bias, 4, -3))


def _runs_native(fn, *args) -> bool:
  return TARGET in str(jax.make_jaxpr(fn)(*args))


def test_dispatch_default_native_xla_and_disabled():
  codes, packed, x, _, _ = _case(2, 30, 16, 2, -1, jnp.float32, False)
  call = lambda backend: (lambda x, w: kernels.pow2_matmul(x, w, bits=2, e0=-1,
                                                           backend=backend))
  assert _runs_native(call(None), x, packed)  # the CPU default
  assert _runs_native(call("native"), x, packed)
  assert not _runs_native(call("xla"), x, packed)  # 'xla' still forces the XLA path
  with native.disabled():
    assert not native.available()
    assert not _runs_native(call(None), x, packed)  # falls back
    y = kernels.pow2_matmul(x, packed, bits=2, e0=-1)
    with pytest.raises(ValueError, match="native CPU kernels are not available"):
      kernels.pow2_matmul(x, packed, bits=2, e0=-1, backend="native")
  _assert_close_to_xla(y, x, packed, None, None, 2, -1)
  assert mm.resolve_backend(None, None) == ("xla", None)  # pow2_conv's CPU branch as before


@pytest.mark.parametrize("bad, match", [
    (dict(bits=6), "2..5 bits, got bits=6"),
    (dict(x_dtype=jnp.int32), "float32 or bfloat16, got int32"),
    (dict(x_dtype=jnp.float16), "float32 or bfloat16, got float16"),
    (dict(w_dtype=jnp.int32), "uint32 words, got int32"),
    (dict(backend="native", platform="gpu"), "backend='native' is the CPU kernel"),
    (dict(backend="cpu"), "backend must be one of"),
])
def test_bad_input_is_a_value_error_before_tracing(bad, match, monkeypatch):
  traced = []
  monkeypatch.setattr(native, "_matmul_call", lambda *a: traced.append(a))
  x = jnp.ones((2, 16), bad.get("x_dtype", jnp.float32))
  packed = jnp.ones((4, 8), bad.get("w_dtype", jnp.uint32))
  with pytest.raises(ValueError, match=match):
    kernels.pow2_matmul(x, packed, bits=bad.get("bits", 4), e0=0,
                        backend=bad.get("backend"), platform=bad.get("platform"))
  assert not traced


def test_native_wrapper_rejects_what_it_cannot_run():
  x = jnp.ones((2, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"bits=6"):
    native.pow2_matmul(x, jnp.ones((4, 8), jnp.uint32), bits=6, e0=0)
  with pytest.raises(ValueError, match=r"packed uint32 \(3, 8\)"):  # 16 codes need 4 words
    native.pow2_matmul(x, jnp.ones((3, 8), jnp.uint32), bits=4, e0=0)
  with pytest.raises(ValueError, match="isa must be one of"):
    native.pow2_matmul(x, jnp.ones((4, 8), jnp.uint32), bits=4, e0=0, isa="sse")
  assert not native.supports_pow2_matmul(x.astype(jnp.float16), jnp.ones((4, 8), jnp.uint32), 4)


# Runs with 4 forced CPU devices (read when the backend starts: a subprocess). Each
# sharding's result must equal, bit for bit, the unsharded call on one device: every
# device sums its outputs in the same order of k.
SHARDED = textwrap.dedent(r"""
  import re, sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from shiftjax import codes as codes_lib, kernels
  from shiftjax.kernels.cpu import native

  assert jax.device_count() == 4 and native.available()
  rng = np.random.default_rng(0)
  m, k, n, bits = 8, 70, 64, 3
  x = rng.standard_normal((m, k)).astype(np.float32)
  packed = codes_lib.pack(rng.integers(0, 8, (k, n)), bits, axis=0)
  scale = rng.uniform(0.5, 2, n).astype(np.float32)
  bias = rng.standard_normal(n).astype(np.float32)
  f = jax.jit(lambda x, w, s, b: kernels.pow2_matmul(x, w, bits=bits, e0=-3, scale=s, bias=b))
  want = np.asarray(f(*(jax.device_put(a, jax.devices()[0]) for a in (x, packed, scale, bias))))

  # mesh shape, x's spec, the weights' column axes, the local output shape
  cases = [((2, 2), ("r", None), "c", "4,32"), ((4, 1), ("r", None), None, "2,64"),
           ((1, 4), (None, None), "c", "8,16")]
  for shape, x_spec, cols, local in cases:
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("r", "c"))
    on = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    args = on(x, *x_spec), on(packed, None, cols), on(scale, cols), on(bias, cols)
    hlo = f.lower(*args).compile().as_text()
    assert re.search(r'custom_call_target="shiftjax_pow2_matmul"', hlo), shape
    assert not re.search(r"all-gather|all-to-all|all-reduce", hlo), shape  # blocks only
    assert re.search(rf"f32\[{local}\]\{{[\d,]+\}} custom-call\(", hlo), (shape, local)
    y = f(*args)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(x_spec[0], cols)), 2), shape
    np.testing.assert_array_equal(np.asarray(y), want)
  print("OK")
""")


def _run_on_4_devices(script: str) -> None:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


def test_sharded_over_rows_and_columns_on_4_devices():
  _run_on_4_devices(SHARDED)


# ------------------------------------------------------------------- the tiled layout
# ``kernels.tile_words``: each tile of 128 columns one contiguous block, N padded to whole
# tiles. The kernel reads it with the same arithmetic as the words layout (the same
# register tiles and panels, the same order of k), so the two agree bit for bit on every
# path; against the sequential sum and the XLA path the tolerances are the words
# layout's (above): exact for float32 x, the rounding bound for bfloat16 x (pair path)
# and for XLA (another summation order).

# (M, K, N): K odd and not a multiple of P; N below one tile, just over one, and over
# several, none a multiple of 128; M over the register tiles (1, 3, 16), the panels with
# a remainder (17) and a full panel grid (128).
TILED_SHAPES = [(1, 37, 20), (3, 101, 129), (16, 75, 300), (17, 99, 130), (128, 45, 257)]


@pytest.mark.parametrize("n, words, tile", [(1, 1, 128), (127, 3, 128), (128, 2, 128),
                                            (129, 5, 128), (300, 1, 256), (513, 4, 512)])
def test_tiled_layout_round_trip(n, words, tile):
  rng = np.random.default_rng(n)
  packed = jnp.asarray(rng.integers(0, 2**32, (words, n), dtype=np.uint64).astype(np.uint32))
  tiled = kernels.tile_words(packed, tile)
  t = -(-n // tile)
  assert tiled.tiles.shape == (t, words, tile) and tiled.n == n
  assert tiled.shape == packed.shape and tiled.dtype == jnp.uint32
  # tiles[t, w, c] = packed[w, t * tile + c]; zeros past N
  flat = np.asarray(tiled.tiles).transpose(1, 0, 2).reshape(words, t * tile)
  np.testing.assert_array_equal(flat[:, :n], packed)
  assert not flat[:, n:].any()
  np.testing.assert_array_equal(np.asarray(layout.untile(tiled)), np.asarray(packed))
  # a pytree with N static: through jit and back
  np.testing.assert_array_equal(jax.jit(layout.untile)(tiled), packed)


def test_tiled_layout_refuses_bad_input():
  with pytest.raises(ValueError, match="multiple of 128"):
    kernels.tile_words(jnp.ones((2, 8), jnp.uint32), 64)
  with pytest.raises(ValueError, match="uint32 words"):
    kernels.tile_words(jnp.ones((2, 8), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", kernels.SUPPORTED_BITS)
@pytest.mark.parametrize("shape", TILED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiled_equals_words_and_xla(shape, bits, dtype):
  i = TILED_SHAPES.index(shape) + bits
  e0, epilogue = (-6, 3)[i % 2], i % 3 != 0
  codes, packed, x, scale, bias = _case(*shape, bits, e0, dtype, epilogue, seed=i)
  tiled = kernels.tile_words(packed)
  f = jax.jit(lambda x, w, s, b: kernels.pow2_matmul(x, w, bits=bits, e0=e0, scale=s, bias=b))
  assert _runs_native(lambda x, w: f(x, w, scale, bias), x, tiled)
  y = f(x, tiled, scale, bias)
  assert y.dtype == jnp.float32 and y.shape == (shape[0], shape[2])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x, packed, scale, bias)))
  if dtype == jnp.float32:
    np.testing.assert_array_equal(np.asarray(y), _sequential(x, codes, scale, bias, bits, e0))
  _assert_close_to_xla(y, x, packed, scale, bias, bits, e0)
  # the XLA path takes the tiled words too (untiled in the call): its own result
  ref = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                            backend="xla")
  np.testing.assert_array_equal(
      kernels.pow2_matmul(x, tiled, bits=bits, e0=e0, scale=scale, bias=bias,
                          backend="xla"), ref)


@pytest.mark.parametrize("bits", kernels.SUPPORTED_BITS)
def test_tiled_every_vector_path_equals_words(bits):
  isas = [i for i in ("avx512_bf16", "avx512", "avx2", "scalar") if _cpu_has(i)]
  for m, dtype in ((5, jnp.float32), (23, jnp.bfloat16), (1, jnp.bfloat16)):
    _, packed, x, scale, bias = _case(m, 75, 200, bits, -4, dtype, True, seed=m)
    for tile in (128, 256):
      tiled = kernels.tile_words(packed, tile)
      for isa in isas:
        want = native.pow2_matmul(x, packed, scale, bias, bits=bits, e0=-4, isa=isa)
        y = native.pow2_matmul(x, tiled, scale, bias, bits=bits, e0=-4, isa=isa)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want),
                                      err_msg=f"{isa}, M = {m}, tile {tile}")


def test_tiled_dispatch_when_native_is_off():
  codes, packed, x, _, _ = _case(2, 30, 140, 2, -1, jnp.float32, False)
  tiled = kernels.tile_words(packed)
  with native.disabled():
    assert not _runs_native(lambda x, w: kernels.pow2_matmul(x, w, bits=2, e0=-1), x, tiled)
    y = kernels.pow2_matmul(x, tiled, bits=2, e0=-1)
  _assert_close_to_xla(y, x, packed, None, None, 2, -1)
  assert not _runs_native(
      lambda x, w: kernels.pow2_matmul(x, w, bits=2, e0=-1, backend="xla"), x, tiled)


# The tiled call's sharding rule on 4 forced CPU devices: tiles (and x's rows) sharded,
# each device multiplies its own block, bit for bit the one-device result.
SHARDED_TILED = textwrap.dedent(r"""
  import re
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from shiftjax import codes as codes_lib, kernels
  from shiftjax.kernels.cpu import native

  assert jax.device_count() == 4 and native.available()
  rng = np.random.default_rng(0)
  m, k, bits = 8, 71, 3
  f = jax.jit(lambda x, w, s, b: kernels.pow2_matmul(x, w, bits=bits, e0=-3, scale=s, bias=b))
  for n in (512, 500):  # 4 whole tiles; 4 tiles, the last padded
    x = rng.standard_normal((m, k)).astype(np.float32)
    packed = codes_lib.pack(rng.integers(0, 8, (k, n)), bits, axis=0)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    one = jax.devices()[0]
    want = np.asarray(f(*(jax.device_put(a, one) for a in (x, packed, scale, bias))))
    tiled = kernels.tile_words(packed)
    # mesh shape, x's spec, the tiles' axes, the local output [M, T, tile]
    cases = [((2, 2), ("r", None), "c", "4,2,128"), ((4, 1), ("r", None), None, "2,4,128"),
             ((1, 4), (None, None), "c", "8,1,128")]
    for shape, x_spec, cols, local in cases:
      mesh = Mesh(np.array(jax.devices()).reshape(shape), ("r", "c"))
      on = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
      args = on(x, *x_spec), on(tiled, cols, None, None), on(scale, cols), on(bias, cols)
      hlo = f.lower(*args).compile().as_text()
      assert re.search(r'custom_call_target="shiftjax_pow2_matmul"', hlo), shape
      assert re.search(rf"f32\[{local}\]\{{[\d,]+\}} custom-call\(", hlo), (shape, local)
      if n == 512:  # no collective; N = 500 drops padding columns, which XLA may reshard
        assert not re.search(r"all-gather|all-to-all|all-reduce", hlo), shape
      y = f(*args)
      if n == 512:
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(x_spec[0], cols)), 2), shape
      np.testing.assert_array_equal(np.asarray(y), want)
  print("OK")
""")


def test_tiled_sharded_over_rows_and_tiles_on_4_devices():
  _run_on_4_devices(SHARDED_TILED)
