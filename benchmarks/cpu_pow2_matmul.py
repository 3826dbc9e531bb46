"""Times the native CPU matmul by packed power-of-two weights against XLA's dots.

    python benchmarks/cpu_pow2_matmul.py                  # the issue's grid (a few minutes)
    python benchmarks/cpu_pow2_matmul.py --quick          # K = N = 4096, M = 1 and 16
    python benchmarks/cpu_pow2_matmul.py --shapes 8192x8192 --ms 1 --bits 4 --lm_shapes
    python benchmarks/cpu_pow2_matmul.py --goals   # the issue's goals: dots vs tiled only

For each weight shape K x N and each M (rows of x, float32), the contenders are:

  f32 dot     XLA's ``x @ w``, w float32 [K, N] (4 bytes per weight)
  bf16 dot    XLA's ``x @ w`` in bfloat16 (2 bytes per weight)
  native      ``shiftjax.kernels.pow2_matmul`` on the CPU default: the C++ kernel
              (kernels/cpu/cpu_pow2_matmul.cc), weights packed in `bits` bits
  native bf16 the same with x in bfloat16 (on CPUs with AVX512-BF16: bfloat16 dot
              products, half the instructions; ``--nobf16_x`` leaves it out)
  tiled       the native kernel on the same words in its tiled layout
              (``kernels.tile_words``, converted once before timing, as ``load_model``
              does): each tile of 128 columns contiguous; float32 and bfloat16 x
              (``--notiled`` leaves them out)
  XLA path    the same call with ``backend='xla'``: unpack + decode + dot in XLA

Each round calls every contender once, in a rotating order, so load from other
processes hits all alike; times are medians over ``--reps`` rounds and ratios are of
medians measured together. GB/s is of the packed weights (the bytes the kernel must
read); the machine's read bandwidth is measured in the same run (two threads summing a
512 MiB float32 buffer with numpy, before and after the grid), and as one more contender
in every round ("read": the same sum over 256 MiB, timed after a 20 ms sleep, as XLA's
idle pool threads spin for a while after each call and slowed the numpy threads 3x), so
that it sees the same load from other processes as the kernels: the % columns are of
that interleaved median, per shape and M. The last level cache (32 MiB on
the 2-core EPYC this was written on) can hold a whole 2- or 3-bit 8192 x 8192 weight:
the dots called between two native calls evict most of it, but not necessarily all;
``--evict_mib`` reads a buffer larger than the cache before every timed call (untimed),
so that every call reads its weights from memory, as in a model whose other layers run
between two calls of one. ``--goals`` times what the goals compare, and nothing else:
K = N = 8192, M = 1, 16, 128, 2-4 bits, the float32 dot against the tiled layout with
float32 and bfloat16 x, caches evicted (the words layout, the XLA path and the bfloat16
dot left out; with them in the rounds, the tiled layout's M = 1 times were 20-40 % slower
here, for a reason not established).
"""

from __future__ import annotations

import statistics
import threading
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax.benchmarking import timing
from shiftjax import kernels
from shiftjax.kernels.cpu import native

_SHAPES = flags.DEFINE_string(
    "shapes", "4096x4096,8192x8192,8192x28672", "weight shapes KxN, comma-separated")
_LM_SHAPES = flags.DEFINE_bool(
    "lm_shapes", False, "also small language-model layer shapes (256x768, 256x1024, "
    "1024x256)")
_MS = flags.DEFINE_string("ms", "1,4,16,128", "rows of x, comma-separated")
_BITS = flags.DEFINE_string("bits", "2,3,4", "code widths, comma-separated")
_REPS = flags.DEFINE_integer("reps", 15, "rounds (each calls every contender once)")
_XLA_PATH = flags.DEFINE_bool("xla_path", True, "also time today's XLA decode path")
_QUICK = flags.DEFINE_bool("quick", False, "K = N = 4096, M = 1 and 16 only")
_BF16_X = flags.DEFINE_bool("bf16_x", True, "also time the native kernel on bfloat16 x")
_TILED = flags.DEFINE_bool("tiled", True, "also time the native kernel on the tiled layout")
_WORDS = flags.DEFINE_bool("words", True, "time the native kernel on the words layout")
_BF16_DOT = flags.DEFINE_bool("bf16_dot", True, "time XLA's bfloat16 dot")
_EVICT_MIB = flags.DEFINE_integer("evict_mib", 0, "before every timed call, read a buffer "
                                  "of this many MiB (untimed; 0: none)")
_GOALS = flags.DEFINE_bool("goals", False, "K = N = 8192, M = 1, 16, 128, the f32 dot and "
                           "the tiled layout only, --evict_mib=64")

