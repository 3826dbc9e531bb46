"""C++ CPU kernels called through XLA's FFI, built on first use for the machine they run on.

The sources ship with the package (``kernels/cpu/*.cc``: the convolutions, and the matmul by
packed power-of-two weights); the first call compiles each into its own shared library with
the system C++ compiler (``$CXX`` or ``g++``, ``-O3 -march=native``; both at once) against
the FFI headers of the installed jaxlib, into a cache directory keyed by source, compiler
flags, jaxlib version and CPU, so a changed source or another machine never picks up a
stale library. Compilation takes some seconds once per machine. Without a compiler, or with
``SHIFTJAX_NATIVE=0``, :func:`available` is False and callers use their XLA path.

Cache directory: ``$SHIFTJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/shiftjax``, else
``~/.cache/shiftjax``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxlib
import numpy as np

from shiftjax.kernels.cpu.layout import pad_columns
from shiftjax.kernels.cpu.layout import TiledWords

_SOURCE = pathlib.Path(__file__).with_name("cpu_conv.cc")
_HEADER_DIR = pathlib.Path(__file__).parent  # parallel_for.h, shared by the sources
_MATMUL_SOURCE = pathlib.Path(__file__).with_name("cpu_pow2_matmul.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# FFI targets the library defines: {name registered with XLA: exported symbol}
_TARGETS = {"shiftjax_conv": "ShiftjaxConv", "shiftjax_conv_kernel_grad": "ShiftjaxConvKernelGrad",
            "shiftjax_fused_conv": "ShiftjaxFusedConv"}
_MATMUL_TARGETS = {"shiftjax_pow2_matmul": "ShiftjaxPow2Matmul"}

_enabled = os.environ.get("SHIFTJAX_NATIVE", "1") != "0"


@contextlib.contextmanager
def disabled():
  """Within the block, :func:`available` is False: code traced here takes the XLA path.

  The choice is made when tracing, and ``jax.jit`` caches traces by function: a function
  already traced outside the block keeps the native kernels; trace a new one inside.
  """
  global _enabled
  before, _enabled = _enabled, False
  try:
    yield
  finally:
    _enabled = before


def available() -> bool:
  """Whether the native CPU kernels can be used now (CPU backend, built, not disabled)."""
  return _enabled and jax.default_backend() == "cpu" and _library() is not None


def cache_dir() -> pathlib.Path:
  root = os.environ.get("SHIFTJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shiftjax")
  return pathlib.Path(root)


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
  except OSError:
    lines = []
  return platform.machine() + "".join(lines)


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def build(compiler: str, source: pathlib.Path | None = None) -> pathlib.Path:
  """Compiles one source (default the convolutions') or finds it in the cache -> path of its
  shared library."""
  source = _SOURCE if source is None else source
  headers = [h.read_text() for h in sorted(_HEADER_DIR.glob("*.h"))]  # included by all
  key = hashlib.sha256("\0".join([
      source.read_text(), *headers, compiler, *_FLAGS, jaxlib.__version__,
      _cpu_id()]).encode())
  out = cache_dir() / f"shiftjax_{source.stem}_{key.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent processes (pytest-xdist, several
  # launches) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_HEADER_DIR}",
                    str(source), "-o", tmp],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def _library() -> tuple[ctypes.CDLL, ...] | None:
  """The built libraries with their FFI targets registered, or None (warned once) if they
  can't be."""
  if jax.default_backend() != "cpu":
    return None
  compiler = _compiler()
  if compiler is None:
    warnings.warn("shiftjax: no C++ compiler (g++ or $CXX) found; CPU convolutions, their "
                  "gradients and packed matmuls use the slower XLA path. Install g++ to "
                  "enable the native kernels.")
    return None
  sources = {_SOURCE: _TARGETS, _MATMUL_SOURCE: _MATMUL_TARGETS}
  try:
    with concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:  # one compiler each
      paths = list(pool.map(lambda source: build(compiler, source), sources))
    libs = tuple(ctypes.cdll.LoadLibrary(str(path)) for path in paths)
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    warnings.warn(f"shiftjax: building the native CPU kernels failed, using the XLA path:\n"
                  f"{detail[-2000:]}")
    return None
  for lib, targets in zip(libs, sources.values()):
    for target, symbol in targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  return libs


# ------------------------------------------------------------------------ convolutions

# The kernels' widest register vector (AVX-512) holds 16 float32 output channels.
_CO_MULTIPLE = 16
_MAX_CI = 4096  # the conv kernel's row of zeros for padding taps


def supports_conv(x: jax.Array, kernel_or_g: jax.Array) -> bool:
  """Whether :func:`conv` (x, kernel) and :func:`conv_kernel_grad` (x, g) take these.

  float32, output channels (the last axis of the second operand) a multiple of 16, at most
  4096 input channels, native kernels available. Any number of devices: with the batch
  sharded (data parallel), each device runs the kernels on its own images.
  """
  return (x.dtype == kernel_or_g.dtype == jnp.float32 and x.ndim == kernel_or_g.ndim == 4
          and kernel_or_g.shape[-1] % _CO_MULTIPLE == 0 and x.shape[-1] <= _MAX_CI
          and available())


def _check(x, other, what):
  if not supports_conv(x, other):
    raise ValueError(
        f"native {what} takes 4-D float32 operands with output channels a multiple of "
        f"{_CO_MULTIPLE} (and at most {_MAX_CI} input channels) on the CPU; got "
        f"{x.dtype} {x.shape} and {other.dtype} {other.shape} (native kernels available: "
        f"{available()})")


def _attrs(strides, pads) -> tuple:
  """The FFI attributes as a hashable tuple (a static argument of the partitioned calls)."""
  return (("sh", int(strides[0])), ("sw", int(strides[1])), ("pt", int(pads[0][0])),
          ("pl", int(pads[1][0])))


def output_hw(x_shape, kernel_shape, strides, pads) -> tuple[int, int]:
  """(Ho, Wo) of an NHWC/HWIO conv with explicit pads; an empty output is an error."""
  (kh, kw), (sh, sw) = kernel_shape[:2], strides
  ho = (x_shape[1] + sum(pads[0]) - kh) // sh + 1
  wo = (x_shape[2] + sum(pads[1]) - kw) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"conv of {tuple(x_shape)} with kernel {tuple(kernel_shape)}, strides "
                     f"{strides} and pads {pads} has an empty output ({ho} x {wo})")
  return ho, wo


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
  """NHWC/HWIO conv, x [N, H, W, Ci], kernel [kh, kw, Ci, Co], explicit ((lo, hi), (lo, hi))
  pads (negative ones crop) -> float32 [N, Ho, Wo, Co]. Check :func:`supports_conv` first.

  With x sharded on its batch axis, each device convolves its own images (kernel
  replicated) and the output stays sharded like x.
  """
  _check(x, kernel, "conv")
  static = (_attrs(strides, pads), output_hw(x.shape, kernel.shape, strides, pads))
  return _call(_conv_call, _conv_sharded, x, kernel, static)


