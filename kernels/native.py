"""C++ CPU kernels called through XLA's FFI, built on first use for the machine they run on.

The source ships with the package (``kernels/*.cc``); the first call compiles it with the
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
import jaxlib

_SOURCE = pathlib.Path(__file__).with_name("cpu_conv_kernel_grad.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# FFI targets the library defines: {name registered with XLA: exported symbol}
_TARGETS = {"shiftjax_conv_kernel_grad": "ShiftjaxConvKernelGrad"}

_enabled = os.environ.get("SHIFTJAX_NATIVE", "1") != "0"


@contextlib.contextmanager
def disabled():
  """Within the block, :func:`available` is False: code traced here takes the XLA path."""
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
    warnings.warn("shiftjax: no C++ compiler (g++ or $CXX) found; CPU convolution kernel "
                  "gradients use the slower XLA path. Install g++ to enable the native kernel.")
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


# ------------------------------------------------------------- convolution kernel gradient

# The kernel's widest register vector (AVX-512) holds 16 float32 output channels.
_CO_MULTIPLE = 16


def supports_conv_kernel_grad(x: jax.Array, g: jax.Array) -> bool:
  """Whether :func:`conv_kernel_grad` takes these operands.

  float32, output channels a multiple of 16, one device: an FFI call has no sharding rule,
  so under data parallelism XLA would gather the whole batch on every device.
  """
  return (x.dtype == g.dtype == jax.numpy.float32 and g.shape[-1] % _CO_MULTIPLE == 0
          and jax.device_count() == 1 and available())


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     strides: tuple[int, int], pads) -> jax.Array:
  """Kernel gradient of an NHWC/HWIO conv: x [N, H, W, Ci], cotangent g [N, Ho, Wo, Co].

  ``pads`` are the conv's explicit ((lo, hi), (lo, hi)); the high pads follow from the
  shapes. Returns float32 [kh, kw, Ci, Co]. Check :func:`supports_conv_kernel_grad` first.
  """
  if not supports_conv_kernel_grad(x, g):
    raise ValueError(f"native conv_kernel_grad takes float32 operands with output channels "
                     f"a multiple of {_CO_MULTIPLE} on one CPU device; got {x.dtype} "
                     f"{x.shape} and {g.dtype} {g.shape} on {jax.device_count()} device(s) "
                     f"(native kernels available: {available()})")
  out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], g.shape[-1]), jax.numpy.float32)
  call = jax.ffi.ffi_call("shiftjax_conv_kernel_grad", out, vmap_method="sequential")
  return call(x, g, sh=int(strides[0]), sw=int(strides[1]), pt=int(pads[0][0]),
              pl=int(pads[1][0]))
