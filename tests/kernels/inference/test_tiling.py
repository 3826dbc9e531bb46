"""Tests of shiftjax.kernels.inference.tiling: the default tiles of the Pallas matmul on
GPU and TPU, ``Blocks``' field checks and ``resolve_blocks``' platform rules (the errors
``pow2_matmul`` raises for them are in test_matmul.py)."""

import dataclasses

import jax.numpy as jnp
import pytest

from shiftjax.kernels.inference import tiling


@pytest.mark.parametrize("m", [1, 2, 3, 16, 200])
def test_default_fma_tiles_fit_the_register_accumulator(m):
  for bits, k, n in [(4, 4096, 4096), (3, 4096, 1000), (5, 300, 24)]:
    b = tiling.default_blocks(m, n, k, bits, jnp.bfloat16, "gpu", "fma")
    assert b.dot == "fma"
    # x's rows (no 16-row minimum), at most 16.
    assert b.m == min(16, 1 << max(0, (m - 1).bit_length()))
    assert b.m * b.k_words * b.n <= tiling.FMA_MAX_ACCUMULATOR
    for v in (b.m, b.n, b.k_words):
      assert v & (v - 1) == 0  # Triton tiles are powers of two
  # The tensor cores' pair decode for bfloat16 x, one code at a time for float32.
  assert tiling.default_blocks(1, 4096, 4096, 4, jnp.bfloat16, "gpu").dot == "mma_pairs"
  assert tiling.default_blocks(1, 4096, 4096, 4, jnp.float32, "gpu").dot == "mma"
  assert tiling.default_dot(jnp.bfloat16) == "mma_pairs"
  assert tiling.default_dot(jnp.float32) == "mma"


def test_default_gpu_tiles_split_k_and_warps():
  small = tiling.default_blocks(1, 4096, 4096, 4, jnp.bfloat16, "gpu")
  # 64 (M, N) tiles of 64 columns; split into 8 parts of 2 steps of 32 words each.
  assert (small.m, small.n, small.k_words, small.split_k, small.num_warps) == (
      16, 64, 32, 8, 4)
  assert tiling.default_blocks(16, 8192, 8192, 4, jnp.bfloat16, "gpu").split_k == 4
  assert tiling.default_blocks(1, 4096, 256, 4, jnp.bfloat16, "gpu").split_k == 1  # short K
  assert tiling.default_blocks(1, 4096, 4096, 4, jnp.bfloat16, "tpu").split_k == 1
  # M = 128: 64 x 128 tiles (8 warps hold that accumulator without spilling); 64 tiles
  # at N = 4096 fill half the SMs, so K splits in two; 128 tiles at N = 8192 do not.
  large = tiling.default_blocks(128, 4096, 4096, 4, jnp.bfloat16, "gpu")
  assert (large.m, large.n, large.split_k, large.num_warps) == (64, 128, 2, 8)
  assert tiling.default_blocks(128, 8192, 8192, 4, jnp.bfloat16, "gpu").split_k == 1
  assert tiling.default_blocks(32, 4096, 4096, 4, jnp.bfloat16, "gpu").num_warps == 4


def test_given_blocks_pass_through_and_none_takes_the_default():
  d = tiling.default_blocks(128, 4096, 4096, 4, jnp.bfloat16, "gpu")
  assert tiling.resolve_blocks(None, 128, 4096, 4096, 4, jnp.bfloat16, "gpu", False) == d
  four = dataclasses.replace(d, num_warps=4)
  got = tiling.resolve_blocks(four, 128, 4096, 4096, 4, jnp.bfloat16, "gpu", False)
  assert got is four and got.n == 128
  # The interpreter takes any tile, not only Triton's or Mosaic's.
  odd = tiling.Blocks(m=3, n=5, k_words=7)
  assert tiling.resolve_blocks(odd, 4, 20, 20, 3, jnp.float32, "tpu", True) is odd


@pytest.mark.parametrize("fields,match", [
    (dict(m=0), "Blocks.m must be a positive integer, got 0"),
    (dict(n=-16), "Blocks.n must be a positive integer, got -16"),
    (dict(k_words=2.0), "Blocks.k_words must be a positive integer, got 2.0"),
    (dict(split_k=0), "Blocks.split_k must be a positive integer, got 0"),
    (dict(num_warps=True), "Blocks.num_warps must be a positive integer, got True"),
    (dict(num_stages=0), "Blocks.num_stages must be a positive integer, got 0"),
    (dict(dot="simt"),
     "Blocks.dot must be one of \\('mma', 'fma', 'mma_pairs'\\), got 'simt'"),
])
def test_bad_fields_are_errors_naming_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    tiling.Blocks(**{**dict(m=16, n=16, k_words=16), **fields})


def test_blocks_are_hashable_static_arguments():
  b = tiling.Blocks(16, 64, 32, 8, "mma_pairs", 4, 3)
  assert hash(b) == hash(tiling.Blocks(16, 64, 32, 8, "mma_pairs", 4, 3))
  assert tiling.Blocks(16, 64, 32).num_stages is None  # Triton's default
