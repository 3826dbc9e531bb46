"""Times decoding a packed [K, N] weight on XLA CPU: the words layout against bit planes.

    python benchmarks/decode_layouts.py                       # 4096x4096 and 576x64
    python benchmarks/decode_layouts.py --shapes=1024x1024 --bits=3,5 --reps=31

(absl flags; lists are comma-separated.)

Each weight is random codes of a zero-free DenseShift format
(``CodeFormat(bits, e0=0, has_zero=False)``), packed on the host two ways and put on
the device; each variant is one jitted call from packed uint32 words to float32 weights:

  words     ``codes.unpack`` along axis 0 (``floor(32/N)`` codes per word, the kernel
            layout) then ``codes.decode``
  planes    ``codes.unpack_bitplanes`` (exactly N bits per code, 32 codes per N words)
            then ``codes.decode``

Both give the same float weights (checked). Repetitions alternate between the two
variants, in a rotating order (``shiftjax.benchmarking.timing``), so load from other
processes hits both alike; the times are medians and the ratio is of the medians, measured
together: it holds on a shared machine, the absolute times do not.
"""

from __future__ import annotations

import functools

from absl import app
from absl import flags
import jax
import numpy as np

import shiftjax as sj
from shiftjax import codes as sc
from shiftjax.benchmarking import timing

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["4096x4096", "576x64"],
                  "KxN weight shapes (576x64: a ResNet-20 3x3 64->64 conv kernel as "
                  "[9*64, 64]).")
flags.DEFINE_list("bits", ["2", "3", "4", "5"], "Code widths.")
flags.DEFINE_integer("reps", 0, "Repetitions per variant; 0: about 0.5 s of decoding per "
                     "variant and width, 11 to 301.")


def _parse_shapes(items: list[str]) -> list[tuple[int, int]]:
  shapes = []
  for item in items:
    k, n = item.lower().split("x")
    shapes.append((int(k), int(n)))
  return shapes


def _variants(k: int, n: int, bits: int, seed: int = 0):
  """{name: (jitted fn, device words)} and the stored bits per weight of each."""
  fmt = sc.CodeFormat(bits, e0=0, has_zero=False)
  codes = np.random.default_rng(seed).integers(0, 1 << bits, (k, n)).astype(np.uint8)
  words = sc.pack(codes, bits, axis=0)
  planes = sc.pack_bitplanes(codes, bits)
  stored = {"words": words.nbytes * 8 / codes.size, "planes": planes.nbytes * 8 / codes.size}
  fns = {
      "words": (jax.jit(lambda w: sc.decode(sc.unpack(w, bits, k, axis=0), fmt)),
                jax.device_put(words)),
      "planes": (jax.jit(lambda w: sc.decode(sc.unpack_bitplanes(w, bits, (k, n)), fmt)),
                 jax.device_put(planes)),
  }
  want = np.asarray(sc.decode(codes, fmt))
  for name, (fn, arg) in fns.items():  # compiles, and checks both decode the same
    got = np.asarray(jax.block_until_ready(fn(arg)))
    if got.shape != (k, n) or not np.array_equal(got, want):
      raise SystemExit(f"{k}x{n} {bits}-bit {name}: decoded weights differ")
  return fns, stored


def _interleaved(fns: dict, reps: int) -> dict:
  """{name: (fn, arg)} -> {name: median wall seconds}, repetitions rotating the order
  (the functions are compiled already)."""
  calls = {name: functools.partial(fn, arg) for name, (fn, arg) in fns.items()}
  t = timing.interleaved(calls, reps, warmup=0, rotate=True, counters={})
  return {name: x.median for name, x in t.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  shapes = _parse_shapes(args.shapes)
  widths = [int(b) for b in args.bits]

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
        f"device(s) ({jax.devices()[0].device_kind}), shiftjax {sj.__version__}; "
        "DenseShift CodeFormat(bits, e0=0, has_zero=False) -> float32")
  for k, n in shapes:
    print(f"\n[{k}, {n}] weight ({k * n} codes): median ms wall per decode")
    print(f"{'bits':>4s} | {'stored bits/weight':>18s} | {'words ms':>9s} | "
          f"{'planes ms':>9s} | {'planes/words':>12s} | {'reps':>4s}")
    print(f"{'':>4s} | {'words':>8s}  {'planes':>8s} |")
    for bits in widths:
      fns, stored = _variants(k, n, bits)
      reps = args.reps
      if reps <= 0:  # from one timed call of each
        once = sum(_interleaved(fns, 1).values())
        reps = int(np.clip(round(1.0 / max(once, 1e-6)), 11, 301))
      t = _interleaved(fns, reps)
      print(f"{bits:4d} | {stored['words']:8.2f}  {stored['planes']:8.2f} | "
            f"{t['words'] * 1e3:9.3f} | {t['planes'] * 1e3:9.3f} | "
            f"{t['planes'] / t['words']:12.2f} | {reps:4d}")


if __name__ == "__main__":
  app.run(main)
