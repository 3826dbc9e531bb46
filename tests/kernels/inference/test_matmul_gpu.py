"""benchmarks/gpu_pow2_matmul.py without a GPU: every kernel its GPU run compiles
(``shiftjax.benchmarking.gpu_checks``, ``gpu_tiles``) lowers to one Triton call for CUDA
here, and its no-GPU check passes. A GPU session is short and rare; these keep it from
being spent on a case that cannot lower."""

import jax
import jax.numpy as jnp
import pytest

from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax.benchmarking import gpu_checks
from shiftjax.benchmarking import gpu_tiles

_TRITON_TARGET = "__gpu$xla.gpu.triton"
_SHAPES = [(m, kn) for kn in (4096, 8192) for m in (1, 16, 128)]  # the timed grid


def _triton_calls(f, *specs) -> int:
  text = jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
  return text.count(_TRITON_TARGET)


@pytest.mark.parametrize("case", gpu_checks.GPU_CHECKS,
                         ids=lambda c: "x".join(map(str, c[:3])) + f"-{c[3]}bit-"
                         + f"{jnp.dtype(c[4]).name}-{c[6] or 'default'}")
def test_every_gpu_check_lowers_to_one_triton_call(case):
  m, k, n, bits, dtype, affine, gpu_dot = case
  specs = [jax.ShapeDtypeStruct((m, k), dtype),
           jax.ShapeDtypeStruct((-(-k // codes_lib.codes_per_word(bits)), n), jnp.uint32)]
  specs += [jax.ShapeDtypeStruct((n,), jnp.float32)] * (2 * affine)
  blocks = gpu_dot and kernels.default_blocks(m, n, k, bits, dtype, "gpu", gpu_dot)

  def f(x, w, *affine_args):
    scale, bias = affine_args or (None, None)
    return kernels.pow2_matmul(x, w, bits=bits, e0=-(1 << (bits - 1)) - 3, scale=scale,
                               bias=bias, backend="pallas", platform="gpu",
                               blocks=blocks)

  assert _triton_calls(f, *specs) == 1


@pytest.mark.parametrize("case", gpu_checks.CONV_CHECKS, ids=str)
def test_every_gpu_conv_check_lowers_to_one_triton_call(case):
  stride, padding, shape, bits = case
  kh, kw, cin, cout = shape
  words = -(-kh * kw * cin // codes_lib.codes_per_word(bits))
  specs = (jax.ShapeDtypeStruct((8, 32, 32, cin), jnp.float32),
           jax.ShapeDtypeStruct((words, cout), jnp.uint32))
  f = lambda x, w: kernels.pow2_conv(x, w, bits=bits, e0=-(1 << (bits - 1)) - 2,
                                     kernel_shape=shape, strides=stride, padding=padding,
                                     backend="pallas", platform="gpu")
  assert _triton_calls(f, *specs) == 1


@pytest.mark.parametrize("m,kn", _SHAPES)
def test_sweep_starts_at_the_default_and_every_setting_lowers(m, kn):
  configs = gpu_tiles.sweep_configs(m, kn, 4)
  assert configs[0] == kernels.default_blocks(m, kn, kn, 4, jnp.bfloat16, "gpu")
  assert len(set(configs)) == len(configs)  # no setting timed twice (Blocks is frozen)
  dots = {b.dot for b in configs}
  assert {"mma_pairs", "mma"} <= dots and (("fma" in dots) == (m <= 4))
  specs = (jax.ShapeDtypeStruct((m, kn), jnp.bfloat16),
           jax.ShapeDtypeStruct((kn // 8, kn), jnp.uint32))
  for b in configs:
    f = lambda x, w, b=b: kernels.pow2_matmul(x, w, bits=4, e0=-10, backend="pallas",
                                              platform="gpu", blocks=b)
    assert _triton_calls(f, *specs) == 1, b


def test_no_gpu_check_passes_in_interpret_mode():
  assert gpu_checks.correctness(interpret=True)
