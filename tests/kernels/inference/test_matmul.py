"""Tests of shiftjax.kernels.inference.matmul and conv (``pow2_matmul``, ``pow2_conv``):
Pallas (interpret mode) vs XLA vs a dense float reference, GPU/TPU lowering through
jax.export, and argument errors.

The Pallas kernels run here with the Pallas interpreter (no accelerator on CI); both the
TPU kernel (K grid axis + VMEM accumulator) and the GPU kernel (in-program K loop) are
interpreted. Every interpret-mode case is a separate compile, so the grid is kept small.
"""

import dataclasses
import functools
import re

import numpy as np
import pytest

import jax
from jax import export
from jax import lax
import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax.benchmarking import sass
from shiftjax.kernels.inference import matmul as mm_lib
from shiftjax.kernels.inference.tiling import Blocks


# Interpret-mode kernels are XLA:CPU while loops whose compile time dominates this file;
# they are compiled without backend optimization (about 30% faster, same results).
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _fast(fn, *args, **static):
  """Calls ``fn(*args, **static)`` under a jit compiled with _FAST_COMPILE."""
  return jax.jit(lambda *a: fn(*a, **static), compiler_options=_FAST_COMPILE)(*args)


def _pack(codes, bits):
  """[K, N] codes -> uint32 [ceil(K / P), N] words (test_in_kernel.py checks the packer
  against the format's definition)."""
  return jnp.asarray(codes_lib.pack(np.asarray(codes), bits, axis=0))


def _blocks(mnk, bits, dtype, platform, dot=None, **change):
  """``default_blocks`` for an ``(M, N, K)`` product with ``change`` (the interpreter
  takes any tile)."""
  return dataclasses.replace(
      kernels.default_blocks(*mnk, bits, dtype, platform, dot), **change)


def _case(seed, m, k, n, bits, e0, dtype, with_scale, with_bias):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 1 << bits, size=(k, n)).astype(np.int32)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32) if with_scale else None
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
  return codes, _pack(codes, bits), x, scale, bias


@functools.partial(jax.jit, static_argnames=("bits", "e0"))
def _reference(x, codes, scale, bias, *, bits, e0):
  """Dense float reference and a float32 summation-order error bound for it."""
  w = codes_lib.decode(codes, codes_lib.CodeFormat(bits=bits, e0=e0))
  x32 = x.astype(jnp.float32)  # bf16 -> f32 is exact; so are the products with 2**e
  hi = lax.Precision.HIGHEST
  y = jnp.dot(x32, w, precision=hi)
  # |sum order A - sum order B| <= 2 * gamma_K * sum|x||w| (recursive summation bound).
  bound = 2 * x.shape[-1] * 2.0**-24 * jnp.dot(jnp.abs(x32), jnp.abs(w), precision=hi)
  if scale is not None:
    y, bound = y * scale, bound * scale
  if bias is not None:
    y = y + bias
  return y, bound + 2.0**-22 * jnp.abs(y) + 1e-30


def _assert_close(y, ref, bound):
  assert y.dtype == jnp.float32
  assert y.shape == ref.shape
  err = np.asarray(jnp.abs(y - ref))
  worst = np.unravel_index(np.argmax(err - np.asarray(bound)), err.shape)
  assert np.all(err <= np.asarray(bound)), (
      f"error {err[worst]} > bound {np.asarray(bound)[worst]} at {worst}")


# (bits, dtype, M, K, N, e0, scale, bias, tiles (m, n, k_words) for the interpreted
# kernels, None: the defaults). K is not a multiple of the codes per word (except where
# marked), M/N/K not multiples of the blocks, so every case pads in all three dims.
MATMUL_CASES = [
    (2, jnp.float32, 5, 70, 20, -3, True, True, (8, 16, 2)),       # P=16
    (2, jnp.bfloat16, 3, 33, 17, 4, False, False, (8, 16, 1)),
    (3, jnp.float32, 9, 41, 24, 2, True, False, (8, 16, 2)),       # P=10
    (3, jnp.bfloat16, 7, 95, 9, -12, False, True, (4, 8, 3)),
    (4, jnp.float32, 3, 100, 33, -10, False, True, (8, 16, 2)),    # P=8
    (4, jnp.bfloat16, 16, 64, 32, 0, True, True, None),  # K = 8 words
    (5, jnp.float32, 6, 50, 16, -20, True, True, (8, 8, 2)),       # P=6
    (5, jnp.bfloat16, 11, 23, 40, 5, True, False, (8, 16, 1)),
]


