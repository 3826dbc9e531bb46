"""Times the Pallas (Triton) packed power-of-two matmul against an XLA bfloat16 dot on GPU.

    python benchmarks/gpu_pow2_matmul.py            # check, then time the grid below
    python benchmarks/gpu_pow2_matmul.py --nosweep  # default tiles only (faster)
    python benchmarks/gpu_pow2_matmul.py --sizes=4096 --ms=1,16

(absl flags: ``--nosweep`` or ``--sweep=false`` is what argparse's ``--no-sweep`` was;
lists are comma-separated.)

On a GPU machine whose python has jax (CUDA) but not shiftjax, and no network to install
it, from the repository root (``shiftjax.kernels`` is the top-level ``kernels/`` folder;
absl, pure python, is copied beside it where that python lacks it):

    mkdir -p /tmp/sj && cp -r shiftjax /tmp/sj/ && cp -r kernels /tmp/sj/shiftjax/kernels
    cp -r "$(python3 -c 'import absl, os; print(os.path.dirname(absl.__file__))')" /tmp/sj/
    PYTHONPATH=/tmp/sj python3 benchmarks/gpu_pow2_matmul.py --max_seconds=420

Pallas' Triton backend, which the kernel uses, warns from jax 0.11 that it is deprecated
(Mosaic GPU is its successor); jax 0.12 still has it.

1. Correctness (``shiftjax.benchmarking.gpu_checks``): the Pallas kernel against the XLA
   path of ``pow2_matmul`` for bits 2..5, float32 and bfloat16 x, shapes that pad in M, N
   and K, each GPU multiply (bfloat16 x's default pair decode, the one-code 'mma', the
   CUDA-core 'fma'); exits 1 on any mismatch.
2. Timing, 4-bit codes, x bfloat16 [M, K], M in {1, 16, 128}, K = N in {4096, 8192}:
   ``pow2_matmul`` (the whole call: x re-layout, kernel, split-K sum) against
   ``jnp.dot(x_bf16, W_bf16)`` and against the XLA path of ``pow2_matmul`` (decode + dot).
   Each timed executable runs the product over R distinct weight copies (at least three
   times the L2 cache in all) so that weights come from HBM, not L2, and the launch
   overhead of one call is amortised. Bandwidth = (weight bytes + x bytes + output bytes) / time.
   With the sweep, more settings are timed too: one knob at a time around the default
   (M/N tiles, K words, split_k, warps), the alternatives ``gpu_kernel_sass.py`` compiles
   (wider N tiles, more warps; both from ``shiftjax.benchmarking.gpu_tiles``), the
   one-code ``Blocks.dot='mma'`` default and, at M <= 4, the CUDA-core ``dot='fma'``
   variant.
   Each shape prints every setting's time, then the best: the table the defaults of
   ``kernels.default_blocks`` are to be picked from.

On a machine without a GPU it says so, runs a tiny interpret-mode check of both Pallas
kernels against the XLA path, and exits 0.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax.benchmarking import gpu_checks
from shiftjax.benchmarking import gpu_tiles
from shiftjax.benchmarking import timing

FLAGS = flags.FLAGS
flags.DEFINE_bool("sweep", True, "Time the sweep of tile settings; --nosweep: the default "
                  "tiles only.")
flags.DEFINE_list("sizes", ["4096", "8192"], "K = N values (multiples of 8).")
flags.DEFINE_list("ms", ["1", "16", "128"], "M values.")
flags.DEFINE_float("max_seconds", None,
                   "Stop sweeping (default tiles only) after this many seconds.")

L2_BYTES = 50 << 20  # H100; H200 also 50 MiB. Weights per timed call: >= 3x this.
_key = gpu_tiles.blocks_key  # (dot, bm, bn, bkw, split_k, warps): a setting's name


def _time(fn, *args, repeats=10) -> float:
  """Median seconds of one call of the compiled ``fn`` (one untimed call first)."""
  return timing.interleaved({"fn": lambda: fn(*args)}, repeats, counters={})["fn"].median


def _copy_bandwidth(elems=1 << 28) -> float:
  """Achievable HBM bandwidth: read + write of a 1 GiB float32 array."""
  a = jnp.ones((elems,), jnp.float32)
  f = jax.jit(lambda a: a * 2.0)
  f(a).block_until_ready()
  t = _time(f, a)
  return 2 * a.nbytes / t


def time_grid(sweep: bool, sizes=(4096, 8192), ms=(1, 16, 128), max_seconds=None) -> None:
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
    packed0 = jnp.asarray(gpu_checks.pack_along_k(codes, bits))
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
      configs = gpu_tiles.sweep_configs(m, kn, bits) if sweep else [
          kernels.default_blocks(m, n, k, bits, jnp.bfloat16, "gpu")]
      results = {}
      for i, b in enumerate(configs):
        if i and max_seconds is not None and time.perf_counter() - start > max_seconds:
          print(f"      time limit: {len(configs) - i} settings not timed", flush=True)
          break
        f = jax.jit(lambda xs, ws, b=b: [
            kernels.pow2_matmul(x, w, bits=bits, e0=e0, backend="pallas", blocks=b)
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


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    print(f"This benchmark needs a GPU; jax sees only {jax.devices()}.")
    print("Running a tiny correctness check of both Pallas kernels in interpret mode:")
    ok = gpu_checks.correctness(interpret=True)
    print("interpret-mode check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
  print(f"Device: {gpus[0].device_kind}, jax {jax.__version__}")
  print("Correctness: Pallas (Triton) kernel vs the XLA path")
  if not gpu_checks.correctness(interpret=False):
    print("Kernel disagrees with the XLA path: not timing it.")
    return 1
  time_grid(sweep=FLAGS.sweep, sizes=[int(s) for s in FLAGS.sizes],
            ms=[int(m) for m in FLAGS.ms], max_seconds=FLAGS.max_seconds)
  return 0


if __name__ == "__main__":
  app.run(main)
