"""Static cost of the Pallas GPU kernel, without a GPU: its H100/H200 machine code.

    pip install -e ".[sass]"             # the triton compiler, with ptxas and cuobjdump
    python benchmarks/gpu_kernel_sass.py
    python benchmarks/gpu_kernel_sass.py --sizes=4096 --ms=1,16 --bits=3

(absl flags; lists are comma-separated. The compiling and reading are
``shiftjax.benchmarking.sass``, the tile settings ``shiftjax.benchmarking.gpu_tiles``.)

jax lowers ``pow2_matmul``'s Pallas kernel to Triton IR on any machine (that is what the
lowering tests check). This script hands that IR to the ``triton`` package's compiler
for sm_90, the H100/H200 target (Triton IR -> PTX -> ptxas -> cubin; no GPU or driver is
needed), disassembles the cubin and reads, for each tile setting of a few shapes:

* registers per thread and shared memory per program (``cuobjdump -res-usage`` and the
  compiler's metadata), hence how many programs an SM holds at once, and how many
  programs the grid has;
* the main K loop (the longest backward branch): machine instructions per iteration and
  per packed weight word, by kind (decode: integer and conversion instructions; the
  products: HMMA, HGMMA (sm_90's warpgroup MMA) or FFMA; loads);
* bytes per call: packed weights (read once per M tile) and x (read once per output-column
  tile, x's rows only: a tile's rows past them are masked), and the packed-weight
  bandwidth at which instruction issue alone would saturate the SMs (4 warp instructions
  per clock per SM, ``--sms`` SMs at ``--clock_ghz``): an upper bound, not a prediction.

These are static counts from one Triton version (``triton==3.4.0``; XLA's own Triton, which
compiles the kernel on a real GPU, may schedule differently), meant to choose between tile
settings before the one GPU run of ``benchmarks/gpu_pow2_matmul.py`` times them.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax.numpy as jnp

from shiftjax.benchmarking import gpu_tiles
from shiftjax.benchmarking import sass

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["4096", "8192"], "K = N values.")
flags.DEFINE_list("ms", ["1", "16", "128"], "M values.")
flags.DEFINE_integer("bits", 4, "Code width.")
flags.DEFINE_integer("sms", 132, "SMs (H100 SXM / H200: 132).")
flags.DEFINE_float("clock_ghz", 1.98, "Boost clock in GHz.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('This analysis needs the triton compiler: pip install -e ".[sass]"')
    return 1
  print(f"Triton {triton.__version__}, sm_90, {args.sms} SMs at {args.clock_ghz} GHz; "
        f"{args.bits}-bit codes, x bfloat16\n")
  header = (f"{'M':>4} {'K=N':>5} {'dot':>9} {'tiles: (bm, bn, bkw, split) warps':>40} "
            f"{'regs':>4} {'spill':>5} {'smem KiB':>8} {'progs/SM':>8} {'programs':>8} "
            f"{'waves':>5} | {'loop instr':>10} {'decode':>6} {'product':>7} {'load':>5} "
            f"{'instr/word':>10} | {'x/w bytes':>9} {'issue bound GB/s':>16}")
  print(header)
  print("-" * len(header))
  for kn in map(int, args.sizes):
    for m in map(int, args.ms):
      for label, blocks in gpu_tiles.candidates(m, kn, args.bits, jnp.bfloat16):
        tiles = (f"{label}: ({blocks.m}, {blocks.n}, {blocks.k_words}, {blocks.split_k}) "
                 f"{blocks.num_warps}")
        try:
          r = sass.analyse(m, kn, args.bits, jnp.bfloat16, blocks, sms=args.sms,
                           clock_ghz=args.clock_ghz)
        except Exception as e:  # pylint: disable=broad-except
          print(f"{m:>4} {kn:>5} {blocks.dot:>9} {tiles:>40} failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
          continue
        print(f"{m:>4} {kn:>5} {blocks.dot:>9} {tiles:>40} {r['registers']:>4} "
              f"{r['stack']:>5} {r['shared'] / 1024:>8.0f} {r['resident']:>8} "
              f"{r['programs']:>8} {r['waves']:>5.2f} | {r['loop']:>10} {r['decode']:>6} "
              f"{r['products']:>7} {r['loads']:>5} {r['per_word']:>10.2f} | "
              f"{r['x_over_w']:>9.2f} {r['issue_bound'] / 1e9:>16.0f}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