def _ids(cases):
  return [f"{c[0]}bit-{jnp.dtype(c[1]).name}-{c[2]}x{c[3]}x{c[4]}-e0{c[5]}" for c in cases]


@pytest.mark.parametrize("case", MATMUL_CASES, ids=_ids(MATMUL_CASES))
def test_matmul_paths_agree_with_dense_reference(case):
  bits, dtype, m, k, n, e0, with_scale, with_bias, tiles = case
  codes, packed, x, scale, bias = _case(bits * 10 + m, m, k, n, bits, e0, dtype,
                                        with_scale, with_bias)
  ref, bound = _reference(x, codes, scale, bias, bits=bits, e0=e0)
  matmul = lambda x, w, s, b, **kw: kernels.pow2_matmul(x, w, scale=s, bias=b, **kw)
  y = matmul(x, packed, scale, bias, bits=bits, e0=e0, backend="xla")
  _assert_close(y, ref, bound)
  # Alternate the interpreted kernel so that both kernels see every bit width and dtype.
  # Most cases take several K steps, so the accumulator must carry across them (TPU: K
  # grid axis; GPU: the in-program loop) and the epilogue run once.
  platform = "tpu" if (MATMUL_CASES.index(case) % 2 == 0) else "gpu"
  blocks = tiles and _blocks((m, n, k), bits, dtype, platform, **dict(
      zip(("m", "n", "k_words"), tiles)))
  y = _fast(matmul, x, packed, scale, bias, bits=bits, e0=e0, backend="pallas_interpret",
            platform=platform, blocks=blocks)
  _assert_close(y, ref, bound)


def test_padded_k_rows_add_exactly_zero():
  # Codes past K in the last word are zero-padded, i.e. decode to +2**e0: only x == 0
  # padding keeps them out. Huge 2**e0 would expose any leak.
  bits, e0, k = 3, 100, 13  # P = 10: 7 padded codes in the last word
  codes = np.zeros((k, 4), np.int64)
  packed = _pack(codes, bits)
  x = jnp.ones((2, k), jnp.float32)
  y = _fast(kernels.pow2_matmul, x, packed, bits=bits, e0=e0, backend="pallas_interpret",
            blocks=_blocks((2, 4, k), bits, jnp.float32, "tpu", k_words=1))
  np.testing.assert_array_equal(np.asarray(y), np.full((2, 4), k * 2.0**e0, np.float32))


def test_leading_dims_jit_and_default_backend():
  bits, e0 = 4, -2
  codes, packed, x, _, _ = _case(3, 6, 24, 8, bits, e0, jnp.float32, False, False)
  x3 = x.reshape(2, 3, 24)
  f = jax.jit(lambda x, w: kernels.pow2_matmul(x, w, bits=bits, e0=e0))
  y = f(x3, packed)
  assert y.shape == (2, 3, 8)
  ref, bound = _reference(x, codes, None, None, bits=bits, e0=e0)
  _assert_close(y.reshape(6, 8), ref, bound)
  assert mm_lib.resolve_backend(None, None) == ("xla", None)  # CPU default
  assert mm_lib.resolve_backend(None, "cuda") == ("pallas", "gpu")


# ------------------------------------------------------------------------------------
# Convolution.

CONV_CASES = [  # (kernel hw, stride, padding, dtype, scale, bias)
    ((3, 3), 1, "SAME", jnp.float32, True, True),
    ((3, 3), 2, "SAME", jnp.bfloat16, False, True),
    ((3, 3), 2, "VALID", jnp.float32, True, False),
    ((1, 1), 1, "VALID", jnp.float32, False, False),
    ((1, 1), 2, "SAME", jnp.bfloat16, True, True),
]