LM_SHAPES = "256x768,256x1024,1024x256"
E0 = -6


def _parse(text: str, sep: str = ",") -> list[int]:
  return [int(v) for v in text.split(sep) if v]


def _summer(mib: int):
  """A call reading ``mib`` MiB: two threads each summing half of a float32 buffer far
  larger than the caches (numpy releases the GIL in the sum)."""
  halves = np.array_split(np.ones(mib * 2**20 // 4, np.float32), 2)

  def read() -> None:
    threads = [threading.Thread(target=h.sum) for h in halves]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  return read


READ_MIB = 256  # the interleaved read contender's buffer


def read_bandwidth(mib: int = 512, reps: int = 7) -> float:
  """GB/s of ``_summer(mib)``, median of ``reps`` calls."""
  read = _summer(mib)

  def once() -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start
  once()
  return mib * 2**20 / statistics.median(once() for _ in range(reps)) / 1e9


def _contenders(k: int, n: int, m: int, bits_list, rng, xla_path: bool, bf16_x: bool,
                tiled: bool, words: bool = True, bf16_dot: bool = True):
  """{name: (jitted fn, args)} and {name: packed bytes} for one shape and M."""
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
  dot = jax.jit(lambda x, w: x @ w)
  fns = {"f32 dot": (dot, (x, w))}
  if bf16_dot:
    fns["bf16 dot"] = (dot, (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))
  packed_bytes = {}
  for bits in bits_list:
    codes = rng.integers(0, 1 << bits, (k, n), dtype=np.uint8)
    packed = jax.device_put(codes_lib.pack(codes, bits, axis=0))
    packed_bytes[bits] = packed.nbytes
    tiles = jax.block_until_ready(kernels.tile_words(packed))
    for name, backend, dtype, weights in (("native", None, jnp.float32, packed),
                                          ("native bf16", None, jnp.bfloat16, packed),
                                          ("tiled", None, jnp.float32, tiles),
                                          ("tiled bf16", None, jnp.bfloat16, tiles),
                                          ("XLA path", "xla", jnp.float32, packed)):
      if ((backend == "xla" and not xla_path) or (dtype == jnp.bfloat16 and not bf16_x)
          or (name.startswith("tiled") and not tiled)
          or (name.startswith("native") and not words)):
        continue
      f = jax.jit(lambda x, p, bits=bits, backend=backend: kernels.pow2_matmul(
          x, p, bits=bits, e0=E0, backend=backend))
      fns[f"{name} {bits}"] = (f, (x.astype(dtype), weights))
  return fns, packed_bytes


def _check(fns, bits_list):
  """The native kernel agrees with the XLA path (to float32 summation order), and on the
  tiled layout with itself on the words, bit for bit."""
  for bits in bits_list:
    for name in ("", " bf16"):
      if f"tiled{name} {bits}" in fns and f"native{name} {bits}" in fns:
        (f, args), (g, targs) = fns[f"native{name} {bits}"], fns[f"tiled{name} {bits}"]
        if not np.array_equal(np.asarray(f(*args)), np.asarray(g(*targs))):
          raise SystemExit(f"native{name} differs between the words and tiled layouts")
    if f"XLA path {bits}" not in fns or f"native {bits}" not in fns:
      continue
    (f, args), (g, _) = fns[f"native {bits}"], fns[f"XLA path {bits}"]
    a, b = np.asarray(f(*args)), np.asarray(g(*args))
    scale = np.abs(b).max() + 1e-30
    if np.abs(a - b).max() > 1e-4 * scale:
      raise SystemExit(f"native and XLA path differ at {bits} bits: "
                       f"{np.abs(a - b).max()} (max |y| {scale})")


def _time(fns, reps: int, read, evict=None) -> dict[str, float]:
  """Median seconds per call, the contenders (and ``read``, as "read") called in a
  rotating order each round; ``evict()`` (untimed) before each contender's call."""
  calls = {name: (lambda f=f, a=args: f(*a)) for name, (f, args) in fns.items()}
  seconds = []

  def timed_read():  # after XLA's idle pool threads stop spinning (they slowed it 3x)
    time.sleep(0.02)
    start = time.perf_counter()
    read()
    seconds.append(time.perf_counter() - start)
  def before_each(name):
    if evict is not None and name != "read":  # the read contender measures memory itself
      evict()
  timings = timing.interleaved({**calls, "read": timed_read}, reps, rotate=True,
                               before_each=before_each)
  return {**{name: t.median for name, t in timings.items()},
          "read": statistics.median(seconds[-reps:])}


def main(argv):
  del argv
  if not native.available():
    raise SystemExit("the native CPU kernels are not available (CPU backend and g++ needed)")
  shapes, ms, reps = _SHAPES.value, _parse(_MS.value), _REPS.value
  words, xla_path, bf16_dot, evict_mib = (_WORDS.value, _XLA_PATH.value, _BF16_DOT.value,
                                          _EVICT_MIB.value)
  if _QUICK.value:
    shapes, ms = "4096x4096", [1, 16]
  if _GOALS.value:
    shapes, ms, words, xla_path, bf16_dot = "8192x8192", [1, 16, 128], False, False, False
    evict_mib = evict_mib or 64
  if _LM_SHAPES.value:
    shapes += "," + LM_SHAPES
  shapes = [tuple(_parse(s, "x")) for s in shapes.split(",") if s]
  bits_list = _parse(_BITS.value)
  rng = np.random.default_rng(0)

  bandwidth = [read_bandwidth()]
  print(f"jax {jax.__version__}, {jax.device_count()} CPU device(s); "
        f"{reps} rounds; read bandwidth before the grid: {bandwidth[0]:.1f} GB/s",
        flush=True)
  rows = []
  read = _summer(READ_MIB)
  evict = np.ones(evict_mib * 2**20 // 4, np.float32).sum if evict_mib else None
  for k, n in shapes:
    for m in ms:
      fns, packed_bytes = _contenders(k, n, m, bits_list, rng, xla_path, _BF16_X.value,
                                      _TILED.value, words, bf16_dot)
      _check(fns, bits_list)
      t = _time(fns, reps, read, evict)
      read_gbs = READ_MIB * 2**20 / t["read"] / 1e9
      print(f"  {k}x{n} M={m}: read bandwidth interleaved {read_gbs:.1f} GB/s", flush=True)
      for bits in bits_list:
        native_s = t.get(f"native {bits}")
        xla_s, bf16_s = t.get(f"XLA path {bits}"), t.get(f"native bf16 {bits}")
        tiled_s, tiled_bf16_s = t.get(f"tiled {bits}"), t.get(f"tiled bf16 {bits}")
        rows.append((k, n, m, bits, t["f32 dot"], t.get("bf16 dot"), native_s, bf16_s, xla_s,
                     packed_bytes[bits], tiled_s, tiled_bf16_s, read_gbs))
        print(f"  {k}x{n} M={m} {bits}-bit: native {(native_s or 0) * 1e3:.3f} ms, tiled "
              f"{(tiled_s or 0) * 1e3:.3f} ms, f32 dot {t['f32 dot'] * 1e3:.3f} ms",
              flush=True)
      del fns
  bandwidth.append(read_bandwidth())
  bw = statistics.mean(bandwidth)
  print(f"\nread bandwidth: {bandwidth[0]:.1f} GB/s before, {bandwidth[1]:.1f} GB/s after "
        f"the grid (mean {bw:.1f} GB/s); the % below are of the interleaved 'read' "
        f"contender's, per shape and M (column 'read GB/s')\n")
  gbs = lambda nbytes, t: (f"{nbytes / t / 1e9:.1f} ({100 * nbytes / t / 1e9 / bw:.0f} %)"
                          if t else "-")
  ms_text = lambda t: f"{t * 1e3:.2f}" if t is not None else "-"
  vs = lambda f32, t: f"{t * 1e3:.3f} ({f32 / t:.2f}x)" if t else "-"
  print("Words layout (as in the file), and the tiled layout; 'a (b)': a ms, b = f32 dot / a;"
        " GB/s of packed weights (% of the read bandwidth).\n")
  print("| K x N | M | bits | read GB/s | f32 dot ms | bf16 dot ms | XLA path ms "
        "| native ms (x) | native GB/s (%) | native, bf16 x | tiled ms (x) "
        "| tiled GB/s (%) | tiled, bf16 x | tiled bf16 x GB/s (%) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for k, n, m, bits, f32, bf16, nat, nat_bf16, xla, nbytes, til, til_bf16, bw in rows:
    print(f"| {k} x {n} | {m} | {bits} | {bw:.1f} | {f32 * 1e3:.2f} | {ms_text(bf16)} | "
          f"{ms_text(xla)} | {vs(f32, nat)} | {gbs(nbytes, nat)} | {vs(f32, nat_bf16)} | "
          f"{vs(f32, til)} | {gbs(nbytes, til)} | {vs(f32, til_bf16)} | "
          f"{gbs(nbytes, til_bf16)} |")

if __name__ == "__main__":
  app.run(main)