def fused_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads, *,
               scale: jax.Array | None = None, bias: jax.Array | None = None,
               residual: jax.Array | None = None, relu: bool = False) -> jax.Array:
  """:func:`conv` with an inference layer's epilogue in its register tile:
  ``relu?(conv(x, kernel) * scale + bias + residual)``, each part optional.

  ``scale`` and ``bias`` are float32 ``[Co]``, ``residual`` float32 of the output's shape.
  Fusing saves the passes over the activations that XLA would make for the epilogue: at
  batch 128 a ResNet-20's epilogues took a quarter of its packed forward pass. For
  inference: no gradient and no sharding rule (a sharded batch is gathered).
  Check :func:`supports_conv` first.
  """
  _check(x, kernel, "fused_conv")
  out_shape = (x.shape[0], *output_hw(x.shape, kernel.shape, strides, pads), kernel.shape[-1])

  def operand(a, shape, name):
    if a is None:
      return jnp.zeros((0,), jnp.float32)  # empty: the kernel skips it
    if tuple(a.shape) != shape:
      raise ValueError(f"fused_conv: {name} must have shape {shape}, got {tuple(a.shape)}")
    return jnp.asarray(a, jnp.float32)
  operands = (x, kernel, operand(scale, out_shape[-1:], "scale"),
              operand(bias, out_shape[-1:], "bias"), operand(residual, out_shape, "residual"))
  call = jax.ffi.ffi_call("shiftjax_fused_conv", jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")
  return call(*operands, **dict(_attrs(strides, pads)), relu=bool(relu))


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     strides: tuple[int, int], pads) -> jax.Array:
  """Kernel gradient of an NHWC/HWIO conv: x [N, H, W, Ci], cotangent g [N, Ho, Wo, Co].

  ``pads`` are the conv's explicit ((lo, hi), (lo, hi)); the high pads follow from the
  shapes. Returns float32 [kh, kw, Ci, Co]. Check :func:`supports_conv` first.

  With x and g sharded on their batch axis, each device sums over its own images and the
  partial sums are added over the devices (one all-reduce): the result is replicated.
  """
  _check(x, g, "conv_kernel_grad")
  static = (_attrs(strides, pads), tuple(int(k) for k in kernel_hw))
  return _call(_kernel_grad_call, _kernel_grad_sharded, x, g, static)