@functools.partial(jax.jit, static_argnames=("bits", "e0", "stride", "padding"))
def _conv_reference(x, hwio, scale, bias, *, bits, e0, stride, padding):
  w = codes_lib.decode(hwio, codes_lib.CodeFormat(bits=bits, e0=e0))
  conv = lambda a, b: lax.conv_general_dilated(
      a.astype(jnp.float32), b, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
  y = conv(x, w)
  bound = conv(jnp.abs(x), jnp.abs(w)) * (2 * w.shape[0] * w.shape[1] * w.shape[2] * 2.0**-24)
  if scale is not None:
    y, bound = y * scale, bound * scale
  if bias is not None:
    y = y + bias
  return y, bound + 2.0**-22 * jnp.abs(y) + 1e-30


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}-s{c[1]}-{c[2]}-{jnp.dtype(c[3]).name}"
                              for c in CONV_CASES])
def test_conv_matches_lax_conv_of_decoded_kernel(case):
  (kh, kw), stride, padding, dtype, with_scale, with_bias = case
  bits, e0, cin, cout = 3, -4, 5, 12  # K = kh*kw*5: 45 is not a multiple of P = 10
  rng = np.random.default_rng(kh * 10 + stride)
  hwio = rng.integers(0, 1 << bits, size=(kh, kw, cin, cout))
  packed = _pack(hwio.reshape(-1, cout), bits)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, cin)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 2, cout), jnp.float32) if with_scale else None
  bias = jnp.asarray(rng.standard_normal(cout), jnp.float32) if with_bias else None
  ref, bound = _conv_reference(x, jnp.asarray(hwio), scale, bias, bits=bits, e0=e0,
                               stride=stride, padding=padding)
  args = dict(bits=bits, e0=e0, kernel_shape=(kh, kw, cin, cout), strides=stride,
              padding=padding, scale=scale, bias=bias)
  _assert_close(kernels.pow2_conv(x, packed, backend="xla", **args), ref, bound)
  conv = lambda x, w, s, b, **kw: kernels.pow2_conv(x, w, scale=s, bias=b, **kw)
  del args["scale"], args["bias"]
  blocks = Blocks(m=32, n=8, k_words=packed.shape[0])  # all of K: the TPU default here
  y = _fast(conv, x, packed, scale, bias, backend="pallas_interpret", blocks=blocks,
            **args)
  _assert_close(y, ref, bound)


@pytest.mark.parametrize("cout", [32, 12], ids=["native-on-cpu", "xla-conv"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_fused_residual_and_relu_match_reference(cout, stride):
  # A ResNet layer's whole step: relu(conv * scale + bias + residual). On the CPU, 32
  # output channels run on the native conv with the epilogue in its registers, 12 on
  # XLA's conv; the Pallas interpreter applies residual and relu after its matmul.
  bits, e0, cin = 3, -4, 5
  rng = np.random.default_rng(cout + stride)
  hwio = rng.integers(0, 1 << bits, size=(3, 3, cin, cout))
  packed = _pack(hwio.reshape(-1, cout), bits)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, cin)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2, cout), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(cout), jnp.float32)
  ref, bound = _conv_reference(x, jnp.asarray(hwio), scale, bias, bits=bits, e0=e0,
                               stride=stride, padding="SAME")
  residual = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  want = jnp.maximum(ref + residual, 0)
  bound = bound + 2.0**-22 * jnp.abs(residual)
  args = dict(bits=bits, e0=e0, kernel_shape=(3, 3, cin, cout), strides=stride,
              padding="SAME", scale=scale, bias=bias, residual=residual, relu=True)
  xla = lambda x, w: kernels.pow2_conv(x, w, backend="xla", **args)
  uses_native = "shiftjax_fused_conv" in str(jax.make_jaxpr(xla)(x, packed))
  assert uses_native == (cout % 16 == 0 and jax.default_backend() == "cpu"
                         and _native_available())
  _assert_close(xla(x, packed), want, bound)
  _assert_close(_fast(lambda x, w, r: kernels.pow2_conv(
      x, w, backend="pallas_interpret", blocks=Blocks(m=32, n=8, k_words=packed.shape[0]),
      **{**args, "residual": r}), x, packed, residual), want, bound)
  w = codes_lib.decode(jnp.asarray(hwio), codes_lib.CodeFormat(bits=bits, e0=e0))
  _assert_close(kernels.fused_conv(x, w, strides=stride, padding="SAME", scale=scale,
                                   bias=bias, residual=residual, relu=True), want, bound)


def _native_available():
  from shiftjax.kernels.cpu import native  # pylint: disable=import-outside-toplevel
  return native.available()


