"""fit: a user's own linen or NNX model trained on the user's own batches."""

import itertools
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import optax
import pytest

import shiftjax as sj
from shiftjax import loop
from shiftjax.policy import LayerPolicy
from tiny_models import LinenMLP, NnxMLP, NnxTinyTransformer

POLICY = LayerPolicy(sj.DenseShift(3), full_precision=("head",))
RNG = np.random.default_rng(0)
XS = RNG.normal(size=(256, 5)).astype(np.float32)
YS = ((XS[:, 0] > 0).astype(np.int32) + (XS[:, 1] > 0)).astype(np.int32)
EVAL = [{"image": XS[:128], "label": YS[:128]}]


def batches(start):
  """Batches as a function of the step: exact resume."""
  for step in itertools.count(start):
    i = (step * 32) % len(XS)
    yield {"image": XS[i:i + 32], "label": YS[i:i + 32]}


def _fit(model, workdir=None, **kwargs):
  kwargs = {"optimizer": optax.adam(1e-2), "num_steps": 40, "log_every": 10,
            "checkpoint_every": 10, "progress_bar": False, **kwargs}
  return loop.fit(model, kwargs.pop("data", batches), workdir=workdir, **kwargs)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_fit_trains_a_users_quantized_model_and_logs_metrics(framework, tmp_path):
  model = sj.quantize_model(LinenMLP() if framework == "linen" else NnxMLP(nnx.Rngs(0)),
                            POLICY)
  result = _fit(model, str(tmp_path), eval_data=EVAL, eval_every=20)
  assert result.metrics["eval_accuracy"] > 0.8
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines if "train_loss" in l] == [10, 20, 30, 40]
  assert lines[0]["train_loss"] > lines[-2]["train_loss"]
  assert "eval_accuracy" in lines[1]  # every eval_every steps
  if framework == "nnx":  # the trained NNX model comes back, its kernels still latents
    assert isinstance(result.model.fc1.kernel, sj.interception.ShiftKernel)
    assert model.fc1.kernel.get_value()["sign"] is not result.model.fc1.kernel.get_value()["sign"]
  else:
    assert set(result.model["params"]["fc1"]["kernel"]) == {"sign", "exponent"}


def _tokens(start):
  for step in itertools.count(start):  # each batch a function of its step
    window = np.random.default_rng(step).integers(0, 11, size=(4, 5), dtype=np.int32)
    yield {"inputs": window[:, :-1], "targets": window[:, 1:]}


def test_resume_is_bit_exact_for_a_non_resnet_model(tmp_path):
  def model():
    return sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)), POLICY)
  kwargs = dict(task=loop.next_token(), num_steps=20, data=lambda s: _tokens(s))
  straight = _fit(model(), str(tmp_path / "straight"), **kwargs)
  _fit(model(), str(tmp_path / "resumed"), stop_after_steps=10, **kwargs)
  resumed = _fit(model(), str(tmp_path / "resumed"), **kwargs)
  assert int(resumed.state.step) == 20
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)


def test_a_linen_run_of_fits_first_checkpoint_layout_resumes(tmp_path):
  """Workdirs written before the launcher moved onto fit keep a linen model's
  collections under 'state'; they resume as the current layout does."""
  def model():
    return sj.quantize_model(LinenMLP(), POLICY)
  _fit(model(), str(tmp_path / "now"), num_steps=20, stop_after_steps=10)
  stored = loop.checkpoint_manager(str(tmp_path / "now"), keep=1).restore(10)
  first = {"step": stored["step"], "params": stored["params"],
           "opt_state": stored["opt_state"], "state": {}}
  manager = loop.checkpoint_manager(str(tmp_path / "first"), keep=1)
  manager.save(10, args=loop.ocp.args.StandardSave(first))
  manager.wait_until_finished()
  manager.close()
  a = _fit(model(), str(tmp_path / "now"), num_steps=20)
  b = _fit(model(), str(tmp_path / "first"), num_steps=20)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(x, y)


def test_a_workdir_of_another_model_is_refused(tmp_path):
  _fit(sj.quantize_model(LinenMLP(), POLICY), str(tmp_path), num_steps=10)
  with pytest.raises(ValueError, match="not of this model and optimizer"):
    _fit(sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)), POLICY), str(tmp_path),
         task=loop.next_token(), num_steps=20, data=lambda s: _tokens(s))


