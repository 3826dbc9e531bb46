"""Times the Pallas (Triton) packed power-of-two matmul against an XLA bfloat16 dot on GPU.

    python benchmarks/gpu_pow2_matmul.py            # check, then time the grid below
    python benchmarks/gpu_pow2_matmul.py --no-sweep # default tiles only (faster)

On a GPU machine whose python has jax (CUDA) but not shiftjax, and no network to install
it, from the repository root (``shiftjax.kernels`` is the top-level ``kernels/`` folder):

    mkdir -p /tmp/sj && cp -r shiftjax /tmp/sj/ && cp -r kernels /tmp/sj/shiftjax/kernels
    PYTHONPATH=/tmp/sj python3 benchmarks/gpu_pow2_matmul.py --max_seconds=420

Pallas' Triton backend, which the kernel uses, warns from jax 0.11 that it is deprecated
(Mosaic GPU is its successor); jax 0.12 still has it.

1. Correctness: the Pallas kernel against the XLA path of ``pow2_matmul`` for bits 2..5,
   float32 and bfloat16 x, shapes that pad in M, N and K, each GPU multiply (bfloat16 x's
   default pair decode, the one-code 'mma', the CUDA-core 'fma'); exits 1 on any mismatch.
2. Timing, 4-bit codes, x bfloat16 [M, K], M in {1, 16, 128}, K = N in {4096, 8192}:
   ``pow2_matmul`` (the whole call: x re-layout, kernel, split-K sum) against
   ``jnp.dot(x_bf16, W_bf16)`` and against the XLA path of ``pow2_matmul`` (decode + dot).
   Each timed executable runs the product over R distinct weight copies (at least three
   times the L2 cache in all) so that weights come from HBM, not L2, and the launch
   overhead of one call is amortised. Bandwidth = (weight bytes + x bytes + output bytes) / time.
   With the sweep, more settings are timed too: one knob at a time around the default
   (M/N tiles, K words, split_k, warps), the alternatives ``gpu_kernel_sass.py`` compiles
   (wider N tiles, more warps), the one-code ``gpu_dot='mma'`` default and, at M <= 4,
   the CUDA-core ``gpu_dot='fma'`` variant.
   Each shape prints every setting's time, then the best: the table the defaults of
   ``kernels.default_blocks`` are to be picked from.

On a machine without a GPU it says so, runs a tiny interpret-mode check of both Pallas
kernels against the XLA path, and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax import kernels

import gpu_kernel_sass  # pylint: disable=g-bad-import-order  (this folder's)

L2_BYTES = 50 << 20  # H100; H200 also 50 MiB. Weights per timed call: >= 3x this.


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


def _pack(codes: np.ndarray, bits: int) -> jax.Array:
  """[K, N] codes -> uint32 [ceil(K/P), N] words (``shiftjax.codes.pack`` along K)."""
  return codes_lib.pack(jnp.asarray(codes, jnp.uint8), bits, axis=0)


def _problem(rng, m, k, n, bits, dtype, affine):
  codes = rng.integers(0, 1 << bits, size=(k, n))
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32) if affine else None
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if affine else None
  return jnp.asarray(_pack(codes, bits)), x, scale, bias


def _check(x, packed, bits, e0, scale, bias, label, **kernel_kwargs) -> bool:
  """Compares the Pallas kernel with the XLA path; tolerance from f32 summation order."""
  want = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                             backend="xla")
  got = kernels.pow2_matmul(x, packed, bits=bits, e0=e0, scale=scale, bias=bias,
                            **kernel_kwargs)
  k = x.shape[-1]
  w = codes_lib.decode(kernels.unpack_codes(packed, bits, k),
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
      blocks = dict(block_m=8, block_n=16, block_k=2 * (32 // bits)) if interpret else {}
      if interpret and platform == "gpu":
        blocks["split_k"] = 2  # the small-M path: partial products summed in XLA
      if gpu_dot:
        blocks["gpu_dot"] = gpu_dot
      if interpret and gpu_dot == "fma":
        blocks["block_m"] = 1  # the one-row accumulator
      try:
        ok &= _check(x, packed, bits, e0, scale, bias, label, platform=platform,
                     **extra, **blocks)
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
    packed = jnp.asarray(_pack(codes, bits))
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


def _time(fn, *args, repeats=10) -> float:
  """Median seconds of one call of the compiled ``fn`` (already warmed up)."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _copy_bandwidth(elems=1 << 28) -> float:
  """Achievable HBM bandwidth: read + write of a 1 GiB float32 array."""
  a = jnp.ones((elems,), jnp.float32)
  f = jax.jit(lambda a: a * 2.0)
  f(a).block_until_ready()
  t = _time(f, a)
  return 2 * a.nbytes / t


def _key(b: kernels.Blocks) -> tuple:
  return (b.dot, b.m, b.n, b.k_words, b.split_k, b.num_warps)


def sweep_configs(m: int, kn: int, bits: int) -> list[kernels.Blocks]:
  """The default first, then one knob at a time around it, then the alternatives of
  ``gpu_kernel_sass.candidates`` (with the 'mma' default, and the 'fma' one at M <= 4);
  no repeats."""
  d = kernels.default_blocks(m, kn, kn, bits, jnp.bfloat16, "gpu")
  knobs = ([dict(m=t) for t in (32, 64, 128) if 16 <= t <= max(16, m)]
           + [dict(n=t) for t in (32, 64, 128, 256) if t <= 128 or m > 16]
           + [dict(k_words=t) for t in (16, 32, 64)]
           + [dict(split_k=t) for t in (1, 2, 4, 8)]
           + [dict(num_warps=t) for t in (4, 8)])
  configs = [d] + [dataclasses.replace(d, **knob) for knob in knobs]
  configs += [b for _, b in gpu_kernel_sass.candidates(m, kn, bits, jnp.bfloat16)]
  return list({_key(b): b for b in configs}.values())