def test_conv_residual_shape_is_checked():
  x = jnp.zeros((1, 6, 6, 5), jnp.float32)
  packed = jnp.zeros((5, 16), jnp.uint32)
  with pytest.raises(ValueError, match=r"residual must have the conv output's shape "
                                       r"\(1, 3, 3, 16\), got \(1, 6, 6, 16\)"):
    kernels.pow2_conv(x, packed, bits=3, e0=0, kernel_shape=(3, 3, 5, 16), strides=2,
                      residual=jnp.zeros((1, 6, 6, 16)))
  with pytest.raises(ValueError, match="residual must have"):
    kernels.fused_conv(x, jnp.zeros((3, 3, 5, 12)), residual=jnp.zeros((1, 6, 6, 16)))


@pytest.mark.parametrize("name", ["scale", "bias"])
def test_fused_conv_checks_scale_and_bias_shapes_on_the_xla_path(name):
  # 12 output channels: not a multiple of 16, so the XLA fallback, which would broadcast.
  x = jnp.zeros((1, 6, 6, 5), jnp.float32)
  with pytest.raises(ValueError, match=rf"{name} must have shape \(12,\) \(one per output "
                                       r"channel\), got \(1,\)"):
    kernels.fused_conv(x, jnp.zeros((3, 3, 5, 12)), **{name: jnp.ones((1,))})


@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_split_k_partial_products_sum_to_the_product(split_k):
  # K = 100 codes at 4 bits = 13 words: every split pads K with zero words of its own.
  m, k, n, bits, e0 = 3, 100, 33, 4, -3
  rng = np.random.default_rng(split_k)
  codes = rng.integers(0, 1 << bits, size=(k, n))
  packed = _pack(codes, bits)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  ref, bound = _reference(x, jnp.asarray(codes), scale, bias, bits=bits, e0=e0)
  y = _fast(lambda x, w, s, b, **kw: kernels.pow2_matmul(x, w, scale=s, bias=b, **kw),
            x, packed, scale, bias, bits=bits, e0=e0, backend="pallas_interpret",
            platform="gpu", blocks=Blocks(m=8, n=16, k_words=2, split_k=split_k))
  _assert_close(y, ref, bound)


# (bits, M, K, N, e0, tiles (m, n, k_words), split_k, dot): the GPU tensor-core
# kernels with bfloat16 x beyond MATMUL_CASES (whose bfloat16 GPU cases take the default,
# 'mma_pairs'): the one-code 'mma' kernel, and pairs with split K and several K steps.
# 3 and 5 bits have an odd number of bits below the pair's high code (the moved-up codes).
GPU_BF16_CASES = [
    (3, 5, 95, 24, -12, (8, 16, 2), 1, "mma"),
    (5, 16, 50, 40, 5, (16, 16, 2), 2, "mma"),
    (2, 1, 200, 33, -3, (8, 16, 2), 2, "mma_pairs"),
    (5, 9, 130, 20, 9, (8, 8, 2), 3, "mma_pairs"),
]


@pytest.mark.parametrize("case", GPU_BF16_CASES,
                         ids=[f"{c[0]}bit-{c[1]}x{c[2]}x{c[3]}-{c[7]}-split{c[6]}"
                              for c in GPU_BF16_CASES])
def test_gpu_bfloat16_kernels_agree_with_dense_reference(case):
  bits, m, k, n, e0, (bm, bn, bkw), split_k, dot = case
  codes, packed, x, scale, bias = _case(bits * 7 + m, m, k, n, bits, e0, jnp.bfloat16,
                                        True, True)
  ref, bound = _reference(x, codes, scale, bias, bits=bits, e0=e0)
  y = _fast(lambda x, w, s, b, **kw: kernels.pow2_matmul(x, w, scale=s, bias=b, **kw),
            x, packed, scale, bias, bits=bits, e0=e0, backend="pallas_interpret",
            platform="gpu", blocks=Blocks(bm, bn, bkw, split_k, dot))
  _assert_close(y, ref, bound)


