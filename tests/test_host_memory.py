"""shiftjax.host_memory: freed scratch memory is reused instead of faulted in again."""

import json
import subprocess
import sys
import textwrap

import pytest

from shiftjax import host_memory

pytestmark = pytest.mark.skipif(not host_memory.is_supported(), reason="needs glibc")

# A jitted function whose 64 MiB intermediates live in XLA's per-call scratch buffer
# (about 200 MiB); prints the MiB faulted in per call in the steady state, and the result.
_FAULTS_PER_CALL = textwrap.dedent("""
    import json, resource, sys
    from shiftjax import host_memory
    applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
      a = jnp.cumsum(jnp.sin(x))
      return jnp.cumsum(jnp.cos(a)[::-1])[-1] + a[-1]

    x = jnp.linspace(0.0, 1.0, 16 * 2**20)
    # Until the heap settles, small allocations carve pieces out of a freed buffer, which
    # then no longer fits the next call's: up to about 15 calls. The least of 4 windows
    # of 5 calls after 20 is the steady state.
    for _ in range(20):
      f(x).block_until_ready()
    windows = []
    for _ in range(4):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      results = [float(f(x)) for _ in range(5)]
      windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(dict(applied=applied, mib_per_call=min(windows) * 4096 / 2**20 / 5,
                          result=results[-1])))
""")


def _run(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, mode], check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.splitlines()[-1])


def test_reuse_stops_the_per_call_page_faults_of_the_scratch_buffer():
  default, reuse = _run("default"), _run("reuse")
  assert not default["applied"] and reuse["applied"]
  # glibc's default maps the scratch buffer afresh every call...
  assert default["mib_per_call"] > 100, default
  # ...the settings keep it: a tenth of that at most (in practice none).
  assert reuse["mib_per_call"] < default["mib_per_call"] / 10, (default, reuse)
  assert reuse["result"] == default["result"]


def test_after_the_first_computation_it_warns_and_applies_nothing():
  script = textwrap.dedent("""
      import warnings
      import jax.numpy as jnp
      from shiftjax import host_memory
      jnp.ones(3).block_until_ready()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = host_memory.reuse_freed_memory()
      print(applied, [str(w.message) for w in caught])
  """)
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True, timeout=300).stdout
  assert out.startswith("False ")
  assert "after JAX's first computation" in out


def test_other_c_libraries_are_left_alone(monkeypatch):
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
  assert not host_memory.is_supported()
  assert host_memory.reuse_freed_memory() is False
