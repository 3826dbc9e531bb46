"""Matmul by packed zero-free power-of-two weights: ``y = x @ decode(packed) * scale + bias``.

This module is the public call (``pow2_matmul``), its argument checks and the choice of
backend; the backends are modules of their own (``matmul_xla``, the native CPU kernel
``shiftjax.kernels.cpu.native``, and the Pallas kernels ``matmul_pallas``,
``matmul_tpu``, ``matmul_gpu`` with tiles from ``tiling``).

Weight format (see ``shiftjax.codes``): ``W[K, N]`` holds N-bit codes
``sign << (bits - 1) | index`` standing for ``(-1)**sign * 2**(e0 + index)``; every one
of the ``2**bits`` codes is a value (DenseShift), ``bits`` in 2..5. ``W`` is packed along
the contraction axis: ``P = 32 // bits`` consecutive k's per uint32 word, code ``j`` of a
word in bits ``[j * bits, (j + 1) * bits)``, so ``packed`` is ``uint32[ceil(K / P), N]``
with the last word zero-padded. ``packed`` may also be the same words in the native CPU
kernel's tiled layout (``TiledWords``, from ``tile_words``; ``shiftjax.kernels.cpu.layout``),
converted once where a model is loaded: the native kernel reads it as it is, every other
backend converts it back to words inside the call.

Backends:
  * ``'xla'``: unpack + decode (bit assembly) + ``lax.dot``. The CPU fallback, and the
    reference the native and Pallas kernels are tested against.
  * ``'native'``: the C++ CPU kernel (``shiftjax.kernels.cpu.native``,
    ``cpu_pow2_matmul.cc``): decodes the words in vector registers (a 16-entry in-register
    table on AVX-512, bit assembly on AVX2) and reads each packed word once at small M;
    4-bit weights at M = 1 run several times faster than a float32 dot (docs/cpu_kernel.md).
    It sums each output's products in order of k (bfloat16 x on AVX512-BF16: two at a
    time), XLA's dot in its own blocked order: the two agree to float32 rounding of the
    sums (within ``2 K 2**-24 sum |x| |w|``), not bit for bit.
  * ``'pallas'``: the Pallas kernel compiled for ``platform`` (``'gpu'``: Triton,
    ``'tpu'``: Mosaic), default the platform of ``jax.default_backend()``.
  * ``'pallas_interpret'``: the same kernel run by the Pallas interpreter (any machine).
  * ``None``: ``'pallas'`` on GPU/TPU (or when ``platform`` is given); on CPU
    ``'native'`` where the native kernels are available (built, not
    ``native.disabled()``), else ``'xla'``. ``resolve_backend`` calls both CPU paths
    ``'xla'`` (pow2_conv's and deploy's "decode on the CPU" branch); only an explicit
    ``backend='xla'`` keeps ``pow2_matmul`` off the native kernel.

Output: always float32 ``[..., N]`` (float32 accumulation and float32 scale/bias; cast it
yourself if the next layer wants bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax.kernels.cpu import layout
from shiftjax.kernels.cpu import native
from shiftjax.kernels.inference.matmul_pallas import pallas_matmul
from shiftjax.kernels.inference.matmul_xla import xla_matmul
from shiftjax.kernels.inference.tiling import Blocks
from shiftjax.kernels.inference.tiling import resolve_blocks

SUPPORTED_BITS = (2, 3, 4, 5)
BACKENDS = (None, "xla", "native", "pallas", "pallas_interpret")
PLATFORMS = ("gpu", "tpu")
X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_F32 = codes_lib.float_layout(jnp.float32)  # bfloat16 shares its exponent range


# ----------------------------------------------------------------------------------------
# Argument checks (plain Python, before anything is traced).


def check_format(bits, e0) -> codes_lib.CodeFormat:
  """Checks ``bits`` and ``e0`` of a zero-free format this kernel supports."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      bits not in SUPPORTED_BITS):
    raise ValueError(
        f"pow2_matmul supports zero-free codes of 2..5 bits, got bits={bits!r}")
  if isinstance(e0, bool) or not isinstance(e0, (int, np.integer)):
    raise ValueError(f"e0 must be a Python integer exponent offset, got {e0!r}")
  top = int(e0) + (1 << (bits - 1)) - 1
  # bfloat16 shares float32's exponent range, so one check covers both.
  if int(e0) < _F32.min_normal_exponent or top > _F32.max_exponent:
    raise ValueError(
        f"e0={e0} with {bits}-bit codes spans exponents {e0}..{top}, which are not all "
        f"normal float32/bfloat16 exponents ({_F32.min_normal_exponent}.."
        f"{_F32.max_exponent})")
  return codes_lib.CodeFormat(bits=int(bits), e0=int(e0))