# (bits, dtype, M, K, N, e0, tiles (m, n, k_words), split_k): the GPU kernel's CUDA-core
# ('fma') variant, interpreted. M = 1 takes the one-row accumulator [bk_words, bn]; the
# others the [bm, bk_words, bn] one; every case pads in M, N and K.
FMA_CASES = [
    (2, jnp.float32, 1, 70, 20, -3, (1, 16, 2), 1),
    (3, jnp.bfloat16, 3, 95, 9, -12, (4, 8, 2), 2),
    (4, jnp.bfloat16, 1, 100, 33, -10, (1, 16, 2), 3),
    (5, jnp.float32, 6, 50, 16, 5, (8, 8, 2), 1),
]


@pytest.mark.parametrize("case", FMA_CASES, ids=_ids(FMA_CASES))
def test_fma_kernel_agrees_with_dense_reference(case):
  bits, dtype, m, k, n, e0, (bm, bn, bkw), split_k = case
  codes, packed, x, scale, bias = _case(bits + m, m, k, n, bits, e0, dtype, True, True)
  ref, bound = _reference(x, codes, scale, bias, bits=bits, e0=e0)
  y = _fast(lambda x, w, s, b, **kw: kernels.pow2_matmul(x, w, scale=s, bias=b, **kw),
            x, packed, scale, bias, bits=bits, e0=e0, backend="pallas_interpret",
            platform="gpu", blocks=Blocks(bm, bn, bkw, split_k, "fma"))
  _assert_close(y, ref, bound)


# ------------------------------------------------------------------------------------
# Lowering for GPU and TPU without the hardware.

_TRITON_TARGET = "__gpu$xla.gpu.triton"


def _export(f, platform, *specs):
  # The Triton custom call carries its kernel as Triton IR with no serialization
  # compatibility guarantee, so jax.export refuses it unless told; lowering is what we
  # check here, not the long-term stability of the serialized module.
  disabled = ([export.DisabledSafetyCheck.custom_call(_TRITON_TARGET)]
              if platform == "cuda" else [])
  return export.export(jax.jit(f), platforms=[platform], disabled_checks=disabled)(*specs)


