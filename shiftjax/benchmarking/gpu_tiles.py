"""Tile settings of the GPU kernel to compare: the alternatives ``benchmarks/gpu_kernel_sass.py``
compiles for sm_90 and the sweep ``benchmarks/gpu_pow2_matmul.py`` times on a GPU.

A setting is a ``kernels.Blocks`` (M and N tiles, K words per step, split_k, the GPU
multiply, warps), passed to ``pow2_matmul`` as its ``blocks``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax import kernels


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
  words = -(-kn // codes_lib.codes_per_word(bits))
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


def blocks_key(b: kernels.Blocks) -> tuple:
  """``(dot, m, n, k_words, split_k, num_warps)``: how the GPU benchmark names a setting."""
  return (b.dot, b.m, b.n, b.k_words, b.split_k, b.num_warps)


def sweep_configs(m: int, kn: int, bits: int) -> list[kernels.Blocks]:
  """The default first, then one knob at a time around it, then the alternatives of
  ``candidates`` (with the 'mma' default, and the 'fma' one at M <= 4); no repeats."""
  d = kernels.default_blocks(m, kn, kn, bits, jnp.bfloat16, "gpu")
  knobs = ([dict(m=t) for t in (32, 64, 128) if 16 <= t <= max(16, m)]
           + [dict(n=t) for t in (32, 64, 128, 256) if t <= 128 or m > 16]
           + [dict(k_words=t) for t in (16, 32, 64)]
           + [dict(split_k=t) for t in (1, 2, 4, 8)]
           + [dict(num_warps=t) for t in (4, 8)])
  configs = [d] + [dataclasses.replace(d, **knob) for knob in knobs]
  configs += [b for _, b in candidates(m, kn, bits, jnp.bfloat16)]
  return list({blocks_key(b): b for b in configs}.values())
