"""Export (``shiftjax.export``, ``train.export_checkpoint``, the export launcher): packed
ResNets (format version 4, run through their own flax code) equal the trained ones, for
each architecture and after a file round trip.

The trained models are conftest.py's session fixtures.
"""

import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from resnet_helpers import EVAL_BATCH, NO_RULES, packed_logits_fn, rbg_key
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import models
from shiftjax import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ helpers


def random_variables(model, image_shape, seed=0):
  """Initialized variables with BatchNorm statistics and affine params made non-trivial."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rbg_key(seed), x)
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if "kernel" in names:
      return leaf
    last = names[-1]
    if last in ("mean", "bias"):
      return jnp.asarray(rng.normal(0, 0.5, leaf.shape), leaf.dtype)
    if last in ("var", "scale"):
      return jnp.asarray(rng.uniform(0.3, 2.0, leaf.shape), leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, jax.device_get(variables))


def apply_in_batches(fn, images):
  return np.concatenate([np.asarray(fn(images[i:i + EVAL_BATCH]))
                         for i in range(0, len(images), EVAL_BATCH)])


def assert_same_predictions(packed_logits, model_logits):
  scale = np.max(np.abs(model_logits))
  diff = np.max(np.abs(packed_logits - model_logits))
  assert diff <= 1e-4 * scale, (diff, scale)
  np.testing.assert_array_equal(np.argmax(packed_logits, -1), np.argmax(model_logits, -1))


# ----------------------------------------------------- packed == training model, eval mode


def test_packed_denseshift_matches_trained_model_on_full_test_set(trained, packed,
                                                                  fashion_mnist):
  images = fashion_mnist["test_images"]
  model, variables = trained["model"], trained["variables"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(packed_logits_fn(packed), images)
  assert_same_predictions(got, expected)
  accuracy = np.mean(np.argmax(got, -1) == fashion_mnist["test_labels"])
  assert accuracy > 0.2  # it learned something (chance is 0.1): not noise against noise
  # Exactly 3 bits per quantized weight; BatchNorm folded into each quantized conv.
  entry = packed.layers["stage1_block0/conv1"]
  assert entry.folded_norm == "stage1_block0/bn1"
  assert packed.arrays["codes/stage1_block0/conv1"].shape == (
      math.prod(entry.kernel_shape) // 32, 3)
  assert packed.metadata["source"] == {"model": "resnet8", "dataset": "fashion_mnist",
                                       "step": 60, "float32_weight_bytes":
                                           trained["float32_weight_bytes"]}
  assert packed.metadata["architecture"]["name"] == "CifarResNet"


def _param(params, path):
  for part in path.split("/"):
    params = params[part]
  return params


def test_packed_mixed_widths_and_quantized_activations_match_on_full_test_set(
    trained_mixed, fashion_mnist, tmp_path):
  model, variables = trained_mixed["model"], trained_mixed["variables"]
  packed = train.packed_from_checkpoint(trained_mixed["config"], trained_mixed["workdir"])
  # Every layer at its own width, stored at exactly that many bits per weight.
  width = {"stem": None, "stage1": 4, "stage2": 3, "stage3": 2, "head": None}
  for path, entry in packed.layers.items():
    bits = width[path.split("_")[0].split("/")[0]]
    assert (entry.weight_spec.bits if entry.weight_spec else None) == bits, path
    if bits:
      assert packed.arrays[f"codes/{path}"].shape == (math.prod(entry.kernel_shape) // 32,
                                                      bits)
  sizes = [(math.prod(e.kernel_shape), e.weight_spec.bits)
           for e in packed.quantized_layers.values()]
  assert len(sizes) == 8  # 3 blocks of 2 convs, 2 shortcuts
  assert packed.size_report()["bits_per_quantized_weight"] == (
      sum(n * b for n, b in sizes) / sum(n for n, _ in sizes))
  # The activation specs, the float layers' (stem, head) included, and their learned
  # ranges, exactly as trained.
  specs = {p: e.input_spec for p, e in packed.layers.items()}
  assert specs["stem"] == sj.PACT(8, signed=True) and specs["head"] == sj.PACT(8)
  assert {specs[p] for p in packed.quantized_layers} == {sj.PACT(4)}
  clips = {}
  for path in packed.layers:
    clips[path] = packed.arrays[f"variables/params/{path}/activation/clip"]
    np.testing.assert_array_equal(
        clips[path], np.asarray(_param(variables["params"], path)["activation"]["clip"]))
  assert any(float(c) != 6.0 for c in clips.values())  # training moved the ranges
  # The file keeps them; the packed model quantizes its inputs as training did.
  reloaded = deploy.load(packed.save(tmp_path / "mixed.shiftjax"))
  assert reloaded.layers == packed.layers
  images = fashion_mnist["test_images"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(packed_logits_fn(reloaded), images)
  # The same predictions. (Logits differ by more than rounding: a folded BatchNorm's
  # output, a rounding away from the unfolded one's, can cross a PACT level.)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
  accuracy = np.mean(np.argmax(got, -1) == fashion_mnist["test_labels"])
  assert accuracy > 0.2  # it learned something (chance is 0.1)


def test_packed_s3_matches_trained_model_on_full_test_set(trained_s3, fashion_mnist):
  model, variables = trained_s3["model"], trained_s3["variables"]
  packed = ex.export(variables, model)
  images = fashion_mnist["test_images"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(packed_logits_fn(packed), images)
  assert_same_predictions(got, expected)
  # S3 has a zero code: its convs take the decode + conv path, and zeros survive.
  zeros = sum(int(np.sum(packed.kernel_codes(p) == e.weight_spec.code_format.zero_code))
              for p, e in packed.quantized_layers.items())
  assert zeros > 0


@pytest.mark.parametrize("name, make, image_shape", [
    ("cifar_deepshift_q6_all_layers", lambda: models.resnet8(
        width_multiplier=0.25, policy=sj.LayerPolicy(sj.DeepShiftQ(bits=6))),
     (16, 16, 3)),
    ("imagenet_basic_2bit_quantized_head", lambda: models.shift_model(models.ImageNetResNet(
        stage_sizes=(1, 1), block="basic", num_classes=7),
        policy=sj.LayerPolicy(sj.DenseShift(bits=2, init_method="he"), ("stem",))),
     (33, 33, 3)),
    ("imagenet_bottleneck_4bit", lambda: models.shift_model(models.ImageNetResNet(
        stage_sizes=(1, 1), block="bottleneck", num_classes=5),
        sj.DenseShift(bits=4, init_method="he")), (32, 32, 3)),
    # Speech ResNets over [time, mels, 1]: each pooling, uneven stem strides, a stride-1
    # first stage, and S3's zero code (decoded in XLA, not the pow2 kernel).
    ("speech_denseshift3_max", lambda: models.speech_resnet(
        num_classes=7, width_multiplier=0.5, quantizer=sj.DenseShift(bits=3)), (41, 24, 1)),
    ("speech_s3_meanmax_uneven_stem", lambda: models.speech_resnet(
        num_classes=5, stage_sizes=(1, 2), widths=(8, 16), stem_strides=(2, 1),
        pooling="meanmax", quantizer=sj.S3(bits=3)), (37, 20, 1)),
    ("speech_denseshift4_mean_first_stride_1", lambda: models.speech_resnet(
        num_classes=4, stage_sizes=(1,), widths=(8,), first_stride=1, pooling="mean",
        quantizer=sj.DenseShift(bits=4)), (19, 16, 1)),
])
def test_packed_matches_model_for_each_architecture(name, make, image_shape):
  del name
  model = make()
  variables = random_variables(model, image_shape)
  images = jax.random.normal(rbg_key(5), (3, *image_shape))
  expected = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables,
                                                                            images))
  packed = ex.export(variables, model)
  got = np.asarray(packed_logits_fn(packed)(images))
  assert got.shape == expected.shape
  assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
  reloaded = deploy.from_bytes(packed.to_bytes())
  np.testing.assert_array_equal(np.asarray(packed_logits_fn(reloaded)(images)), got)


def test_speech_resnet_file_round_trip_rebuilds_the_module(tmp_path):
  model = models.speech_resnet(num_classes=6, stage_sizes=(1, 1), widths=(16, 32),
                               width_multiplier=0.5, stem_strides=(2, 1), first_stride=1,
                               pooling="meanmax", quantizer=sj.DenseShift(bits=3))
  variables = random_variables(model, (29, 16, 1))
  path = tmp_path / "speech.shiftjax"
  ex.export(variables, model).save(path)
  loaded = deploy.load(path)
  assert loaded.framework == "linen" and loaded.model.endswith("SpeechResNet")
  assert loaded.metadata["architecture"]["config"] == {
      "num_classes": 6, "in_channels": 1, "full_precision": ["stem", "head"],
      "stage_sizes": [1, 1], "widths": [8, 16], "stem_strides": [2, 1], "first_stride": 1,
      "pooling": "meanmax", **NO_RULES}
  assert loaded.arrays["variables/params/head/kernel"].shape == (32, 6)  # mean and max
  module = ex.flax_module(loaded)
  features = jax.random.normal(rbg_key(3), (2, 29, 16, 1))
  np.testing.assert_array_equal(model.apply(variables, features, train=False),
                                module.apply(variables, features, train=False))


def test_float_kernels_in_bfloat16_on_request(trained, packed, fashion_mnist):
  half = ex.export(trained["variables"], trained["model"], float_dtype=jnp.bfloat16)
  for name in ("params/stem/kernel", "params/head/kernel"):
    assert half.arrays[f"variables/{name}"].dtype == jnp.bfloat16
  assert half.arrays["variables/params/head/bias"].dtype == np.float32
  for name in ("codes/stage1_block0/conv1", "variables/folded_norms/stage1_block0/conv1/scale"):
    np.testing.assert_array_equal(half.arrays[name], packed.arrays[name])
  reloaded = deploy.from_bytes(half.to_bytes())
  for name, a in half.arrays.items():
    assert reloaded.arrays[name].dtype == a.dtype
    np.testing.assert_array_equal(reloaded.arrays[name].view(np.uint8), a.view(np.uint8))
  images = fashion_mnist["test_images"][:EVAL_BATCH]
  full = np.asarray(packed_logits_fn(packed)(images))
  got = np.asarray(packed_logits_fn(reloaded)(images))
  assert np.max(np.abs(got - full)) <= 0.05 * np.max(np.abs(full))
  assert np.mean(np.argmax(got, -1) == np.argmax(full, -1)) > 0.97


def test_export_refuses_what_is_not_a_zoo_resnet(trained):
  with pytest.raises(deploy.PackedModelError, match="no 'stem/kernel'"):
    ex.export({"params": {}}, trained["model"])
  with pytest.raises(deploy.PackedModelError, match="supports CifarResNet, ImageNetResNet, "
                     "SpeechResNet modules, got Dense .*pack_model"):
    ex.export(trained["variables"], nn.Dense(3))
  with pytest.raises(deploy.PackedModelError, match="float_dtype must be float32 or bfloat16"):
    ex.export(trained["variables"], trained["model"], float_dtype=jnp.float16)


# ------------------------------------------------------------- checkpoint -> file, launcher


def test_export_checkpoint_writes_model_file_and_refuses_overwrite(trained, packed):
  report = train.export_checkpoint(trained["config"], trained["workdir"])
  path = os.path.join(trained["workdir"], "model.shiftjax")
  assert report["path"] == path and report["file_bytes"] == os.path.getsize(path)
  assert report["bits_per_quantized_weight"] == 3.0
  assert report["float32_weight_bytes"] == trained["float32_weight_bytes"]
  assert open(path, "rb").read() == packed.to_bytes()
  with pytest.raises(FileExistsError, match="--overwrite"):
    train.export_checkpoint(trained["config"], trained["workdir"])


def test_launcher_writes_and_refuses_to_overwrite(trained, tmp_path):
  output = tmp_path / "out.shiftjax"
  command = [sys.executable, "-m", "experiments.export",
             "--config=experiments/configs/fashion_mnist.py",
             f"--workdir={trained['workdir']}", f"--output={output}",
             "--config.width_multiplier=0.5", "--config.batch_size=32",
             "--config.eval_batch_size=1000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "bits per quantized weight" in run.stdout and "smaller" in run.stdout
  assert deploy.load(output).metadata["source"]["step"] == 60
  run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode != 0 and "already exists" in run.stderr