EXPORT_CASES = [  # (bits, dtype, M, K, N, scale+bias)
    (3, jnp.float32, 16, 1000, 256, True),
    (4, jnp.bfloat16, 1, 4096, 512, False),
    (5, jnp.bfloat16, 40, 300, 200, True),  # GPU pads every axis; TPU takes whole dims
    (2, jnp.float32, 300, 5000, 1000, True),  # TPU pads M, N and K too (several K steps)
]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids([c[:5] + (0,) for c in EXPORT_CASES]))
def test_pallas_matmul_lowers_for_gpu_and_tpu(platform, case):
  bits, dtype, m, k, n, affine = case
  p = 32 // bits
  specs = [jax.ShapeDtypeStruct((m, k), dtype),
           jax.ShapeDtypeStruct((-(-k // p), n), jnp.uint32)]
  if affine:
    specs += [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2
    f = lambda x, w, s, b: kernels.pow2_matmul(x, w, bits=bits, e0=-6, scale=s, bias=b,
                                               backend="pallas", platform=platform)
  else:
    f = lambda x, w: kernels.pow2_matmul(x, w, bits=bits, e0=-6, backend="pallas",
                                         platform=platform)
  exp = _export(f, platform, *specs)
  assert exp.platforms == (platform,)
  assert exp.out_avals[0].shape == (m, n) and exp.out_avals[0].dtype == jnp.float32
  text = exp.mlir_module()
  if platform == "cuda":
    assert _TRITON_TARGET in text  # Triton, not the Mosaic GPU default
  else:
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_pallas_conv_lowers_for_gpu_and_tpu(platform):
  bits, cin, cout = 4, 16, 32
  specs = [jax.ShapeDtypeStruct((2, 8, 8, cin), jnp.bfloat16),
           jax.ShapeDtypeStruct((9 * cin // 8, cout), jnp.uint32)]
  f = lambda x, w: kernels.pow2_conv(x, w, bits=bits, e0=-8, kernel_shape=(3, 3, cin, cout),
                                     strides=2, padding="SAME", backend="pallas",
                                     platform=platform)
  exp = _export(f, platform, *specs)
  assert exp.out_avals[0].shape == (2, 4, 4, cout)


@pytest.mark.parametrize("gpu_dot,m", [("mma", 16), ("mma", 5), ("mma_pairs", 16),
                                      ("mma_pairs", 1), ("fma", 1), ("fma", 4)])
def test_triton_kernel_ir_verifies(gpu_dot, m):
  # Lowering writes the Triton module as bytecode without running the MLIR verifier on
  # the whole module; sass.triton_kernel parses it back and verifies it, as XLA's Triton
  # compiler would.
  try:
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering
    new_context = triton_lowering._new_ir_context  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pytest.skip("jax internals for reading Triton IR moved")
  blocks = kernels.default_blocks(m, 256, 640, 3, jnp.bfloat16, "gpu", gpu_dot)
  text = sass.triton_kernel(m, 640, 256, 3, jnp.bfloat16, blocks).ir
  with new_context():
    assert ir.Module.parse(text).operation.verify()
  assert "tt.bitcast" in text and "arith.shrui" in text
  # x and the output keep their m rows, so the rows of an M tile past them lie outside
  # both buffers: where m is not a multiple of the tile's rows every x load is masked
  # (pointer, mask, other) and every store (pointer, value, mask); plain where it is.
  bm = blocks.m
  stores = re.findall(r"tt\.store (%\w+(?:, %\w+)*) :", text)
  assert stores and all(len(s.split(", ")) == (3 if m % bm else 2) for s in stores), stores
  x_loads = re.findall(r"tt\.load (%\w+(?:, %\w+)*) : tensor<[\dx]+!tt\.ptr<bf16>>", text)
  assert x_loads, text
  assert all(len(s.split(", ")) == (3 if m % bm else 1) for s in x_loads), x_loads
  if gpu_dot == "mma":
    assert "tt.dot" in text
  elif gpu_dot == "mma_pairs":  # the pair's halves joined into the dot's K
    assert "tt.dot" in text and "tt.join" in text
  else:  # multiply-adds, one reduction over the accumulator's k axis after the loop
    assert "tt.dot" not in text and "tt.reduce" in text and "scf.for" in text


@pytest.mark.parametrize("gpu_dot", ["mma_pairs", "mma", "fma"])
@pytest.mark.parametrize("m,split", [(1, 1), (3, 1), (1, 2), (37, 2)])
def test_gpu_call_does_not_pad_x_rows_or_slice_the_output(gpu_dot, m, split):
  # The M tile (16 rows for the tensor cores) overhangs x and the output, masked in the
  # kernel, so the call around it is x's re-layout and, for split K, the parts' sum: no
  # copy of x to whole tiles and, at split_k 1, the kernel's output is the result.
  blocks = _blocks((m, 256, 512), 4, jnp.bfloat16, "gpu", gpu_dot, split_k=split)
  f = lambda x, w: kernels.pow2_matmul(x, w, bits=4, e0=-8, backend="pallas",
                                       platform="gpu", blocks=blocks)
  specs = (jax.ShapeDtypeStruct((m, 512), jnp.bfloat16),
           jax.ShapeDtypeStruct((64, 256), jnp.uint32))
  text = jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
  assert len(calls) == 1
  x_t_rows = re.search(r": \(tensor<\d+x(\d+)x\d+xbf16>", calls[0]).group(1)
  result = re.search(r"-> tensor<([\dx]+)xf32>", calls[0]).group(1)
  assert int(x_t_rows) == m
  assert result == (f"{m}x256" if split == 1 else f"{split}x{m}x256")
  assert "stablehlo.pad" not in text and "stablehlo.slice" not in text
  assert ("stablehlo.reduce" in text) == (split > 1)


# ------------------------------------------------------------------------------------
# Argument errors, raised before tracing.


def _ok_args():
  return jnp.zeros((4, 20), jnp.float32), jnp.zeros((2, 8), jnp.uint32)  # 3-bit: P = 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=6, e0=0), "2..5 bits, got bits=6"),
    (dict(bits=1, e0=0), "2..5 bits"),
    (dict(bits=True, e0=0), "2..5 bits"),
    (dict(bits=3, e0=0.5), "e0 must be"),
    (dict(bits=3, e0=-127), "not all normal"),
    (dict(bits=3, e0=125), "not all normal"),
    (dict(bits=4, e0=0), "packs 4-bit codes into ceil\\(20/8\\)=3 words, but packed has 2"),
    (dict(bits=3, e0=0, k=21), "k=21 but x has 20 columns"),
    (dict(bits=3, e0=0, scale=jnp.ones(7)), "scale must have shape \\(8,\\)"),
    (dict(bits=3, e0=0, bias=jnp.ones((1, 8))), "bias must have shape \\(8,\\)"),
    (dict(bits=3, e0=0, backend="cuda"), "backend must be one of"),
    (dict(bits=3, e0=0, backend="pallas", platform="metal"), "platform must be"),
    (dict(bits=3, e0=0, backend="pallas"), "pass platform='gpu' or 'tpu'"),
    (dict(bits=3, e0=0, backend="pallas", platform="tpu", blocks=Blocks(8, 8, 2, 2)),
     "Blocks.split_k=2 is for the GPU kernel only"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu", blocks=Blocks(16, 48, 16)),
     "on GPU \\(Triton\\) Blocks.n must be a power of two >= 16, got 48"),
    (dict(bits=3, e0=0, backend="pallas", platform="tpu", blocks=Blocks(8, 4, 2)),
     "on TPU Blocks.n=4 must be a multiple of 128"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu",
          blocks=Blocks(16, 16, 16, dot="mma_pairs")),
     "Blocks.dot='mma_pairs' decodes the weights as bfloat16 pairs and multiplies "
     "bfloat16 x; x is float32 \\(use dot='mma' or cast x\\)"),
    (dict(bits=3, e0=0, backend="pallas", platform="tpu",
          blocks=Blocks(8, 8, 2, dot="mma_pairs")),
     "Blocks.dot='mma_pairs' is for the GPU kernel only"),
    (dict(bits=3, e0=0, backend="pallas", platform="tpu", blocks=Blocks(8, 8, 2, dot="fma")),
     "Blocks.dot='fma' is for the GPU kernel only"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu", blocks=Blocks(3, 16, 1, dot="fma")),
     "on GPU \\(Triton\\) Blocks.m must be a power of two, got 3"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu",
          blocks=Blocks(16, 64, 64, dot="fma")),
     "16 \\* 64 \\* 64 = 65536 floats in registers; keep it <= 4096"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu",
          blocks=Blocks(16, 16, 16, num_warps=6)),
     "Blocks.num_warps must be a power of two <= 32 \\(Triton\\), got 6"),
    (dict(bits=3, e0=0, backend="pallas", platform="gpu", blocks=(16, 16, 16)),
     "blocks must be a Blocks \\(or None\\), got \\(16, 16, 16\\)"),
])
def test_matmul_errors(kwargs, match):
  x, packed = _ok_args()
  with pytest.raises(ValueError, match=match):
    kernels.pow2_matmul(x, packed, **kwargs)


def test_matmul_dtype_errors():
  x, packed = _ok_args()
  with pytest.raises(ValueError, match="float32 or bfloat16, got int32"):
    kernels.pow2_matmul(x.astype(jnp.int32), packed, bits=3, e0=0)
  with pytest.raises(ValueError, match="float32 or bfloat16, got float16"):
    kernels.pow2_matmul(x.astype(jnp.float16), packed, bits=3, e0=0)
  with pytest.raises(ValueError, match="uint32 words, got int32"):
    kernels.pow2_matmul(x, packed.astype(jnp.int32), bits=3, e0=0)
  with pytest.raises(ValueError, match="uint32\\[ceil"):
    kernels.pow2_matmul(x, packed[None], bits=3, e0=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_shape=(3, 3, 4, 8)), "x has 5 channels"),
    (dict(kernel_shape=(3, 3, 5, 8), padding="FULL"), "padding must be"),
    (dict(kernel_shape=(3, 3, 5, 8), strides=0), "strides must be"),
    (dict(kernel_shape=(3, 3, 5)), "kernel_shape must be"),
    (dict(kernel_shape=(1, 1, 5, 8)), "packs to \\(1, 8\\) words"),
])
def test_conv_errors(kwargs, match):
  x = jnp.zeros((1, 6, 6, 5), jnp.float32)
  packed = jnp.zeros((5, 8), jnp.uint32)  # 3x3x5 = 45 codes, 10 per word
  with pytest.raises(ValueError, match=match):
    kernels.pow2_conv(x, packed, bits=3, e0=0, **kwargs)
