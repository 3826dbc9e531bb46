"""The correctness checks ``benchmarks/gpu_pow2_matmul.py`` runs before it times anything:
the Pallas kernel against the XLA path of ``pow2_matmul`` (and ``pow2_conv``).

``GPU_CHECKS`` run on a GPU (bits 2..5, float32 and bfloat16 x, shapes that pad in M, N
and K, each GPU multiply); ``INTERPRET_CHECKS`` run without one, each interpreted as the
TPU and the GPU kernel. The tests lower every GPU case for CUDA on a machine without a
GPU, so that a short GPU session is not spent on a case that cannot lower. Needs jax and
numpy only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax import kernels


# Correctness cases: (M, K, N, bits, x dtype, scale and bias, gpu_dot). M that is not a
# multiple of the M tile takes the masked x rows; bfloat16 x without gpu_dot takes the
# pair decode ('mma_pairs'), float32 x the one-code 'mma'.
GPU_CHECKS = (
    (1, 4096, 4096, 4, jnp.bfloat16, True, None),
    (1, 4096, 4096, 4, jnp.bfloat16, True, "mma"),
    (16, 1000, 300, 2, jnp.float32, True, None),
    (16, 1000, 300, 2, jnp.bfloat16, True, None),
    (37, 777, 200, 3, jnp.bfloat16, False, None),
    (37, 777, 200, 3, jnp.bfloat16, False, "mma"),
    (128, 4100, 513, 4, jnp.float32, True, None),
    (130, 3000, 1000, 5, jnp.bfloat16, True, None),
    (3, 96, 48, 5, jnp.float32, False, None),
    (1, 4096, 4096, 4, jnp.bfloat16, True, "fma"),
    (3, 1000, 300, 3, jnp.float32, True, "fma"),
)
# Without a GPU: small shapes, each interpreted as the TPU and the GPU kernel.
INTERPRET_CHECKS = (
    (5, 70, 20, 2, jnp.float32, True, None), (9, 41, 24, 3, jnp.bfloat16, False, None),
    (3, 100, 33, 4, jnp.bfloat16, True, None), (6, 50, 16, 5, jnp.float32, True, None),
    (3, 100, 33, 5, jnp.bfloat16, True, "mma"), (1, 100, 33, 4, jnp.bfloat16, True, "fma"),
)
# pow2_conv's Pallas path on the GPU: (stride, padding, (kh, kw, cin, cout), bits).
CONV_CHECKS = ((1, "SAME", (3, 3, 64, 64), 3), (2, "SAME", (3, 3, 32, 128), 4),
               (2, "VALID", (1, 1, 64, 128), 2))


def pack_along_k(codes: np.ndarray, bits: int) -> jax.Array:
  """[K, N] codes -> uint32 [ceil(K/P), N] words (``shiftjax.codes.pack`` along K)."""
  return codes_lib.pack(jnp.asarray(codes, jnp.uint8), bits, axis=0)


def _problem(rng, m, k, n, bits, dtype, affine):
  codes = rng.integers(0, 1 << bits, size=(k, n))
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32) if affine else None
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if affine else None
  return jnp.asarray(pack_along_k(codes, bits)), x, scale, bias


def _check(x, packed, bits, e0, scale, bias, label, **kernel_kwargs) -> bool:
  """Compares the Pallas kernel with the XLA path; tolerance from f32 summation order."""
  want = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                             backend="xla")
  got = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                            **kernel_kwargs)
  k = x.shape[-1]
  w = codes_lib.decode(codes_lib.unpack(packed, bits, k),
                       codes_lib.CodeFormat(bits=bits, e0=e0))
  # |sum order A - sum order B| <= 2 * gamma_K * sum |x| |w|.
  bound = 2 * k * 2.0**-24 * jnp.dot(jnp.abs(x.astype(jnp.float32)), jnp.abs(w),
                                     precision=jax.lax.Precision.HIGHEST)
  if scale is not None:
    bound = bound * scale
  bound = bound + 2.0**-22 * jnp.abs(want) + 1e-30
  err = jnp.abs(got - want)
  ok = got.shape == want.shape and got.dtype == jnp.float32 and bool(jnp.all(err <= bound))
  print(f"  {'ok  ' if ok else 'FAIL'} {label}: max err / bound = "
        f"{float(jnp.max(err / bound)):.3g}", flush=True)
  return ok


def correctness(interpret: bool) -> bool:
  """Runs every check (``INTERPRET_CHECKS`` interpreted, else ``GPU_CHECKS`` and the conv
  checks on the GPU), printing one line each; True when all agree."""
  rng = np.random.default_rng(0)
  extra = dict(backend="pallas_interpret") if interpret else dict(backend="pallas")
  cases = INTERPRET_CHECKS if interpret else GPU_CHECKS
  ok = True
  for m, k, n, bits, dtype, affine, gpu_dot in cases:
    packed, x, scale, bias = _problem(rng, m, k, n, bits, dtype, affine)
    e0 = -(1 << (bits - 1)) - 3
    platforms = ("tpu", "gpu") if interpret else (None,)
    for platform in platforms:
      if gpu_dot and platform == "tpu":
        continue  # a GPU-only variant
      label = (f"{m}x{k}x{n} {bits}-bit x {jnp.dtype(dtype).name} "
               f"{'scale+bias' if affine else 'plain'}" + (f" {gpu_dot}" if gpu_dot else "")
               + (f" ({platform} kernel, interpreted)" if interpret else ""))
      blocks = None
      if gpu_dot or interpret:
        blocks = kernels.default_blocks(m, n, k, bits, dtype, platform or "gpu", gpu_dot)
      if interpret:
        blocks = dataclasses.replace(blocks, m=8, n=16, k_words=2)
      if interpret and platform == "gpu":  # the small-M path: partial products summed
        blocks = dataclasses.replace(blocks, split_k=2)  # in XLA
      if interpret and gpu_dot == "fma":
        blocks = dataclasses.replace(blocks, m=1)  # the one-row accumulator
      try:
        ok &= _check(x, packed, bits, e0, scale, bias, label, platform=platform,
                     blocks=blocks, **extra)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  FAIL {label}: {type(e).__name__}: {e}")
        ok = False
  if not interpret:
    ok &= _check_conv(rng)
  return ok


def _check_conv(rng) -> bool:
  """pow2_conv's Pallas path (im2col + kernel) against its XLA path (decode + conv)."""
  ok = True
  for stride, padding, (kh, kw, cin, cout), bits in CONV_CHECKS:
    codes = rng.integers(0, 1 << bits, size=(kh * kw * cin, cout))
    packed = jnp.asarray(pack_along_k(codes, bits))
    x = jnp.asarray(rng.standard_normal((8, 32, 32, cin)), jnp.float32)
    e0 = -(1 << (bits - 1)) - 2
    kwargs = dict(bits=bits, e0=e0, kernel_shape=(kh, kw, cin, cout), strides=stride,
                  padding=padding)
    want = kernels.pow2_conv(x, packed, backend="xla", **kwargs)
    got = kernels.pow2_conv(x, packed, backend="pallas", **kwargs)
    # Summation order differs (im2col blocks vs XLA's conv): compare to the output scale.
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    good = got.shape == want.shape and err < 1e-5
    ok &= good
    print(f"  {'ok  ' if good else 'FAIL'} pow2_conv {kh}x{kw}x{cin}->{cout} stride "
          f"{stride} {padding} {bits}-bit: max err / max |out| {err:.3g}", flush=True)
  return ok
