"""Static cost of the Pallas GPU kernel, without a GPU: its H100/H200 machine code.

    pip install -e ".[sass]"             # the triton compiler, with ptxas and cuobjdump
    python benchmarks/gpu_kernel_sass.py

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

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from shiftjax import kernels

# sm_90 limits (H100 / H200).
_REGISTERS_PER_SM = 65536
_SHARED_PER_SM = 228 << 10
_SHARED_RESERVED_PER_PROGRAM = 1 << 10
_THREADS_PER_SM = 2048
_PROGRAMS_PER_SM = 32
_WARP_ISSUE_PER_CLOCK = 4  # four schedulers per SM

_DECODE_OPS = ("LOP3", "SHF", "IMAD", "IADD3", "VIADD", "F2FP", "PRMT", "I2F", "F2F")
_PRODUCT_OPS = ("HMMA", "HGMMA", "FFMA", "FMUL", "FADD")
_LOAD_OPS = ("LDG", "LDGSTS", "LDS", "LDSM", "STS", "LDGDEPBAR", "DEPBAR", "BAR")


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  ir: str  # Triton IR (MLIR text)
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int


def tile_kwargs(blocks: kernels.Blocks, bits: int) -> dict:
  """``pow2_matmul``'s keyword arguments that select the tiles and multiply ``blocks``."""
  return dict(block_m=blocks.m, block_n=blocks.n,
              block_k=blocks.k_words * kernels.codes_per_word(bits),
              split_k=blocks.split_k, gpu_dot=blocks.dot, num_warps=blocks.num_warps)


