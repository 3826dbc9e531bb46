"""C++ CPU kernels called through XLA's FFI, built on first use for the machine they run on.

The source ships with the package (``kernels/training/*.cc``); the first call compiles it with the
system C++ compiler (``$CXX`` or ``g++``, ``-O3 -march=native``) against the FFI headers of
the installed jaxlib, into a cache directory keyed by source, compiler flags, jaxlib
version and CPU, so a changed source or another machine never picks up a stale library.
Compilation takes a few seconds once per machine. Without a compiler, or with
``SHIFTJAX_NATIVE=0``, :func:`available` is False and callers use their XLA path.

Cache directory: ``$SHIFTJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/shiftjax``, else
``~/.cache/shiftjax``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

_SOURCE = pathlib.Path(__file__).with_name("cpu_conv.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# FFI targets the library defines: {name registered with XLA: exported symbol}
_TARGETS = {"shiftjax_conv": "ShiftjaxConv", "shiftjax_conv_kernel_grad": "ShiftjaxConvKernelGrad"}

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


def build(compiler: str) -> pathlib.Path:
  """Compiles the kernels (or finds them in the cache) -> path of the shared library."""
  key = hashlib.sha256("\0".join([
      _SOURCE.read_text(), compiler, *_FLAGS, jaxlib.__version__, _cpu_id()]).encode())
  out = cache_dir() / f"shiftjax_cpu_{key.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent processes (pytest-xdist, several
  # launches) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The built library with its FFI targets registered, or None (warned once) if it can't be."""
  if jax.default_backend() != "cpu":
    return None
  compiler = _compiler()
  if compiler is None:
    warnings.warn("shiftjax: no C++ compiler (g++ or $CXX) found; CPU convolutions and "
                  "their gradients use the slower XLA path. Install g++ to enable the "
                  "native kernels.")
    return None
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, "stderr", "") or str(e)
    warnings.warn(f"shiftjax: building the native CPU kernels failed, using the XLA path:\n"
                  f"{detail[-2000:]}")
    return None
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  return lib


# ------------------------------------------------------------------------ convolutions

# The kernels' widest register vector (AVX-512) holds 16 float32 output channels.
_CO_MULTIPLE = 16
_MAX_CI = 4096  # the conv kernel's row of zeros for padding taps


def supports_conv(x: jax.Array, kernel_or_g: jax.Array) -> bool:
  """Whether :func:`conv` (x, kernel) and :func:`conv_kernel_grad` (x, g) take these.

  float32, output channels (the last axis of the second operand) a multiple of 16, one
  device: an FFI call has no sharding rule, so under data parallelism XLA would gather the
  whole batch on every device.
  """
  return (x.dtype == kernel_or_g.dtype == jnp.float32 and x.ndim == kernel_or_g.ndim == 4
          and kernel_or_g.shape[-1] % _CO_MULTIPLE == 0 and x.shape[-1] <= _MAX_CI
          and jax.device_count() == 1 and available())


def _check(x, other, what):
  if not supports_conv(x, other):
    raise ValueError(
        f"native {what} takes 4-D float32 operands with output channels a multiple of "
        f"{_CO_MULTIPLE} (and at most {_MAX_CI} input channels) on one CPU device; got "
        f"{x.dtype} {x.shape} and {other.dtype} {other.shape} on {jax.device_count()} "
        f"device(s) (native kernels available: {available()})")


def _attrs(strides, pads) -> dict:
  return dict(sh=int(strides[0]), sw=int(strides[1]), pt=int(pads[0][0]), pl=int(pads[1][0]))


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
  """NHWC/HWIO conv, x [N, H, W, Ci], kernel [kh, kw, Ci, Co], explicit ((lo, hi), (lo, hi))
  pads (negative ones crop) -> float32 [N, Ho, Wo, Co]. Check :func:`supports_conv` first."""
  _check(x, kernel, "conv")
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  ho = (x.shape[1] + sum(pads[0]) - kh) // sh + 1
  wo = (x.shape[2] + sum(pads[1]) - kw) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"conv of {x.shape} with kernel {kernel.shape}, strides {strides} and "
                     f"pads {pads} has an empty output ({ho} x {wo})")
  out = jax.ShapeDtypeStruct((x.shape[0], ho, wo, kernel.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call("shiftjax_conv", out, vmap_method="sequential")
  return call(x, kernel, **_attrs(strides, pads))


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     strides: tuple[int, int], pads) -> jax.Array:
  """Kernel gradient of an NHWC/HWIO conv: x [N, H, W, Ci], cotangent g [N, Ho, Wo, Co].

  ``pads`` are the conv's explicit ((lo, hi), (lo, hi)); the high pads follow from the
  shapes. Returns float32 [kh, kw, Ci, Co]. Check :func:`supports_conv` first.
  """
  _check(x, g, "conv_kernel_grad")
  out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], g.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call("shiftjax_conv_kernel_grad", out, vmap_method="sequential")
  return call(x, g, **_attrs(strides, pads))
