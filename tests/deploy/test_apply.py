"""The packed forward pass (``shiftjax.deploy.apply``): the native CPU conv, the kernels'
code layout, and ``jax.export`` artifacts that run without shiftjax.

The trained model is conftest.py's session fixture.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import deploy


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native conv is a CPU kernel")
def test_packed_conv_layers_run_fused_on_the_native_cpu_conv(packed, fashion_mnist):
  from shiftjax.kernels.cpu import native  # pylint: disable=import-outside-toplevel
  images = jnp.asarray(fashion_mnist["test_images"][:500])
  forward = functools.partial(sj.deploy.apply.forward, plan=packed.plan)
  jaxpr = str(jax.make_jaxpr(forward)(packed.device_arrays, images))
  # Each conv with a multiple of 16 output channels (the native kernel's vector), its
  # epilogue included; the width-1/2 model's 8-channel convs take lax.conv.
  native_convs = [l for l in packed.layers if l.op == "conv" and l.shape[-1] % 16 == 0]
  assert 0 < len(native_convs) < sum(l.op == "conv" for l in packed.layers)
  assert jaxpr.count("shiftjax_fused_conv") == len(native_convs)
  fused = np.asarray(jax.jit(forward)(packed.device_arrays, images))
  with native.disabled():  # lax.conv and XLA's scale/bias/residual/relu ops
    # A new function: jax caches traces by function, and the choice is made when tracing.
    forward = functools.partial(sj.deploy.apply.forward, plan=packed.plan)
    jaxpr = str(jax.make_jaxpr(forward)(packed.device_arrays, images))
    assert "shiftjax_fused_conv" not in jaxpr
    plain = np.asarray(jax.jit(forward)(packed.device_arrays, images))
  assert np.max(np.abs(fused - plain)) <= 1e-5 * np.max(np.abs(plain))
  np.testing.assert_array_equal(np.argmax(fused, -1), np.argmax(plain, -1))


def test_bit_planes_become_the_kernels_words_once_where_the_kernels_run(packed):
  assert packed.code_layout == "bitplanes"
  assert deploy.apply.in_kernel_layout(packed, "xla") is packed  # XLA decodes bit planes
  words = deploy.apply.in_kernel_layout(packed, "pallas_interpret")
  assert words.code_layout == "words"
  assert deploy.apply.in_kernel_layout(packed, "pallas_interpret") is words  # kept, once
  for layer in packed.layers:
    if layer.quantized:
      np.testing.assert_array_equal(
          deploy.decode_kernel(words.arrays[f"{layer.name}/kernel"], layer.code_format,
                               layer.shape, "words"),
          deploy.decode_kernel(packed.arrays[f"{layer.name}/kernel"], layer.code_format,
                               layer.shape, "bitplanes"))


# --------------------------------------------------------------------- jax.export artifact

_STANDALONE = """
import sys
artifact, images, out = sys.argv[1:]
try:
  import shiftjax
except ModuleNotFoundError:
  pass
else:
  raise SystemExit("shiftjax is importable: the test would prove nothing")
import jax
import numpy as np
exported = jax.export.deserialize(bytearray(open(artifact, "rb").read()))
np.save(out, np.asarray(exported.call(np.load(images))))
print("ok", exported.in_avals)
"""


def test_jax_export_artifact_runs_without_shiftjax(packed, fashion_mnist, tmp_path):
  pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
  artifact = deploy.save_serialized(packed, tmp_path / "model.jax_exported", (None, 28, 28, 1))
  images = fashion_mnist["test_images"][:50]
  np.save(tmp_path / "images.npy", images)
  # jax and numpy from their site-packages as PYTHONPATH, without the site module (-S):
  # no .pth file runs, so no editable install makes shiftjax importable.
  site_packages = os.path.dirname(os.path.dirname(jax.__file__))
  run = subprocess.run(
      [sys.executable, "-s", "-S", "-c", _STANDALONE, str(artifact),
       str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
      cwd=tmp_path, env={"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", ""),
                         "PYTHONPATH": site_packages},
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "ok" in run.stdout
  logits = np.load(tmp_path / "logits.npy")
  expected = np.asarray(deploy.packed_apply(packed, images))
  assert logits.shape == (50, 10)
  assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
