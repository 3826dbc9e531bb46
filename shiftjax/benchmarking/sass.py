"""The Pallas GPU kernel's machine code for sm_90 (H100/H200), read without a GPU.

jax lowers ``pow2_matmul``'s Pallas kernel to Triton IR on any machine; ``triton_kernel``
takes that IR and launch configuration, ``compile_sm90`` hands it to the ``triton``
package's compiler (Triton IR -> PTX -> ptxas -> cubin; ``pip install -e ".[sass]"``), and
the readers below count registers, spills, resident programs per SM and the main loop's
instructions by kind. ``benchmarks/gpu_kernel_sass.py`` prints them per tile setting.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from shiftjax import codes as codes_lib
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


def triton_kernel(m, k, n, bits, dtype,
                  blocks: kernels.Blocks | None = None) -> TritonKernel:
  """The Triton IR and launch configuration jax lowers ``pow2_matmul`` to for CUDA, with
  ``blocks`` (None: ``default_blocks``)."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering as triton_lowering  # pylint: disable=g-import-not-at-top

  f = lambda x, w: kernels.pow2_matmul(x, w, bits=bits, e0=-8, backend="pallas",
                                       platform="gpu", blocks=blocks)
  p = codes_lib.codes_per_word(bits)
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


def cuobjdump(cubin: bytes, flag: str) -> str:
  """What triton's ``cuobjdump`` prints for ``cubin`` (``'-sass'``, ``'-res-usage'``)."""
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(cubin)
    f.flush()
    return subprocess.run([_nvidia_tool("cuobjdump"), flag, f.name], check=True,
                          capture_output=True, text=True).stdout


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
  """Registers per thread and local-memory stack bytes (register spills) per thread."""
  usage = cuobjdump(cubin, "-res-usage")
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


def analyse(m, kn, bits, dtype, blocks: kernels.Blocks, sms=132, clock_ghz=1.98) -> dict:
  """The static costs of ``pow2_matmul`` at [m, kn] x [kn, kn] with ``blocks``, compiled
  for sm_90 (``sms`` SMs at ``clock_ghz``): registers, spills, shared memory, resident
  programs and waves, the main loop's instructions by kind and per weight word, x bytes
  over weight bytes, and the weight bandwidth at which instruction issue saturates."""
  k = n = kn
  kernel = triton_kernel(m, k, n, bits, dtype, blocks)
  cubin, shared = compile_sm90(kernel)
  registers, stack = registers_and_stack(cubin)
  loop = main_loop(cuobjdump(cubin, "-sass"))
  threads = 32 * kernel.num_warps
  programs = kernel.grid[0] * kernel.grid[1] * kernel.grid[2]
  resident = resident_programs(registers, shared, threads)
  words_per_step = blocks.k_words * blocks.n
  per_word = sum(loop.values()) * kernel.num_warps / words_per_step
  x_bytes = kernel.grid[1] * m * k * jnp.dtype(dtype).itemsize
  w_bytes = kernel.grid[0] * -(-k // codes_lib.codes_per_word(bits)) * n * 4
  issue_bound = _WARP_ISSUE_PER_CLOCK * sms * clock_ghz * 1e9 / per_word * 4
  kind = lambda ops: sum(v for op, v in loop.items() if op in ops)
  return dict(
      registers=registers, stack=stack, shared=shared, resident=resident,
      programs=programs, waves=programs / (resident * sms) if resident else float("inf"),
      loop=sum(loop.values()), per_word=per_word, spills=loop["LDL"] + loop["STL"],
      decode=kind(_DECODE_OPS), products=kind(_PRODUCT_OPS), loads=kind(_LOAD_OPS),
      x_over_w=x_bytes / w_bytes, issue_bound=issue_bound)
