"""Keeps XLA:CPU's scratch memory mapped from one step to the next (glibc malloc settings).

XLA:CPU runs a compiled step with one temporary buffer for all its intermediates (205 MB
for a ResNet-20 training step at batch 128), allocated with ``malloc`` on the thread that
runs the step and freed at its end. glibc serves a request above its mmap threshold (32
MiB at most) from a fresh ``mmap`` and returns it with ``munmap``: every step, the kernel
maps and zeroes the whole buffer again, one 4 KiB page fault at a time. On this project's
2-core machine that was 50,000 faults and about 100 ms of system time per ResNet-20 step,
a fifth of the step's CPU time (``benchmarks/train_step.py`` prints the step with and
without). Turning mmap off is not enough: a thread's own arena, which XLA's threads have,
cannot grow past 64 MiB and maps large requests regardless.

:func:`reuse_freed_memory` sets glibc to serve every thread from the main heap, never by
``mmap``, and to keep freed memory rather than hand it back to the kernel, so the second
step onwards reuses the first step's pages. The price is memory: the process keeps its
peak heap, and small allocations carve pieces out of a freed scratch buffer, so that for
a while the next step's buffer no longer fits in it and the heap grows by one buffer more;
it settles after a few steps (ResNet-20: 915 MB resident from step 10 to step 120,
against 710-785 MB without). The main job (``experiments/train.py`` on
Fashion-MNIST) peaked at 1.45 GB resident instead of 0.93 GB, and ran in 186 s instead of
252 s, with 7 s of system time instead of 115 s.

It changes the whole process and only takes hold for threads that have not yet
allocated, so call it before JAX's first computation, as ``experiments/train.py`` does
(``--noreuse_freed_memory`` turns it off there).
"""

from __future__ import annotations

import ctypes
import platform
import warnings

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt's int takes: freed memory at the top of the heap is
# returned to the kernel only past 2 GiB.
_MAX_TRIM_THRESHOLD = 2**31 - 1


def is_supported() -> bool:
  """Whether this process's C library is glibc on Linux, whose malloc the settings tune."""
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _jax_started() -> bool:
  """Whether JAX has created its backends (and with them its threads)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: the settings are harmless
    return False


def reuse_freed_memory() -> bool:
  """Makes malloc keep and reuse freed memory; returns whether the settings were applied.

  Applies nothing (returns False) where the C library is not glibc, and, with a warning,
  once JAX has started its backends: their threads already have arenas of their own.
  Equivalent to starting Python with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
  """
  if not is_supported():
    return False
  if _jax_started():
    warnings.warn("shiftjax.host_memory.reuse_freed_memory() was called after JAX's first "
                  "computation; it changes nothing then. Call it at the start of the "
                  "program.")
    return False
  libc = ctypes.CDLL(None)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _MAX_TRIM_THRESHOLD))
  applied = [libc.mallopt(param, value) == 1 for param, value in settings]
  return all(applied)


def peak_resident_bytes() -> int:
  """The most resident memory this process has held so far, in bytes (``getrusage``).

  Linux reports ``ru_maxrss`` in KiB, macOS in bytes; 0 where there is no ``resource``
  module (Windows).
  """
  try:
    import resource  # pylint: disable=g-import-not-at-top  # Unix only
  except ImportError:
    return 0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if platform.system() == "Darwin" else peak * 1024)
