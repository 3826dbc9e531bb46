"""2-D convolution whose gradients are fast on XLA:CPU (issue 7).

``conv2d`` is ``lax.conv_general_dilated`` over NHWC input and an HWIO kernel, as flax's
``nn.Conv`` calls it. With ``fast_grad`` its backward pass is our own:

* kernel gradient: the sum over images and output pixels of the shifted (strided)
  slices of the padded input times the output cotangent, as one matmul per chunk of
  images, the chunks in a ``fori_loop``. For stride 1 the column taps are shifted copies
  of x and the row taps shifted copies of the cotangent, so the matmul is
  ``[K, kw*Ci]^T @ [K, kh*Co]`` and the operands are copied kw and kh times, not kh*kw.
* input gradient: the transposed conv written as forward convs with the flipped,
  in/out-swapped kernel, one per output phase when strided (``_input_grad``).

Why, measured on the 2-core CPU (jax 0.10.2; ``benchmarks/conv_grad.py`` prints it):

* XLA writes a kernel gradient as a conv whose contraction runs over the batch, which on
  CPU needs x transposed to [C, H, W, N]. In a network XLA fuses the producers of x
  (BatchNorm, ReLU, residual adds, several blocks deep) into that transpose and
  recomputes them in its badly strided loop: in a ResNet-20 train step these transposes
  cost more than all the convs. Our loop body reads x as a buffer (nothing can be fused
  into a loop) and transposes nothing. ResNet-20 step: about 0.7x the time.
* Inside a ``lax.scan`` or ``while`` body XLA:CPU leaves the gradient convs in their
  non-canonical layouts and runs a naive loop: a conv gradient in a scan (gradient
  accumulation) ran 10-60x slower than outside. Here both backward passes are canonical
  convs or matmuls, as fast in a scan as outside.
* A single conv whose inputs are already in memory: XLA's gradient is about as fast
  (1x1 shortcut convs: ours 2x faster).

``fast_grad=None`` turns the path on when JAX's default backend is the CPU (decided at
trace time); elsewhere the plain conv is differentiated by JAX as usual. The forward is
the same op either way. The custom gradient has no forward mode (``jax.jvp``, grad of
grad); ``vmap`` is untested.

``eigen_conv_options()`` is the other half of fast CPU training, a compiler option for
the jitted step: XLA:CPU (jaxlib 0.10) hands f32 convolutions with more than 16 channels
to YNNPACK, which ran each on one thread here, while its Eigen convolutions use every
core. Keeping YNNPACK for reductions only (its default list minus convolutions) made the
ResNet-20 step 0.86-0.87x the time (``benchmarks/train_step.py``); in a one-off comparison
keeping YNNPACK's dots as well, or its elementwise fusions, was slower than reductions only.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from shiftjax.kernels.cpu import native

# flax's nn.Conv with a 4-D input
_DN = ("NHWC", "HWIO", "NHWC")

# Input bytes per loop step of the kernel gradient. The copies of a chunk then stay in
# cache; 0.25-1 MiB measured alike in a ResNet-20 step, 0.25 MiB best on single convs.
_CHUNK_BYTES = 1 << 18

Padding = str | Sequence[tuple[int, int]]


# XLA:CPU's libraries for fusions: YNNPACK for reductions only, convolutions on Eigen.
_EIGEN_CONVS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def default_fast_grad() -> bool:
  """Whether ``fast_grad=None`` means on: only when JAX's default backend is the CPU."""
  return jax.default_backend() == "cpu"