def resolve_backend(backend, platform) -> tuple[str, str | None]:
  """(``'xla'`` | ``'native'`` | ``'pallas'`` | ``'pallas_interpret'``, ``'gpu'`` |
  ``'tpu'`` | None). None on CPU gives ``'xla'``, the CPU path (``pow2_matmul`` runs the
  native kernel there when it can; module docstring)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "native":
    if platform is not None or jax.default_backend() != "cpu":
      raise ValueError(
          f"backend='native' is the CPU kernel; got platform={platform!r} with default "
          f"backend {jax.default_backend()!r}")
    return backend, None
  if platform is not None:
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform not in PLATFORMS:
      raise ValueError(
          f"platform must be 'gpu' (or 'cuda') or 'tpu', got {platform!r}")
  default = jax.default_backend()
  default = {"cuda": "gpu", "rocm": "gpu"}.get(default, default)
  if backend is None:
    if platform is not None:
      backend = "pallas"
    else:
      backend = "pallas" if default in PLATFORMS else "xla"
  if backend == "xla":
    return backend, None
  if platform is None:
    if backend == "pallas_interpret":
      platform = "tpu"  # the kernel with the K grid axis; both run in interpret mode
    elif default in PLATFORMS:
      platform = default
    else:
      raise ValueError(
          f"backend='pallas' compiles for a GPU or TPU but the default backend is "
          f"{jax.default_backend()!r}: pass platform='gpu' or 'tpu' (to lower or "
          f"export for it), or use backend='pallas_interpret' or 'xla' on this machine")
  return backend, platform


def check_operands(x, packed, bits, scale, bias, k) -> tuple[int, int]:
  """Returns (K, N) after checking shapes and dtypes."""
  x_dtype = jnp.dtype(x.dtype)
  if x_dtype not in X_DTYPES:
    raise ValueError(f"x must be float32 or bfloat16, got {x_dtype}")
  if x.ndim < 1:
    raise ValueError("x must have a contraction axis: shape [..., K], got a scalar")
  if packed.ndim != 2:
    raise ValueError(
        f"packed weights must be uint32[ceil(K / {codes_lib.codes_per_word(bits)}), N], "
        f"got shape {tuple(packed.shape)}")
  if jnp.dtype(packed.dtype) != jnp.uint32:
    raise ValueError(f"packed weights must be uint32 words, got {packed.dtype}")
  kx = x.shape[-1]
  if k is None:
    k = kx
  elif k != kx:
    raise ValueError(f"k={k} but x has {kx} columns (shape {tuple(x.shape)})")
  p = codes_lib.codes_per_word(bits)
  words, n = packed.shape
  if words != -(-k // p):
    raise ValueError(
        f"x has K={k}, which packs {bits}-bit codes into ceil({k}/{p})={-(-k // p)} "
        f"words, but packed has {words} words (shape {tuple(packed.shape)})")
  check_epilogue(scale, bias, n)
  return k, n


def check_epilogue(scale, bias, n: int) -> None:
  """``scale`` and ``bias``, where given, are one value per output channel (``[n]``): a
  wrong shape would otherwise broadcast silently."""
  for name, v in (("scale", scale), ("bias", bias)):
    if v is not None and tuple(v.shape) != (n,):
      raise ValueError(f"{name} must have shape ({n},) (one per output channel), got "
                       f"{tuple(v.shape)}")


# ----------------------------------------------------------------------------------------
# Backend choice and the public entry point.


# The native kernel's call, jitted apart from the XLA path's: which of the two runs is
# decided outside any jit (``_cpu_backend``), so a trace never keeps a choice made while
# the native kernels were available (see ``native.disabled``).
_native_matmul = jax.jit(native.pow2_matmul, static_argnames=("bits", "e0", "k", "isa"))


def _cpu_backend(x2, packed, bits, explicit: bool) -> str:
  """``'native'`` where the native kernel takes these operands, else ``'xla'``; with
  ``backend='native'`` asked for explicitly, a ValueError instead of the fallback."""
  if native.supports_pow2_matmul(x2, packed, bits):
    return "native"
  if explicit:
    raise ValueError(
        f"backend='native' but the native CPU kernels are not available (no C++ compiler, "
        f"SHIFTJAX_NATIVE=0, native.disabled(), or not the CPU backend: "
        f"{jax.default_backend()!r})")
  return "xla"


def pow2_matmul(x, packed, *, bits: int, e0: int, scale=None, bias=None,
                k: int | None = None, backend: str | None = None,
                platform: str | None = None, blocks: Blocks | None = None):
  """``x @ decode(packed) * scale + bias`` with packed zero-free power-of-two weights.

  Args:
    x: float32 or bfloat16 ``[..., K]``.
    packed: uint32 ``[ceil(K / P), N]``, ``P = 32 // bits`` codes per word along K; or
      those words as ``TiledWords`` (``tile_words(packed)``, the native CPU kernel's
      layout, each tile of columns contiguous; converted back for the other backends).
    bits: code width, 2..5 (all ``2**bits`` codes are values).
    e0: integer exponent of the smallest magnitude; code index i means ``+-2**(e0+i)``.
    scale: optional float32 ``[N]`` per-output-channel scale (e.g. folded BN).
    bias: optional float32 ``[N]`` per-output-channel bias.
    k: the logical K (optional; must equal ``x.shape[-1]``).
    backend: None, ``'xla'``, ``'native'``, ``'pallas'`` or ``'pallas_interpret'``
      (module docstring): None on CPU runs the native kernel where available.
    platform: ``'gpu'`` or ``'tpu'``: which Pallas kernel; default the default backend's
      (``'tpu'``'s K-grid kernel for ``'pallas_interpret'`` on CPU). Pass it to lower or
      ``jax.export`` for a platform this machine does not have.
    blocks: the Pallas kernel's tiles, K parts and (GPU) multiply and launch settings
      (``Blocks``); None: ``default_blocks`` for this shape, dtype and platform. Start
      from those to change one field: ``dataclasses.replace(default_blocks(...), n=128)``.
  Returns:
    float32 ``[..., N]``.
  Raises:
    ValueError: on unsupported bits/e0/dtypes, inconsistent shapes, bad tiles or backend,
      before anything is traced.
  """
  check_format(bits, e0)
  bits, e0 = int(bits), int(e0)
  requested = backend
  backend, platform = resolve_backend(backend, platform)
  k, n = check_operands(x, packed, bits, scale, bias, k)
  lead = tuple(x.shape[:-1])
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  if backend == "native" or (backend == "xla" and requested is None):
    backend = _cpu_backend(x2, packed, bits, explicit=backend == "native")
  if backend != "native" and isinstance(packed, layout.TiledWords):
    packed = layout.untile(packed)
  if backend == "native":
    y = _native_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k)
  elif backend == "xla":
    y = xla_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k)
  else:
    interpret = backend == "pallas_interpret"
    blocks = resolve_blocks(blocks, max(m, 1), n, k, bits, x.dtype, platform, interpret)
    if m == 0 or n == 0:
      y = jnp.zeros((m, n), jnp.float32)
    else:
      y = pallas_matmul(x2, packed, scale, bias, bits=bits, e0=e0, k=k,
                        platform=platform, interpret=interpret, blocks=blocks)
  return y.reshape(lead + (n,))
