"""Running a packed ResNet through its own flax code (``shiftjax.export.load``): the
codes in the kernels' word layout made once at load, and ``jax.export`` artifacts that
run without shiftjax.

The trained model is conftest.py's session fixture.
"""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_helpers import packed_logits_fn
from shiftjax import codes as codes_lib
from shiftjax import export as ex
from shiftjax.deploy import packed_layers


def test_bit_planes_become_the_kernels_words_once_at_load(packed):
  _, variables = ex.load(packed)
  codes = variables[packed_layers.CODES_COLLECTION]
  for path, entry in packed.quantized_layers.items():
    words = codes
    for part in path.split("/"):
      words = words[part]
    words = words["kernel"]  # a conv's: [ceil(R / P), C] words, as the kernels read them
    rows, bits = math.prod(entry.kernel_shape[:-1]), entry.weight_spec.bits
    assert words.shape == (codes_lib.num_words(rows, bits), entry.kernel_shape[-1])
    np.testing.assert_array_equal(
        np.asarray(codes_lib.unpack(words, bits, rows)).reshape(entry.kernel_shape),
        packed.kernel_codes(path))


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
  model, variables = ex.load(packed)
  batch = jax.export.symbolic_shape("b")[0]
  spec = jax.ShapeDtypeStruct((batch, 28, 28, 1), np.float32)
  artifact = packed_layers.save_artifact(tmp_path / "model.jax_exported", model, spec,
                                         variables=variables, train=False)
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
  expected = np.asarray(packed_logits_fn(packed)(images))
  assert logits.shape == (50, 10)
  assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