@functools.cache
def eigen_conv_options() -> dict[str, str]:
  """``jax.jit`` compiler options that run CPU convolutions on Eigen (all cores).

  Empty when the default backend is not the CPU or this jaxlib does not know the option
  (it is experimental; compiling with an unknown option is an error, so it is probed on
  a trivial function once per process).
  """
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_EIGEN_CONVS).lower(0.0).compile()
  except Exception:  # pylint: disable=broad-except  # jaxlib without the option
    return {}
  return dict(_EIGEN_CONVS)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = (1, 1),
           padding: Padding = "SAME", *, fast_grad: bool | None = None) -> jax.Array:
  """2-D convolution, NHWC input [N, H, W, Ci], HWIO kernel [kh, kw, Ci, Co] -> [N, Ho, Wo, Co].

  Args:
    strides: (sh, sw) or one int for both.
    padding: 'SAME', 'VALID' (or any string ``lax.padtype_to_pads`` takes) or explicit
      ((lo, hi), (lo, hi)).
    fast_grad: use the CPU-fast backward pass; None: on when the default backend is CPU.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d takes NHWC input and an HWIO kernel (both 4-D), got shapes "
                     f"{x.shape} and {kernel.shape}")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"input has {x.shape[-1]} channels but the kernel {kernel.shape} "
                     f"expects {kernel.shape[2]} (HWIO)")
  strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)  # hashable: a static arg
  if fast_grad is None:
    fast_grad = default_fast_grad()
  if not fast_grad:
    return _plain(x, kernel, strides, padding)
  return _fast(x, kernel, strides, _explicit(padding, x.shape, kernel.shape[:2], strides))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         *, fast_grad: bool | None = None):
  """Drop-in for ``lax.conv_general_dilated`` (e.g. ``nn.Conv(conv_general_dilated=...)``).

  Plain 2-D NHWC/HWIO convs without dilation, groups, precision or output type go through
  ``conv2d`` (fast gradient on CPU, or as ``fast_grad`` says); any other call goes to lax
  unchanged.
  """
  call = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or rhs.ndim != 4:
    return call()
  ones = lambda d: d is None or all(v == 1 for v in d)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN) and ones(lhs_dilation)
      and ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
      and precision is None and preferred_element_type is None):
    return conv2d(lhs, rhs, window_strides, padding, fast_grad=fast_grad)
  return call()


def _plain(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _explicit(padding, x_shape, k_hw, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], k_hw, strides, padding))
  return padding


def _forward(x, kernel, strides, pads):
  """The conv on the native CPU kernel where it applies, else XLA's."""
  if native.supports_conv(x, kernel):
    return native.conv(x, kernel, strides, pads)
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fast(x, kernel, strides, pads):
  return _forward(x, kernel, strides, pads)


def _fast_fwd(x, kernel, strides, pads):
  return _forward(x, kernel, strides, pads), (x, kernel)


def _fast_bwd(strides, pads, res, g):
  x, kernel = res
  k_hw = kernel.shape[:2]
  dx = _input_grad(g, kernel, x.shape, strides, pads)
  dk = _kernel_grad(x, g, k_hw, strides, pads)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_fast.defvjp(_fast_fwd, _fast_bwd)


