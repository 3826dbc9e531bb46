"""Data parallelism: a run on 4 (virtual CPU) devices matches the same run on 1 device, and
a checkpoint written on 4 devices restores and continues on 1.

Each device count needs its own process (``--xla_force_host_platform_device_count`` is
read when the CPU backend starts), so the runs happen in subprocesses; mock data.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

# End-to-end trainings on 4 and 1 devices: in the slow set (python -m pytest -m slow).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the subprocess: each argument is a job, "fresh:QUANTIZER:WORKDIR" (train from
# scratch) or "resume:WORKDIR" (continue the DenseShift run found there); jobs share a
# compilation cache, so a second run of the same program does not compile again.
SCRIPT = r"""
import json, os, sys, tempfile
import jax
import tensorflow_datasets as tfds
from experiments.configs import default
from shiftjax import train

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

def config(quantizer):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = 0.25
  c.dataset = "cifar10"
  c.quantizer = quantizer
  c.bits = 3
  c.batch_size = 16           # 4 examples per device on 4 devices
  c.eval_batch_size = 16
  c.num_train_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.fast_grad = "off"
  c.progress_bar = False
  return c

out = {"devices": jax.device_count()}
with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
  for job in sys.argv[1:]:
    kind, rest = job.split(":", 1)
    quantizer, workdir = rest.split(":", 1) if kind == "fresh" else ("DenseShift", rest)
    out[job] = train.train_and_evaluate(config(quantizer), workdir)["test_loss"]
print("RESULT " + json.dumps(out))
"""


def run(devices, *jobs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, jobs)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  if proc.returncode:
    raise AssertionError(f"{devices}-device run failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-6000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  assert result["devices"] == devices
  return result


def losses(workdir):
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """DenseShift ResNet-8, 6 steps: on 4 devices; then on 1 device, fresh and resumed from
  the 4-device checkpoint of step 4."""
  root = tmp_path_factory.mktemp("multidevice")
  four, one, resumed = root / "four", root / "one", root / "resumed"
  result4 = run(4, f"fresh:DenseShift:{four}")
  shutil.copytree(four, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if stopped after step 4
  result1 = run(1, f"fresh:DenseShift:{one}", f"resume:{resumed}")
  return {"four": (four, result4[f"fresh:DenseShift:{four}"]),
          "one": (one, result1[f"fresh:DenseShift:{one}"]),
          "resumed": (resumed, result1[f"resume:{resumed}"])}


def test_four_devices_train_like_one(runs):
  (four, test_loss4), (one, test_loss1) = runs["four"], runs["one"]
  # Same global batches, BatchNorm statistics over the global batch: equal up to the
  # order of float reductions (about 1e-7 here; a latent that close to its threshold
  # could flip differently, hence the looser bound).
  l4, l1 = losses(four), losses(one)
  assert sorted(l4) == sorted(l1) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([l4[s] for s in l4], [l1[s] for s in l4], rtol=1e-4)
  np.testing.assert_allclose(test_loss4, test_loss1, rtol=1e-4)


def test_checkpoint_written_on_four_devices_continues_on_one(runs):
  (four, _), (resumed, test_loss) = runs["four"], runs["resumed"]
  got, uninterrupted = losses(resumed), losses(four)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  # Steps 5 and 6 ran on one device from the 4-device checkpoint of step 4.
  np.testing.assert_allclose([got[5], got[6]], [uninterrupted[5], uninterrupted[6]],
                             rtol=1e-5)
  assert np.isfinite(test_loss)