def test_random_access_sources_are_shuffled_per_epoch_and_resumable():
  source = [{"image": XS[i], "label": YS[i]} for i in range(10)]

  class Source:  # what grain and tfds.data_source offer: len and [i]
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      return source[i]
  make = loop.batches_from(Source(), batch_size=4, seed=3)
  first = list(itertools.islice(make(0), 6))
  assert first[0]["image"].shape == (4, 5)
  epoch0 = np.concatenate([b["label"] for b in first[:2]])
  seen = {tuple(x) for b in first[:2] for x in b["image"]}
  assert len(seen) == 8  # no example twice within an epoch
  again = list(itertools.islice(make(3), 3))
  for a, b in zip(first[3:], again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert epoch0.shape == (8,)
  with pytest.raises(ValueError, match="needs batch_size"):
    loop.batches_from(Source(), batch_size=None, seed=0)


def test_dicts_of_arrays_are_batched_per_epoch():
  make = loop.batches_from({"image": XS[:10], "label": YS[:10]}, batch_size=4, seed=1)
  first = list(itertools.islice(make(0), 4))
  np.testing.assert_array_equal(np.sort(np.concatenate([b["label"] for b in first[:2]])),
                                np.sort(YS[:10][np.isin(XS[:10, 0], np.concatenate(
                                    [b["image"][:, 0] for b in first[:2]]))]))
  assert len({tuple(x) for b in first[:2] for x in b["image"]}) == 8
  np.testing.assert_array_equal(list(itertools.islice(make(3), 1))[0]["image"],
                                first[3]["image"])
  with pytest.raises(ValueError, match="differ in length"):
    next(loop.batches_from({"a": XS, "b": YS[:3]}, batch_size=2, seed=0)(0))


def test_divergence_stops_without_saving(tmp_path):
  def exploding(start):
    for b in batches(start):
      yield {"image": b["image"] * np.float32(1e30), "label": b["label"]}
  with pytest.raises(loop.NonFiniteLossError, match="stopped without saving"):
    _fit(NnxMLP(nnx.Rngs(0)), str(tmp_path), data=exploding, optimizer=optax.sgd(1e10))
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_distillation_and_latent_scale_reach_the_step():
  teacher = sj.quantize_model(NnxMLP(nnx.Rngs(5)), LayerPolicy(None))
  student = sj.quantize_model(NnxMLP(nnx.Rngs(0)), POLICY)
  frozen = _fit(student, num_steps=10, latent_lr_scale=0.0, optimizer=optax.sgd(0.1))
  np.testing.assert_array_equal(frozen.model.fc1.kernel.get_value()["sign"],
                                student.fc1.kernel.get_value()["sign"])
  assert not np.array_equal(frozen.model.fc1.bias.get_value(), student.fc1.bias.get_value())
  distilled = _fit(student, num_steps=10, teacher=lambda x: teacher(x),
                   distillation=sj.distill.Distillation(weight=1.0, temperature=2.0))
  plain = _fit(student, num_steps=10)
  assert distilled.metrics["train_loss"] != plain.metrics["train_loss"]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_steps": 0}, "num_steps must be a positive integer, got 0"),
    ({"log_every": 1.5}, "log_every must be a positive integer"),
    ({"teacher": lambda x: x}, "needs both teacher and distillation"),
    ({"data": 42}, "data must be a function of the start step"),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    _fit(NnxMLP(nnx.Rngs(0)), **kwargs)


# Runs in a subprocess with --xla_force_host_platform_device_count set: fit of the NNX
# transformer (argv[1]: 'shift' or 'float'), its batch sharded over every device; prints
# the sum of each final parameter.
MULTIDEVICE = r"""
import itertools, json, sys
import jax, numpy as np, optax
from flax import nnx
import shiftjax as sj
from shiftjax import loop
from tiny_models import NnxTinyTransformer
def tokens(start):
  for step in itertools.count(start):
    w = np.random.default_rng(step).integers(0, 11, size=(8, 5), dtype=np.int32)
    yield {"inputs": w[:, :-1], "targets": w[:, 1:]}
spec = sj.DenseShift(3) if sys.argv[1] == "shift" else None
model = sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)),
                          sj.LayerPolicy(spec, full_precision=("head",)))
# SGD: its update is linear in the gradient, so another summation order across devices
# moves the parameters by rounding only (adam's m / sqrt(v) amplifies it near zero).
result = loop.fit(model, tokens, task=loop.next_token(), optimizer=optax.sgd(0.1),
                  num_steps=5, log_every=5, progress_bar=False)
leaf = jax.tree.leaves(result.state.params)[0]
print("RESULT " + json.dumps({"devices": jax.device_count(),
                              "batch_on": len(leaf.sharding.device_set),
                              "sums": [float(np.sum(x)) for x in jax.tree.leaves(result.state.params)]}))
"""


def _run_on(devices: int, kind: str) -> dict:
  tests = os.path.dirname(os.path.abspath(__file__))  # tiny_models
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", MULTIDEVICE, kind],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_fit_shards_the_batch_over_every_device_and_matches_one_device():
  four, one = _run_on(4, "float"), _run_on(1, "float")
  assert (four["devices"], one["devices"]) == (4, 1)
  assert four["batch_on"] == 4  # the state is placed on every device
  np.testing.assert_allclose(four["sums"], one["sums"], rtol=2e-4, atol=2e-4)
  # Shift latents near a threshold may flip on one side of a rounding difference in the
  # summed gradient (another summation order): the run holds, the latents are finite.
  shift = _run_on(4, "shift")
  assert shift["batch_on"] == 4 and np.isfinite(shift["sums"]).all()


def test_load_into_gives_an_nnx_model_its_checkpointed_parameters(tmp_path):
  kwargs = dict(task=loop.next_token(), num_steps=3, data=lambda s: _tokens(s))
  trained = _fit(sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)), POLICY), str(tmp_path),
                 **kwargs).model
  fresh = sj.quantize_model(NnxTinyTransformer(nnx.Rngs(5)), POLICY)
  loaded = loop.load_into(fresh, str(tmp_path))
  for a, b in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)),
                  jax.tree.leaves(nnx.state(trained, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="is not in the checkpoint"):
    loop.load_into(NnxTinyTransformer(nnx.Rngs(0), d=16), str(tmp_path))
