"""shiftjax.benchmarking.sass (what benchmarks/gpu_kernel_sass.py prints) without a GPU:
the loop reader, the occupancy arithmetic, the Triton IR it compiles and the tile
alternatives of shiftjax.benchmarking.gpu_tiles; with the triton compiler, the sm_90 code."""

import jax.numpy as jnp
import pytest

from shiftjax import kernels
from shiftjax.benchmarking import gpu_tiles
from shiftjax.benchmarking import sass

# A cuobjdump -sass shaped listing: a short loop (0x0040..0x0060) and a longer one
# (0x0080..0x00f0) whose body has predicated and modified instructions.
_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0040*/                   IADD3 R2, R2, 0x1, RZ ;                /* 0x0000000102027810 */
        /*0050*/                   ISETP.NE.AND P1, PT, R2, 0x4, PT ;     /* 0x000000040200780c */
        /*0060*/               @P1 BRA 0x40 ;                             /* 0xfffffffc0000194 */
        /*0080*/                   LDG.E.128 R4, desc[UR6][R8.64] ;       /* 0x0000000608047981 */
        /*0090*/                   SHF.R.U32.HI R10, RZ, 0x4, R4 ;        /* 0x000000040a0a7819 */
        /*00a0*/                   LOP3.LUT R11, R10, 0x7, RZ, 0xc0, !PT ; /* 0x000000070a0b7812 */
        /*00b0*/                   LOP3.LUT R12, R4, 0x80000000, R11, 0xf8, !PT ; /* 0x0 */
        /*00c0*/                   HMMA.16816.F32.BF16 R16, R20, R24, R16 ; /* 0x000000182010723c */
        /*00d0*/                   STL [R1], R12 ;                        /* 0x0000000c01007387 */
        /*00e0*/               @!P0 IADD3 R3, R3, 0x1, RZ ;               /* 0x0000000103038810 */
        /*00f0*/               @P0 BRA 0x80 ;                             /* 0xffffff800000094 */
        /*0100*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0110*/                   BRA 0x110;                             /* 0xfffffffc00fc7947 */
"""


def test_main_loop_counts_the_longest_backward_branch_by_opcode():
  loop = sass.main_loop(_LISTING)
  assert dict(loop) == {"LDG": 1, "SHF": 1, "LOP3": 2, "HMMA": 1, "STL": 1, "IADD3": 1,
                        "BRA": 1}


def test_main_loop_refuses_a_listing_without_a_loop():
  straight = "\n".join(line for line in _LISTING.splitlines() if "BRA 0x" not in line
                       or "0x110" in line)  # the self-branch after EXIT is not backward
  with pytest.raises(ValueError, match="no backward branch"):
    sass.main_loop(straight)


@pytest.mark.parametrize("registers,shared,threads,want", [
    # 128 registers x 32 lanes = 4096 per warp, 4 warps: 16384 -> 4 per SM; 33 KiB of
    # shared memory -> 6; threads -> 16: registers bind.
    (128, 32 << 10, 128, 4),
    # 255 registers round up to 8192 per warp; 8 warps take the whole register file.
    (255, 136 << 10, 256, 1),
    # 232 KiB of shared memory do not fit an SM (228 KiB): no program runs.
    (128, 232 << 10, 256, 0),
    # Tiny programs: 2048 threads per SM bind (16 programs of 128 threads).
    (32, 0, 128, 16),
])
def test_resident_programs(registers, shared, threads, want):
  assert sass.resident_programs(registers, shared, threads) == want


def test_triton_kernel_has_the_default_launch_configuration():
  try:
    kernel = sass.triton_kernel(1, 4096, 4096, 4, jnp.bfloat16)
  except (ImportError, AttributeError):
    pytest.skip("jax internals for reading Triton IR moved")
  d = kernels.default_blocks(1, 4096, 4096, 4, jnp.bfloat16, "gpu")
  # Grid (M tiles, N tiles, K parts).
  assert kernel.grid == (1, 4096 // d.n, d.split_k)
  assert kernel.num_warps == d.num_warps
  assert "tt.func" in kernel.ir and "tt.dot" in kernel.ir and "tt.join" in kernel.ir
  fma = sass.triton_kernel(1, 4096, 4096, 4, jnp.bfloat16, kernels.default_blocks(
      1, 4096, 4096, 4, jnp.bfloat16, "gpu", "fma"))
  assert "tt.dot" not in fma.ir and "tt.reduce" in fma.ir


def test_candidates_keep_the_programs_of_the_default():
  # split_k scales with the tile area (at most 8 parts of two K steps or more), so every
  # alternative launches at least half the default's programs: the comparison is of tiles,
  # not of a starved grid.
  words = 4096 // 8
  for m in (1, 16, 128):
    d = kernels.default_blocks(m, 4096, 4096, 4, jnp.bfloat16, "gpu")
    programs = lambda b: -(-m // b.m) * (4096 // b.n) * b.split_k
    for label, b in gpu_tiles.candidates(m, 4096, 4, jnp.bfloat16):
      assert words >= 2 * b.split_k * b.k_words, label
      assert programs(b) >= programs(d) // 2, label


# Tensor-core products are HMMA or, where Triton uses sm_90's warpgroup MMA, HGMMA.
@pytest.mark.parametrize("gpu_dot,m,products", [
    ("mma", 16, ("HMMA", "HGMMA")), ("mma_pairs", 1, ("HMMA", "HGMMA")),
    ("fma", 1, ("FFMA",))])
def test_kernel_compiles_for_sm90_without_spills(gpu_dot, m, products):
  # Only where the optional triton compiler is installed (pip install -e ".[sass]").
  pytest.importorskip("triton")
  d = kernels.default_blocks(m, 2048, 1024, 4, jnp.bfloat16, "gpu", gpu_dot)
  kernel = sass.triton_kernel(m, 2048, 1024, 4, jnp.bfloat16, d)
  cubin, shared = sass.compile_sm90(kernel)
  registers, stack = sass.registers_and_stack(cubin)
  loop = sass.main_loop(sass.cuobjdump(cubin, "-sass"))
  assert sum(loop[p] for p in products) > 0
  assert stack == 0 and loop["LDL"] == loop["STL"] == 0
  assert registers <= 255 and shared < 228 << 10
  assert sass.resident_programs(registers, shared, 32 * d.num_warps) >= 1