# ------------------------------------------------------------- the calls, and their sharding
#
# An FFI call has no sharding rule of its own: given a sharded batch, XLA would gather the
# whole batch on every device and run the kernel there. ``custom_partitioning`` supplies one.
# jax's default partitioner (Shardy) propagates shardings with the einsum-like
# ``sharding_rule``; the SPMD partitioner then calls ``partition``, which fixes the operand
# shardings (batch only; the partitioner reshards operands that arrive sharded otherwise)
# and gives the per-device computation. On one device the op lowers to the plain call.
# (Its callback key in the HLO differs per process, so a multi-device program using these
# misses jax's persistent compilation cache.)

def _result(shape, *operands) -> jax.ShapeDtypeStruct:
  """The float32 result of a call on ``operands``. Inside ``shard_map`` it varies over every
  manual mesh axis an operand varies over: an FFI result is otherwise typed as the same on
  all devices, and ``jax.vjp`` there rejects its (varying) cotangent."""
  types = [jax.typeof(a) for a in operands]
  varying = frozenset().union(*(t.mat.varying for t in types))
  if not varying:
    return jax.ShapeDtypeStruct(shape, jnp.float32)
  mat = types[0].mat.update(varying=varying, unreduced=frozenset(), reduced=frozenset())
  return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=mat,
                              sharding=NamedSharding(types[0].sharding.mesh, P()))


def _conv_call(x, kernel, static):
  """The FFI conv of (a shard of) the batch x."""
  attrs, (ho, wo) = static
  out = _result((x.shape[0], ho, wo, kernel.shape[-1]), x, kernel)
  return jax.ffi.ffi_call("shiftjax_conv", out, vmap_method="sequential")(x, kernel, **dict(attrs))


def _kernel_grad_call(x, g, static):
  """The FFI kernel gradient, summed over (a shard of) the batch of x and g."""
  attrs, kernel_hw = static
  out = _result((*kernel_hw, x.shape[-1], g.shape[-1]), x, g)
  return jax.ffi.ffi_call("shiftjax_conv_kernel_grad", out, vmap_method="sequential")(
      x, g, **dict(attrs))


def _call(plain, partitioned, a, b, static):
  """``partitioned(a, b, static)``, or ``plain`` inside ``shard_map``.

  In ``shard_map`` the manual axes are already split: the plain call runs on each device's
  block (what the partitioned op lowers to there anyway), while the partitioner's callback
  would see the blocks' shardings named after the manual axes and could ask to shard over
  them (an XLA check failure, seen with a partly manual ``shard_map`` under ``with mesh``).
  Under ``jax.vmap`` either is a loop over the mapped axis (``custom_partitioning`` has no
  batching rule); inside the loop each call keeps its sharding rule.
  """
  op = plain if _manual(a) or _manual(b) else partitioned
  return jax.custom_batching.sequential_vmap(lambda a, b: op(a, b, static))(a, b)


def _manual(a) -> bool:
  """Whether ``a`` is traced inside ``shard_map`` (its mesh has a manual axis)."""
  mesh = jax.typeof(a).sharding.mesh
  return any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