def triton_kernel(m, k, n, bits, dtype, **pow2_kwargs) -> TritonKernel:
  """The Triton IR and launch configuration jax lowers ``pow2_matmul`` to for CUDA."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering as triton_lowering  # pylint: disable=g-import-not-at-top

  f = lambda x, w: kernels.pow2_matmul(x, w, bits=bits, e0=-8, backend="pallas",
                                       platform="gpu", **pow2_kwargs)
  p = kernels.codes_per_word(bits)
  specs = (jax.ShapeDtypeStruct((m, k), dtype),
           jax.ShapeDtypeStruct((-(-k // p), n), jnp.uint32))
  module = jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).compiler_ir()
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          if child.operation.name == "stablehlo.custom_call":
            calls.append(child.operation.attributes["mhlo.backend_config"])
          walk(child.operation)

  walk(module.operation)
  if len(calls) != 1:
    raise RuntimeError(f"expected one Triton call, found {len(calls)}")
  config = {a.name: a.attr for a in calls[0]}
  integer = lambda name: int(str(config[name]).split(":")[0])
  with triton_lowering._new_ir_context():  # pylint: disable=protected-access
    text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm(
        enable_debug_info=False)
  return TritonKernel(text, tuple(integer(f"grid_{a}") for a in "xyz"),
                      integer("num_warps"), integer("num_stages"))


def _nvidia_tool(name: str) -> str:
  import triton  # pylint: disable=g-import-not-at-top
  return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sm90(kernel: TritonKernel) -> tuple[bytes, int]:
  """(cubin, dynamic shared memory bytes) of the kernel compiled for sm_90."""
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(kernel.ir)
    compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": kernel.num_warps,
                                       "num_stages": kernel.num_stages})
  return compiled.asm["cubin"], int(compiled.metadata.shared)


def _cuobjdump(cubin: bytes, flag: str) -> str:
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(cubin)
    f.flush()
    return subprocess.run([_nvidia_tool("cuobjdump"), flag, f.name], check=True,
                          capture_output=True, text=True).stdout


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
  """Registers per thread and local-memory stack bytes (register spills) per thread."""
  usage = _cuobjdump(cubin, "-res-usage")
  registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
  if not registers:
    raise RuntimeError("cuobjdump -res-usage printed no register count")
  return int(registers.group(1)), int(stack.group(1)) if stack else 0


def main_loop(sass: str) -> collections.Counter:
  """Opcode counts (without modifiers or predicates) of the instructions inside the
  longest backward branch of a ``cuobjdump -sass`` listing."""
  instructions = [(int(a, 16), text.strip()) for a, text in
                  re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
  loops = []
  for address, text in instructions:
    branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
    if branch and int(branch.group(1), 16) < address:
      loops.append((address - int(branch.group(1), 16), int(branch.group(1), 16), address))
  if not loops:
    raise ValueError("no backward branch: the listing has no loop")
  _, first, last = max(loops)
  opcodes = collections.Counter()
  for address, text in instructions:
    if first <= address <= last:
      words = text.split()
      opcode = words[1] if words[0].startswith("@") else words[0]
      opcodes[opcode.split(".")[0]] += 1
  return opcodes


def resident_programs(registers: int, shared: int, threads: int) -> int:
  """Programs (thread blocks) one SM holds at once: the tightest sm_90 limit."""
  per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 per warp
  by_registers = _REGISTERS_PER_SM // (per_warp * (threads // 32))
  by_shared = _SHARED_PER_SM // (shared + _SHARED_RESERVED_PER_PROGRAM)  # 0: no fit
  return min(by_registers, by_shared, _THREADS_PER_SM // threads, _PROGRAMS_PER_SM)


def analyse(m, kn, bits, dtype, blocks: kernels.Blocks, num_stages=None, sms=132,
            clock_ghz=1.98) -> dict:
  k = n = kn
  kernel = triton_kernel(m, k, n, bits, dtype, num_stages=num_stages,
                         **tile_kwargs(blocks, bits))
  cubin, shared = compile_sm90(kernel)
  registers, stack = registers_and_stack(cubin)
  loop = main_loop(_cuobjdump(cubin, "-sass"))
  threads = 32 * kernel.num_warps
  programs = kernel.grid[0] * kernel.grid[1] * kernel.grid[2]
  resident = resident_programs(registers, shared, threads)
  words_per_step = blocks.k_words * blocks.n
  per_word = sum(loop.values()) * kernel.num_warps / words_per_step
  x_bytes = kernel.grid[1] * m * k * jnp.dtype(dtype).itemsize
  w_bytes = kernel.grid[0] * -(-k // kernels.codes_per_word(bits)) * n * 4
  issue_bound = _WARP_ISSUE_PER_CLOCK * sms * clock_ghz * 1e9 / per_word * 4
  kind = lambda ops: sum(v for op, v in loop.items() if op in ops)
  return dict(
      registers=registers, stack=stack, shared=shared, resident=resident,
      programs=programs, waves=programs / (resident * sms) if resident else float("inf"),
      loop=sum(loop.values()), per_word=per_word, spills=loop["LDL"] + loop["STL"],
      decode=kind(_DECODE_OPS), products=kind(_PRODUCT_OPS), loads=kind(_LOAD_OPS),
      x_over_w=x_bytes / w_bytes, issue_bound=issue_bound)


def _alternative(default: kernels.Blocks, words: int, max_split: int = 8,
                 **change) -> kernels.Blocks:
  """``default`` with ``change``, split_k scaled so the grid keeps about as many programs
  (at most ``max_split`` parts of at least two K steps each)."""
  b = dataclasses.replace(default, **change)
  split = default.split_k * (b.m * b.n) // (default.m * default.n)
  split = min(split, max_split)
  while split > 1 and words < 2 * split * b.k_words:
    split //= 2
  return dataclasses.replace(b, split_k=max(1, split))


def candidates(m, kn, bits, dtype):
  """(label, Blocks): the default multiply's tiles and alternatives that trade x traffic
  (wider N tiles), programs (split_k), registers (K words, warps); then the other
  multiplies' defaults: one code at a time ('mma', what bfloat16 x used before the pair
  decode) and, at M <= 4, the CUDA cores ('fma')."""
  words = -(-kn // kernels.codes_per_word(bits))
  d = kernels.default_blocks(m, kn, kn, bits, dtype, "gpu")
  if m <= 16:
    # The pair kernel at M = 1 takes 130 registers, 3 programs per SM: 512 programs are
    # 1.29 waves. n=128 k=16 takes 110 (4 per SM); split 16 gives it the default's grid.
    alternatives = [("n=128 k=16", dict(n=128, k_words=16)),
                    ("n=128 k=16 split<=16", dict(n=128, k_words=16, max_split=16)),
                    ("n=128 8 warps", dict(n=128, num_warps=8)),
                    ("n=32 k=64", dict(n=32, k_words=64))]
  else:
    alternatives = [("4 warps", dict(num_warps=4)), ("n=64 4 warps", dict(n=64, num_warps=4)),
                    ("m=128 n=64", dict(m=128, n=64))]
  out = [("default", d)] + [(label, _alternative(d, words, **change))
                            for label, change in alternatives]
  if d.dot != "mma":
    out.append(("default", kernels.default_blocks(m, kn, kn, bits, dtype, "gpu", "mma")))
  if m <= 4:
    f = kernels.default_blocks(m, kn, kn, bits, dtype, "gpu", "fma")
    out += [("default", f), ("n=32", _alternative(f, words, n=32))]
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
  parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 128])
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--sms", type=int, default=132, help="H100 SXM / H200: 132")
  parser.add_argument("--clock_ghz", type=float, default=1.98, help="boost clock")
  args = parser.parse_args()
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
  for kn in args.sizes:
    for m in args.ms:
      for label, blocks in candidates(m, kn, args.bits, jnp.bfloat16):
        tiles = (f"{label}: ({blocks.m}, {blocks.n}, {blocks.k_words}, {blocks.split_k}) "
                 f"{blocks.num_warps}")
        try:
          r = analyse(m, kn, args.bits, jnp.bfloat16, blocks, sms=args.sms,
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
  sys.exit(main())