def timing(sweep: bool, sizes=(4096, 8192), ms=(1, 16, 128), max_seconds=None) -> None:
  """Prints the table; with ``max_seconds``, settings past that much time are skipped
  (the default tiles are always timed), so that one limited GPU session still ends
  with every shape's row."""
  start = time.perf_counter()
  bits, e0 = 4, -10
  rng = np.random.default_rng(1)
  hbm = _copy_bandwidth()
  print(f"\nCopy bandwidth (a * 2 over 1 GiB f32): {hbm / 1e9:.0f} GB/s")
  header = (f"{'M':>4} {'K=N':>5} | {'bf16 dot us':>11} {'GB/s':>6} | {'pow2 us':>8} "
            f"{'GB/s':>6} {'speedup':>7} | {'xla-decode us':>13} | (dot, bm, bn, bkw, split_k, warps)")
  print("\n4-bit codes, x bfloat16, time per matmul (median), speedup = bf16 dot / pow2")
  print(header)
  print("-" * len(header))
  for kn in sizes:
    k = n = kn
    w_bytes_packed = (k // 8) * n * 4
    w_bytes_bf16 = k * n * 2
    copies = max(2, -(-3 * L2_BYTES // w_bytes_packed))
    codes = rng.integers(0, 16, size=(k, n))
    packed0 = jnp.asarray(_pack(codes, bits))
    w0 = codes_lib.decode(jnp.asarray(codes), codes_lib.CodeFormat(bits=bits, e0=e0),
                          jnp.bfloat16)  # the same weights, dense
    # Distinct copies (rolled columns) so that every call streams its own weights.
    packed_all = [jnp.roll(packed0, i, axis=1) for i in range(copies)]
    dense_all = [jnp.roll(w0, i, axis=1) for i in range(copies)]
    del w0, packed0
    for m in ms:
      # One x per copy too, so that XLA cannot share pow2_matmul's x re-layout.
      xs = [jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16) for _ in range(copies)]
      act_bytes = m * k * 2
      dense = jax.jit(lambda xs, ws: [jnp.dot(x, w) for x, w in zip(xs, ws)])
      t_dense = _time(dense, xs, dense_all) / copies
      bw_dense = (w_bytes_bf16 + act_bytes + m * n * 2) / t_dense
      xla_path = jax.jit(lambda xs, ws: [
          kernels.pow2_matmul(x, w, bits=bits, e0=e0, backend="xla")
          for x, w in zip(xs, ws)])
      t_xla = _time(xla_path, xs, packed_all) / copies
      configs = sweep_configs(m, kn, bits) if sweep else [
          kernels.default_blocks(m, n, k, bits, jnp.bfloat16, "gpu")]
      results = {}
      for i, b in enumerate(configs):
        if i and max_seconds is not None and time.perf_counter() - start > max_seconds:
          print(f"      time limit: {len(configs) - i} settings not timed", flush=True)
          break
        f = jax.jit(lambda xs, ws, b=b: [
            kernels.pow2_matmul(x, w, bits=bits, e0=e0, backend="pallas",
                                **gpu_kernel_sass.tile_kwargs(b, bits))
            for x, w in zip(xs, ws)])
        try:
          results[_key(b)] = _time(f, xs, packed_all) / copies
        except Exception as e:  # pylint: disable=broad-except
          msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
          print(f"      {_key(b)} failed: {type(e).__name__}: {msg}", flush=True)
      if not results:
        print(f"{m:>4} {kn:>5} | every tile setting failed", flush=True)
        continue
      best = min(results, key=results.get)
      t_best = results[best]
      bw_best = (w_bytes_packed + act_bytes + m * n * 4) / t_best
      line = (f"{m:>4} {kn:>5} | {t_dense * 1e6:>11.1f} {bw_dense / 1e9:>6.0f} | "
              f"{t_best * 1e6:>8.1f} {bw_best / 1e9:>6.0f} {t_dense / t_best:>6.2f}x | "
              f"{t_xla * 1e6:>13.1f} | best {best}")
      if sweep and _key(configs[0]) in results:
        line += f"; default {_key(configs[0])}: {results[_key(configs[0])] * 1e6:.1f} us"
      print(line, flush=True)
      if sweep:
        print("      sweep: " + ", ".join(f"{c} {t * 1e6:.1f}" for c, t in results.items()),
              flush=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-sweep", action="store_true",
                      help="time the default tiles only")
  parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192],
                      help="K = N values (multiples of 8)")
  parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128], help="M values")
  parser.add_argument("--max_seconds", type=float, default=None,
                      help="stop sweeping (default tiles only) after this many seconds")
  args = parser.parse_args()
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    print(f"This benchmark needs a GPU; jax sees only {jax.devices()}.")
    print("Running a tiny correctness check of both Pallas kernels in interpret mode:")
    ok = correctness(interpret=True)
    print("interpret-mode check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
  print(f"Device: {gpus[0].device_kind}, jax {jax.__version__}")
  print("Correctness: Pallas (Triton) kernel vs the XLA path")
  if not correctness(interpret=False):
    print("Kernel disagrees with the XLA path: not timing it.")
    return 1
  timing(sweep=not args.no_sweep, sizes=args.sizes, ms=args.ms,
         max_seconds=args.max_seconds)
  return 0


if __name__ == "__main__":
  sys.exit(main())