def _batch_axes(mesh, shardings, n) -> tuple[str, ...]:
  """The mesh axes to shard the batch (axis 0, n images) over, from the operands' shardings.

  The axes that shard a batch axis first, then any that shard another axis: the partitioner
  then moves that sharding to the batch (an all-to-all) instead of gathering the operand on
  every device. Only the leading axes whose sizes multiply to a divisor of n: an uneven
  shard is padded with images of undefined values, which would enter the kernel gradient.
  """
  specs = [tuple(s.spec) for s in shardings if isinstance(s, NamedSharding)]
  axes = []
  for entry in [spec[0] for spec in specs if spec] + [e for spec in specs for e in spec[1:]]:
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      if axis not in axes:
        axes.append(axis)
  while axes and n % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def _on_batch(mesh, axes, sharding=None):
  """A sharding of a 4-D array over ``axes`` on its batch axis (replicated if none)."""
  if mesh.empty:  # the callback got unnamed (GSPMD) shardings: replicate on their devices
    mesh = jax.sharding.Mesh(np.array(sorted(sharding.device_set, key=lambda d: d.id)), ("d",))
  return NamedSharding(mesh, P(axes or None))


def _conv_partition(static, mesh, arg_shapes, result_shape):
  del result_shape
  x, _ = arg_shapes
  axes = _batch_axes(mesh, [x.sharding], x.shape[0])  # the kernel's says nothing of it
  batch, replicated = _on_batch(mesh, axes, x.sharding), _on_batch(mesh, (), x.sharding)
  lower = lambda x, kernel: _conv_call(x, kernel, static)
  return batch.mesh, lower, batch, (batch, replicated)


def _conv_infer(static, mesh, arg_shapes, result_shape):
  """The output's sharding (GSPMD partitioner only; Shardy uses the sharding rule)."""
  del static, result_shape
  x = arg_shapes[0]
  return _on_batch(mesh, _batch_axes(mesh, [x.sharding], x.shape[0]), x.sharding)


def _kernel_grad_partition(static, mesh, arg_shapes, result_shape):
  del result_shape
  x, g = arg_shapes
  axes = _batch_axes(mesh, [x.sharding, g.sharding], x.shape[0])
  batch, replicated = _on_batch(mesh, axes, x.sharding), _on_batch(mesh, (), x.sharding)

  def lower(x, g):  # this device's images; the sum over all images is the psum of the parts
    dk = _kernel_grad_call(x, g, static)
    return jax.lax.psum(dk, axes) if axes else dk
  return batch.mesh, lower, replicated, (batch, batch)


def _kernel_grad_infer(static, mesh, arg_shapes, result_shape):
  del static, result_shape
  return _on_batch(mesh, (), arg_shapes[0].sharding)


# Factors: n the batch, the only one Shardy may propagate a sharding through (the others need
# replication; ``partition`` then asks for operands sharded on the batch only). In the kernel
# gradient n is summed over: a reduction, whose all-reduce ``partition`` writes itself.
_CONV_RULE = "n h w c, i j c o -> n p q o"
_KERNEL_GRAD_RULE = "n h w c, n p q o -> i j c o"


def _all_but_batch(rule: str) -> tuple[str, ...]:
  """The rule's factors other than n, in order of first appearance: Shardy rejects a rule
  whose special factors are out of that order ("indices of special factors must be sorted"),
  and jax passes them on as given."""
  factors = rule.replace(",", " ").replace("->", " ").split()
  return tuple(f for f in dict.fromkeys(factors) if f != "n")


_conv_sharded = custom_partitioning(_conv_call, static_argnums=(2,))
_conv_sharded.def_partition(
    _conv_partition, infer_sharding_from_operands=_conv_infer, sharding_rule=_CONV_RULE,
    need_replication_factors=_all_but_batch(_CONV_RULE))

_kernel_grad_sharded = custom_partitioning(_kernel_grad_call, static_argnums=(2,))
_kernel_grad_sharded.def_partition(
    _kernel_grad_partition, infer_sharding_from_operands=_kernel_grad_infer,
    sharding_rule=_KERNEL_GRAD_RULE, reduction_factors=("n",),
    need_replication_factors=_all_but_batch(_KERNEL_GRAD_RULE))


# ------------------------------------------------ matmul by packed power-of-two weights