def _input_grad(g, kernel, x_shape, strides, pads):
  """The transposed conv as forward convs, one per output phase (canonical, loop-safe).

  With stride s, input row r = s*a + p receives only the kernel taps i = (p + lo) mod s,
  + s, + 2s, ...: each phase p is a stride-1 conv of g with that slice of the kernel
  (flipped, in/out swapped), and the phases interleave into dx. XLA's own transposed conv
  (g dilated by s) multiplies s*s - 1 of every s*s products by inserted zeros; this was
  2-4x faster on the strided convs of a ResNet. Stride 1 is a single phase: the usual
  transposed conv.
  """
  n, h, w, ci = x_shape
  sh, sw = strides
  a, b = -(-h // sh), -(-w // sw)  # rows and columns of every phase (ragged ones cropped)
  rows = []
  for ph in range(sh):
    first_h, pads_h = _phase(ph, sh, kernel.shape[0], pads[0][0], a, g.shape[1])
    cols = []
    for pw in range(sw):
      first_w, pads_w = _phase(pw, sw, kernel.shape[1], pads[1][0], b, g.shape[2])
      taps = kernel[first_h::sh, first_w::sw]
      if taps.size == 0:  # a 1x1 kernel with stride 2: odd rows get no gradient
        cols.append(jnp.zeros((n, a, b, ci), g.dtype))
        continue
      flipped = jnp.flip(taps, (0, 1)).swapaxes(2, 3)
      cols.append(_forward(g, flipped, (1, 1), (pads_h, pads_w)))
    rows.append(jnp.stack(cols, axis=3))  # [n, a, b, sw, ci]
  dx = jnp.stack(rows, axis=2)  # [n, a, sh, b, sw, ci]
  return dx.reshape(n, a * sh, b * sw, ci)[:, :h, :w]


def _phase(p, s, k, lo, size, g_size):
  """(first kernel tap, conv padding of g) of the input phase p along one axis.

  Input index s*j + p pairs with taps first + s*t and g index j + c - t (c below): a
  stride-1 correlation of g with the flipped taps, padded to give ``size`` outputs.
  """
  first = (p + lo) % s
  num_taps = len(range(first, k, s))
  c = (p + lo - first) // s
  return first, (num_taps - 1 - c, size + c - g_size)


def _kernel_grad(x, g, k_hw, strides, pads):
  """sum_{n,h,w} xpad[n, s*h + i, s*w + j, :]^T g[n, h, w, :] -> float32 [kh, kw, Ci, Co].

  The native C++ kernel where it applies (2-3x faster: it reads x and g in place), else
  matrix products of gathered taps, looped over the batch.
  """
  if native.supports_conv(x, g):
    return native.conv_kernel_grad(x, g, k_hw, strides, pads)
  n = x.shape[0]
  steps = _loop_steps(n, x[0].size * x.dtype.itemsize)
  step = functools.partial(_kernel_grad_chunk, k_hw=k_hw, strides=strides, pads=pads)
  if steps == 1:
    return step(x, g)
  # Step t takes images t, t + steps, t + 2*steps, ...: the loop runs over the minor factor
  # of the batch, so a batch sharded over devices stays sharded (with contiguous chunks,
  # XLA all-gathered x and g and every device summed the whole batch).
  def images(a, t):
    return lax.dynamic_index_in_dim(a.reshape(n // steps, steps, *a.shape[1:]), t, 1,
                                    keepdims=False)

  # x and g ride in the loop carry whole and are reshaped inside the body: reshaped
  # outside, XLA fused the reshape with x's producers and recomputed them (BatchNorm, ReLU
  # and the residual adds of several blocks) instead of reading the buffer the forward
  # conv had read. A loop, not unrolled, for the same reason.
  def body(t, carry):
    acc, x, g = carry
    return acc + step(images(x, t), images(g, t)), x, g
  zeros = jnp.zeros((*k_hw, x.shape[-1], g.shape[-1]), jnp.float32)
  return lax.fori_loop(0, steps, body, (zeros, x, g))[0]


def _loop_steps(n, image_bytes):
  """Loop steps over a batch of n images: a divisor of n, about _CHUNK_BYTES of input each.

  When the batch splits evenly over the devices (data parallel), a divisor of the images
  per device, so that every step holds the same number of each device's images.
  """
  devices = jax.device_count()
  m = n // devices if n % devices == 0 else n
  want = -(-m * image_bytes // _CHUNK_BYTES)
  return min((d for d in range(1, m + 1) if m % d == 0 and d >= want), default=m)


def _kernel_grad_chunk(x, g, k_hw, strides, pads):
  kh, kw = k_hw
  sh, sw = strides
  n, _, _, ci = x.shape
  _, ho, wo, co = g.shape
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  hp = xp.shape[1]

  def column_taps(i, rows, row_stride):  # [n, rows, wo, kw*ci]: x at columns sw*w + j
    return jnp.concatenate([
        lax.slice(xp, (0, i, j, 0), (n, i + row_stride * (rows - 1) + 1, j + sw * (wo - 1) + 1, ci),
                  (1, row_stride, sw, 1)) for j in range(kw)], axis=-1)

  def matmul(a, b):  # [K, p]^T [K, q] -> [p, q]; accumulate in float32 (also for bf16)
    return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                           (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  if sh == 1 and kh > 1:
    # Row tap i pairs x row r with cotangent row r - i: shift g instead of x. Padding g
    # once and slicing it keeps the concatenation a plain copy (XLA's fused pad+concat
    # was 3x slower).
    gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (kh - 1, hp - ho, 0), (0, 0, 0), (0, 0, 0)))
    g_rows = jnp.concatenate(
        [lax.slice_in_dim(gp, kh - 1 - i, kh - 1 - i + hp, axis=1) for i in range(kh)], axis=-1)
    z = matmul(column_taps(0, hp, 1), g_rows)  # [kw*ci, kh*co]
    return z.reshape(kw, ci, kh, co).transpose(2, 0, 1, 3)
  # Strided rows: the strided taps are small (|x| / sh per row tap), so gather all of them.
  taps = jnp.concatenate([column_taps(i, ho, sh) for i in range(kh)], axis=-1)
  return matmul(taps, g).reshape(kh, kw, ci, co)
