"""The training loop: resumption bit for bit, divergence, config errors, outputs."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import shiftjax as sj
from experiments.configs import default
from shiftjax import data as data_lib
from shiftjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = 0.25
  c.dataset = "fashion_mnist"
  c.quantizer = "DenseShift"
  c.bits = 3
  c.batch_size = 16
  c.eval_batch_size = 40
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.progress_bar = False
  for k, v in overrides.items():
    c[k] = v
  return c


def mocked():
  return tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE)


def restored_params(workdir, config):
  manager = train.checkpoint_manager(workdir, config)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, restored["params"]


def assert_trees_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


# Mixed methods and widths by stage, PACT 4-bit activations, an 8-bit signed stem input.
MIXED = {"quantizer": "DenseShift", "layer_quantizers": "stage1_*/*=4,stage3_*/*=S3:3",
         "activation_bits": 4, "layer_activations": "stem=8:signed"}


# The mixed run (DenseShift and S3 layers, PACT inputs) resumes every kind in the default
# suite; one method per run is the slow set's.
@pytest.mark.parametrize("overrides", [
    pytest.param({"quantizer": "DenseShift"}, marks=pytest.mark.slow, id="DenseShift"),
    pytest.param({"quantizer": "S3"}, marks=pytest.mark.slow, id="S3"),
    pytest.param(MIXED, id="mixed")])
def test_interrupted_run_resumes_to_bit_identical_parameters(tmp_path, overrides):
  config = tiny_config(**overrides)
  with mocked():
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    partial = train.train_and_evaluate(config, str(tmp_path / "split"), stop_after_steps=4)
    assert partial["steps"] == 4 and "test_accuracy" not in partial
    assert not os.path.exists(tmp_path / "split" / train.SUMMARY_FILE)
    resumed = train.train_and_evaluate(config, str(tmp_path / "split"))
  assert whole["steps"] == resumed["steps"] == 6
  step_a, params_a = restored_params(str(tmp_path / "whole"), config)
  step_b, params_b = restored_params(str(tmp_path / "split"), config)
  assert step_a == step_b == 6
  assert_trees_bitwise_equal(params_a, params_b)
  assert whole["test_accuracy"] == resumed["test_accuracy"]
  # The resumed run's metrics tell the same story as the uninterrupted one.
  lines = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
  whole_lines = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [l["step"] for l in whole_lines]
  for a, b in zip(lines, whole_lines):
    a.pop("steps_per_second", None), b.pop("steps_per_second", None)  # wall-clock
    assert a == b


def _proc_status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(dict(line.split(":", 1) for line in f)[field].split()[0]) * 1024


def test_outputs_of_a_run(tmp_path):
  resident_before = _proc_status_bytes("VmRSS")
  with mocked():
    summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
  on_disk = json.load(open(tmp_path / "summary.json"))
  for key in ("test_accuracy", "float32_weight_bytes", "packed_weight_bytes", "steps",
              "wall_seconds"):
    assert key in on_disk
  assert on_disk["test_examples"] == 64 and on_disk["steps"] == 6
  assert summary["packed_weight_bytes"] < summary["float32_weight_bytes"]
  # The process's peak resident memory: at least what it held before the run (jax alone
  # is more than 50 MB), at most the peak the kernel reports for it now.
  assert summary["peak_rss_bytes"] >= resident_before > 50 << 20
  assert on_disk["peak_rss_bytes"] <= _proc_status_bytes("VmHWM")
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  logged = [r for r in records if "train_loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  for r in logged:
    assert 0 <= r["sign_change_fraction"] <= 1 and 0 <= r["exponent_change_fraction"] <= 1
    assert r["learning_rate"] > 0
  assert any("test_accuracy" in r for r in records)
  assert os.path.getsize(tmp_path / "training_curves.png") > 1000
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert on_disk["training_wall_seconds"] == on_disk["wall_seconds"]
  # Run again: evaluates the finished run and keeps the wall time of its training.
  with mocked():
    again = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert again["test_accuracy"] == summary["test_accuracy"]
  assert again["training_wall_seconds"] == on_disk["wall_seconds"]
  assert json.load(open(tmp_path / "summary.json"))["training_wall_seconds"] == (
      on_disk["wall_seconds"])


def test_divergence_stops_without_overwriting_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with mocked():
    train.train_and_evaluate(tiny_config(quantizer="float"), workdir, stop_after_steps=2)
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint \\(step 2\\)"):
      train.train_and_evaluate(tiny_config(quantizer="float", learning_rate=1e38,
                                           log_every_steps=1), workdir)
  step, params = restored_params(workdir, tiny_config())
  assert step == 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("override, message", [
    ({"model": "resnet19"}, "config.model: unknown model 'resnet19'"),
    ({"quantizer": "Ternary"}, "unknown quantizer 'Ternary'"),
    ({"dataset": "imagenet21k"}, "unknown dataset 'imagenet21k'"),
    ({"bits": 6}, "DenseShift supports bits in 2..5, got 6"),
    ({"optimizer": "lamb"}, "config.optimizer must be one of"),
    ({"eigen_convs": "on"}, "config.eigen_convs must be one of ('auto', 'off'), got 'on'"),
    ({"batch_size": 0}, "config.batch_size must be a positive integer, got 0"),
    ({"layer_quantizers": "stage4_*/*=2"},
     "layer_quantizers pattern 'stage4_*/*' matches no layer of the model"),
    ({"layer_quantizers": "stage1_*/*=4,*/conv1=2"},
     "layer 'stage1_block0/conv1' gets two weight specs: pattern 'stage1_*/*' gives "
     "DenseShift(bits=4"),
    ({"layer_quantizers": "head=4"}, "layer 'head' gets two weight specs: pattern 'head' "
                                     "gives float and pattern 'head' gives"),
    ({"layer_quantizers": "stage1_*/*=9"}, "config.layer_quantizers entry 'stage1_*/*=9': "
                                           "DenseShift supports bits in 2..5, got 9"),
    ({"layer_quantizers": "stage1_*/*=Ternary:2"}, "unknown quantizer 'Ternary'"),
    ({"layer_quantizers": "stage1_*/*"}, "entry 'stage1_*/*' is not 'pattern=value'"),
    ({"quantizer": "float", "layer_quantizers": "stage1_*/*=4"},
     "config.quantizer is float, so name the method ('DenseShift:4')"),
    ({"activation_bits": 9}, "config.activation_bits=9: PACT supports bits in 2..8, got 9"),
    ({"activation_quantizer": "LSQ", "activation_bits": 4},
     "config.activation_quantizer must be one of ['PACT', 'FixedPoint'], got 'LSQ'"),
    ({"layer_activations": "stem=1"}, "config.layer_activations entry 'stem=1': "),
    ({"layer_activations": "stage1_*/*=4:unsigned"}, "'<bits>' or '<bits>:signed'"),
    ({"layer_activations": "classifier=8"},
     "layer_activations pattern 'classifier' matches no layer of the model"),
])
def test_config_errors_are_reported_before_anything_runs(tmp_path, override, message):
  # Lowering or compiling is what must not happen; the policy checks trace the model
  # (jax.eval_shape: a jaxpr, /jax/core/compile/jaxpr_trace_duration), which is cheap.
  compiled = []
  listener = lambda event, *_, **__: (
      compiled.append(event) if "compile" in event and "jaxpr_trace" not in event else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError) as info:
      train.train_and_evaluate(tiny_config(**override), str(tmp_path / "w"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert message in str(info.value)
  assert not os.path.exists(tmp_path / "w")  # nothing written
  assert not compiled  # nothing compiled


def test_batch_size_must_divide_over_devices(monkeypatch, tmp_path):
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  with pytest.raises(ValueError, match="batch_size=16 is not divisible by the 3 devices"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


def test_code_changes_counts_sign_and_exponent_changes_apart():
  fmt = sj.DenseShift(3).code_format
  old = {"a": jnp.array([0, 1, 5, 7], jnp.uint8)}
  new = {"a": jnp.array([4, 2, 5, 3], jnp.uint8)}  # sign only, exponent only, none, sign
  changes = train.code_changes(old, new, fmt)
  assert float(changes["sign_change_fraction"]) == 0.5
  assert float(changes["exponent_change_fraction"]) == 0.25


def test_learning_rate_schedule_warmup_then_cosine():
  config = tiny_config(learning_rate=0.1, warmup_epochs=1.0)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=110)
  assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.05) < 1e-7
  assert abs(float(lr(10)) - 0.1) < 1e-7
  assert abs(float(lr(60)) - 0.05) < 1e-6 and float(lr(110)) < 1e-7


def test_weight_decay_reaches_latents():
  params = {"conv": {"kernel": {"sign": jnp.ones(3), "exponent": jnp.ones((3, 3))}},
            "bn": {"scale": jnp.ones(3)}}
  assert all(jax.tree.leaves(train.weight_decay_mask(params, "all")))
  mask = train.weight_decay_mask(params, "kernels")
  assert mask["conv"]["kernel"]["sign"] and not mask["bn"]["scale"]


def test_weight_decay_all_but_latents_skips_exactly_the_latents():
  params = {"stem": {"kernel": jnp.ones((3, 3))},
            "conv": {"kernel": {"sign": jnp.ones(3), "exponent": jnp.ones((3, 3))}},
            "bn": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}
  mask = train.weight_decay_mask(params, "all_but_latents")
  assert mask == {"stem": {"kernel": True},
                  "conv": {"kernel": {"sign": False, "exponent": False}},
                  "bn": {"scale": True, "bias": True}}
  assert not any(jax.tree.leaves(train.weight_decay_mask(params, "none")))


def test_latent_lr_scale_scales_only_the_latents_steps():
  params = {"stem": {"kernel": jnp.ones(2)},
            "conv": {"kernel": {"sign": jnp.ones(2), "exponent": jnp.ones(2)}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  config = tiny_config(momentum=0.0, weight_decay=1e-2, weight_decay_on="all",
                       latent_lr_scale=4.0)
  tx = train.create_optimizer(config, optax.constant_schedule(0.1))
  updates, _ = tx.update(grads, tx.init(params), params)
  # SGD on (g + wd * p): float params step -lr * 0.51, latents m = 4 times that.
  np.testing.assert_allclose(updates["stem"]["kernel"], -0.1 * 0.51, rtol=1e-6)
  for latent in updates["conv"]["kernel"].values():
    np.testing.assert_allclose(latent, -4 * 0.1 * 0.51, rtol=1e-6)


def test_latent_lr_scale_keeps_the_optimizer_state_structure():
  # A checkpoint restores (and exports) under any scale, runs made before the option too.
  params = {"stem": {"kernel": jnp.ones(2)}, "conv": {"kernel": {"sign": jnp.ones(2)}}}
  state = lambda scale: train.create_optimizer(
      tiny_config(latent_lr_scale=scale), optax.constant_schedule(0.1)).init(params)
  # What create_optimizer built before the option existed.
  reference = optax.chain(
      optax.add_decayed_weights(1e-4, mask=lambda p: jax.tree.map(lambda _: True, p)),
      optax.sgd(optax.constant_schedule(0.1), momentum=0.9)).init(params)
  for scale in (1.0, 4.0):
    assert jax.tree.structure(state(scale)) == jax.tree.structure(reference)


def test_latent_lr_scale_must_be_positive():
  with pytest.raises(ValueError, match="config.latent_lr_scale must be positive, got 0.0"):
    train.validate_config(tiny_config(latent_lr_scale=0.0))


def test_label_smoothing_loss_matches_the_smoothed_targets_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 1])
  log_p = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  eps, classes = 0.3, 3
  # Targets: 1 - eps + eps / C on the label, eps / C elsewhere.
  targets = np.full((2, 3), eps / classes)
  targets[[0, 1], [0, 1]] += 1 - eps
  expected = -(targets * log_p).sum(-1).mean()
  smoothed = train.image_task(tiny_config(label_smoothing=eps)).loss
  np.testing.assert_allclose(smoothed(logits, {"label": labels})[0], expected, rtol=1e-6)
  # Zero smoothing is the plain one-hot loss.
  np.testing.assert_allclose(train.image_task(tiny_config()).loss(logits, {"label": labels})[0],
                             -log_p[[0, 1], [0, 1]].mean(), rtol=1e-6)


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_outside_zero_to_one_is_refused(eps):
  message = f"config.label_smoothing must be in \\[0, 1\\), got {eps}"
  with pytest.raises(ValueError, match=message):
    train.validate_config(tiny_config(label_smoothing=eps))


def test_spec_augment_fields_replace_only_the_mask_sizes_they_set():
  config = tiny_config(dataset="synthetic_slu")
  standard = data_lib.get_spec("synthetic_slu").augment
  assert train.training_augmentation(config) is True  # the spec's own
  config.spec_augment.max_time = 40
  config.spec_augment.freq_masks = 0
  assert train.training_augmentation(config) == dataclasses.replace(
      standard, max_time=40, freq_masks=0)
  config.augment = False
  with pytest.raises(ValueError, match="config.augment=False"):
    train.validate_config(config)


@pytest.mark.parametrize("dataset, field, value, message", [
    ("fashion_mnist", "max_time", 40, "fashion_mnist is not a speech dataset"),
    ("synthetic_slu", "max_freq", -1, "config.spec_augment.max_freq must be a non-negative "
                                      "integer, got -1"),
])
def test_bad_spec_augment_sizes_are_refused(dataset, field, value, message):
  config = tiny_config(dataset=dataset)
  config.spec_augment[field] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)


@pytest.mark.slow
def test_launchers_train_then_evaluate(tmp_path):
  """The absl launchers on the real offline Fashion-MNIST (prepared into a tmp dir)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  common = ["--config=experiments/configs/fashion_mnist.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data_dir={tmp_path / 'data'}", "--config.width_multiplier=0.25",
            "--config.num_train_steps=3", "--config.batch_size=32",
            "--config.eval_batch_size=1000"]
  run = subprocess.run([sys.executable, "-m", "experiments.train", *common], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "test accuracy" in run.stdout and "10000 test examples" in run.stdout
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  run = subprocess.run([sys.executable, "-m", "experiments.evaluate", *common], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  evaluated = json.loads(run.stdout[run.stdout.index("{"):])
  assert evaluated["step"] == 3
  assert evaluated["test_accuracy"] == summary["test_accuracy"]