# The vector paths of cpu_pow2_matmul.cc: None picks the widest this CPU has.
# 'avx512_bf16' is 'avx512' with bfloat16 dot products for bfloat16 x.
ISAS = (None, "avx512_bf16", "avx512", "avx2", "scalar")
_ISA_CODES = {None: 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512_bf16": 4}
_MATMUL_BITS = (2, 3, 4, 5)
_MATMUL_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def supports_pow2_matmul(x2, packed, bits) -> bool:
  """Whether :func:`pow2_matmul` takes these: x2 float32 or bfloat16 ``[M, K]``, packed
  uint32 ``[ceil(K / P), N]`` (``P = 32 // bits``) or ``TiledWords`` of those words, bits
  in 2..5, native kernels available. Any number of devices: rows of x2 and columns of
  packed (tiles) may be sharded."""
  return (bits in _MATMUL_BITS and jnp.dtype(x2.dtype) in _MATMUL_X_DTYPES
          and jnp.dtype(packed.dtype) == jnp.uint32 and x2.ndim == packed.ndim == 2
          and packed.shape[0] == -(-x2.shape[1] // (32 // bits)) and available())


def pow2_matmul(x2: jax.Array, packed: jax.Array, scale: jax.Array | None = None,
                bias: jax.Array | None = None, *, bits: int, e0: int, k: int | None = None,
                isa: str | None = None) -> jax.Array:
  """``x2 @ decode(packed) * scale + bias`` by the native kernel -> float32 ``[M, N]``.

  The format is ``shiftjax.kernels.pow2_matmul``'s (zero-free codes, ``P = 32 // bits``
  per word along K): x2 float32 or bfloat16 ``[M, K]``, packed uint32 ``[ceil(K/P), N]``
  or the same words in the tiled layout (``TiledWords``, ``shiftjax.kernels.cpu.layout``:
  each thread then streams contiguous memory), scale and bias float32 ``[N]`` or None.
  ``k``, if given, must be ``K``. ``isa`` forces a vector path (``'avx512_bf16'``,
  ``'avx512'``, ``'avx2'``, ``'scalar'``; default the widest this CPU has), for tests.
  Every path (and both layouts) sums each output's products in order of k into one
  float32 accumulator, so all give the same bits; except ``'avx512_bf16'`` with bfloat16
  x, which adds the products two at a time (vdpbf16ps, twice the multiply-adds per
  instruction) and so agrees to float32 rounding of the sums.
  Check :func:`supports_pow2_matmul` first.

  With rows of x2 and/or columns of packed (and scale, bias) sharded, each device
  multiplies its own block; the output is sharded like both. Tiled words shard by whole
  tiles (their axis 0); N not a multiple of the tile leaves the last tile's padding
  columns to drop from the output, a slice XLA may reshard.
  """
  if k is not None and k != x2.shape[-1]:
    raise ValueError(f"native pow2_matmul: k={k} but x2 has {x2.shape[-1]} columns")
  if isa not in ISAS:
    raise ValueError(f"native pow2_matmul: isa must be one of {ISAS}, got {isa!r}")
  if not supports_pow2_matmul(x2, packed, bits):
    raise ValueError(
        f"native pow2_matmul takes x2 float32/bfloat16 [M, K], packed uint32 "
        f"[ceil(K / (32 // bits)), N] and bits in {_MATMUL_BITS} on the CPU; got x2 "
        f"{x2.dtype} {tuple(x2.shape)}, packed {packed.dtype} {tuple(packed.shape)}, "
        f"bits={bits} (native kernels available: {available()})")
  n = packed.shape[1]
  # Always present (exact when absent: y * 1 + 0 == y): one FFI signature, one sharding.
  scale = jnp.ones((n,), jnp.float32) if scale is None else jnp.asarray(scale, jnp.float32)
  bias = jnp.zeros((n,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
  static = (int(bits), int(e0), _ISA_CODES[isa])
  if isinstance(packed, TiledWords):  # [T, W, tile]; scale, bias, y by tiles too
    operands = (x2, packed.tiles, pad_columns(scale, packed, 1.0),
                pad_columns(bias, packed, 0.0))
    sharded = _tiled_sharded
  else:
    operands, sharded = (x2, packed, scale, bias), _matmul_sharded
  op = _matmul_call if any(map(_manual, operands)) else sharded
  y = jax.custom_batching.sequential_vmap(lambda *a: op(*a, static))(*operands)
  if isinstance(packed, TiledWords):
    y = y.reshape(y.shape[:-2] + (-1,))[..., :n]
  return y


def _matmul_call(x2, packed, scale, bias, static):
  """The FFI matmul of (a block of) x2's rows by (a block of) packed's columns: words
  ``[W, N]`` -> ``[M, N]``, or tiles ``[T, W, tile]`` -> ``[M, T, tile]``."""
  bits, e0, isa = static
  cols = (packed.shape[1],) if packed.ndim == 2 else (packed.shape[0], packed.shape[2])
  out = _result((x2.shape[0], *cols), x2, packed, scale, bias)
  return jax.ffi.ffi_call("shiftjax_pow2_matmul", out, vmap_method="sequential")(
      x2, packed, scale, bias, bits=bits, e0=e0, isa=isa)


def _column_axes(mesh, shardings, n, taken) -> tuple[str, ...]:
  """The mesh axes (not in ``taken``) that shard the output columns (n of them): those
  that shard packed's axis 1 or scale's and bias's axis 0, while their sizes multiply to
  a divisor of n."""
  axes = []
  for sharding, axis in shardings:
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    entry = spec[axis] if len(spec) > axis else None
    for name in (entry,) if isinstance(entry, str) else entry or ():
      if name not in axes and name not in taken:
        axes.append(name)
  while axes and n % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def _matmul_shardings(mesh, arg_shapes):
  """(mesh, x2's, packed's, scale's and bias's, output's shardings): rows over the axes
  that shard x2's rows, columns over those that shard packed's columns (tiled: tiles,
  packed's axis 0, scale's and bias's [T, tile] axis 0)."""
  x, packed, scale, bias = arg_shapes
  tiled = len(packed.shape) == 3
  if mesh.empty:  # unnamed (GSPMD) shardings: replicate on their devices
    mesh = jax.sharding.Mesh(
        np.array(sorted(x.sharding.device_set, key=lambda d: d.id)), ("d",))
    rows = cols = ()
  else:
    rows = _batch_axes(mesh, [x.sharding], x.shape[0])
    axis = 0 if tiled else 1
    cols = _column_axes(mesh, [(packed.sharding, axis), (scale.sharding, 0),
                               (bias.sharding, 0)], packed.shape[axis], rows)
  on = lambda *spec: NamedSharding(mesh, P(*spec))
  rows, cols = rows or None, cols or None
  if tiled:
    return (mesh, (on(rows, None), on(cols, None, None), on(cols, None), on(cols, None)),
            on(rows, cols, None))
  return mesh, (on(rows, None), on(None, cols), on(cols), on(cols)), on(rows, cols)


def _matmul_partition(static, mesh, arg_shapes, result_shape):
  del result_shape
  mesh, args, out = _matmul_shardings(mesh, arg_shapes)
  lower = lambda x2, packed, scale, bias: _matmul_call(x2, packed, scale, bias, static)
  return mesh, lower, out, args


def _matmul_infer(static, mesh, arg_shapes, result_shape):
  del static, result_shape
  return _matmul_shardings(mesh, arg_shapes)[2]


# k (x2's columns) and w (packed's words) are the contraction, in different units: both
# replicated. Rows m and columns n may be sharded.
_MATMUL_RULE = "m k, w n, n, n -> m n"

_matmul_sharded = custom_partitioning(_matmul_call, static_argnums=(4,))
_matmul_sharded.def_partition(
    _matmul_partition, infer_sharding_from_operands=_matmul_infer,
    sharding_rule=_MATMUL_RULE, need_replication_factors=("k", "w"))

# The tiled layout: t (tiles) may be sharded like m; c (columns in a tile) stays whole.
_TILED_RULE = "m k, t w c, t c, t c -> m t c"

_tiled_sharded = custom_partitioning(_matmul_call, static_argnums=(4,))
_tiled_sharded.def_partition(
    _matmul_partition, infer_sharding_from_operands=_matmul_infer,
    sharding_rule=_TILED_RULE, need_replication_factors=("k", "w", "c"))
