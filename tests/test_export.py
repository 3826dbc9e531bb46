"""Export: packed models equal the trained ones; the file format refuses bad files.

Two short trainings on the real Fashion-MNIST (DenseShift 3-bit, checkpointed in
train.py's layout, and S3 3-bit, both with ``train.train_step``) are shared by the
module. Models are initialized with the ``rbg`` PRNG, whose ``model.init`` compiles in
seconds where threefry takes tens of seconds on this CPU.
"""

import ast
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import shiftjax as sj
from experiments.configs import default
from shiftjax import data as data_lib
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import models
from shiftjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIR = data_lib.fashion_mnist.DEFAULT_SOURCE_DIR
EVAL_BATCH = 1000


# ------------------------------------------------------------------------------ helpers


def rbg_key(seed):
  return jax.random.key(seed, impl="rbg")


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


def run_config(quantizer="DenseShift", steps=60):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = 0.5
  c.dataset = "fashion_mnist"
  c.quantizer = quantizer
  c.bits = 3
  c.batch_size = 32
  c.eval_batch_size = EVAL_BATCH
  c.learning_rate = 0.1
  c.lr_schedule = "constant"
  c.num_train_steps = steps
  c.log_every_steps = steps
  c.checkpoint_every_steps = steps
  c.progress_bar = False
  return c


# The policy fields of an architecture config with one quantizer and float activations.
NO_RULES = {"layer_quantizers": [], "activation": None, "layer_activations": []}


def split_file(buf):
  """The documented layout (version 3, laid out as 2), parsed independently of
  shiftjax.deploy."""
  magic, version, header_len = struct.unpack_from("<8sIQ", buf, 0)
  assert magic == b"SHIFTJAX" and version == 3
  header = json.loads(buf[20:20 + header_len])
  head_end = 20 + header_len
  assert buf[head_end:head_end + 32] == hashlib.sha256(buf[:head_end]).digest()
  start = -(-(head_end + 32) // 64) * 64
  assert buf[head_end + 32:start] == b"\0" * (start - head_end - 32)
  data = buf[start:len(buf) - 32]
  for e in header["arrays"]:
    raw = data[e["offset"]:e["offset"] + e["nbytes"]]
    assert zlib.crc32(raw) == e["crc32"]
  return version, header, data


def join_file(version, header, data):
  head = json.dumps(header, separators=(",", ":")).encode()  # compact, as save writes
  body = struct.pack("<8sIQ", b"SHIFTJAX", version, len(head)) + head
  body += hashlib.sha256(body).digest()
  body += b"\0" * (-len(body) % 64) + data
  return body + hashlib.sha256(body).digest()


def apply_in_batches(fn, images):
  return np.concatenate([np.asarray(fn(images[i:i + EVAL_BATCH]))
                         for i in range(0, len(images), EVAL_BATCH)])


def assert_same_predictions(packed_logits, model_logits):
  scale = np.max(np.abs(model_logits))
  diff = np.max(np.abs(packed_logits - model_logits))
  assert diff <= 1e-4 * scale, (diff, scale)
  np.testing.assert_array_equal(np.argmax(packed_logits, -1), np.argmax(model_logits, -1))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fashion_mnist():
  """The real Fashion-MNIST (Debian's dataset-fashion-mnist files, read directly)."""
  read = lambda name: data_lib.read_idx(os.path.join(SOURCE_DIR, name))
  test_images = read("t10k-images-idx3-ubyte.gz")[..., None]
  return {"test_images": np.asarray(data_lib.normalize(test_images, "fashion_mnist")),
          "test_labels": read("t10k-labels-idx1-ubyte.gz").astype(np.int32),
          "train_images": read("train-images-idx3-ubyte.gz")[..., None],
          "train_labels": read("train-labels-idx1-ubyte.gz").astype(np.int32)}


def short_training(config, data, workdir=None):
  """``train.train_step`` for ``config.num_train_steps`` steps; checkpoints into
  ``workdir`` in train.py's layout when given. (``train_and_evaluate`` would add about
  30 s of threefry init compilation, tfds decoding and evaluation to this module.)"""
  model = train.create_model(config, num_classes=10)
  lr_fn = train.create_learning_rate_fn(config, 1, 1)
  state = train.create_train_state(rbg_key(config.seed), config, model, (28, 28, 1),
                                   lr_fn)
  s3_alpha = config.s3_regularizer if config.quantizer == "S3" else 0.0
  step = jax.jit(functools.partial(train.train_step, dataset="fashion_mnist",
                                   s3_alpha=s3_alpha, rounding_key=rbg_key(1)))
  order = np.random.default_rng(0).permutation(len(data["train_labels"]))
  b = config.batch_size
  for i in range(config.num_train_steps):
    idx = order[i * b:(i + 1) * b]
    state, _ = step(state, {"image": data["train_images"][idx],
                            "label": data["train_labels"][idx]})
  if workdir is not None:
    manager = train.checkpoint_manager(workdir, config)
    manager.save(int(state.step), args=ocp.args.StandardSave(train.checkpointed(state)))
    manager.wait_until_finished()
    manager.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return {"config": config, "workdir": workdir, "model": model,
          "variables": jax.device_get(variables),
          "float32_weight_bytes": train.weight_bytes(
              state.params, state.batch_stats,
              train.layer_quantizers(train.layer_plan(config)))[
                  "float32_weight_bytes"]}


@pytest.fixture(scope="module")
def trained(fashion_mnist, tmp_path_factory):
  """A DenseShift 3-bit ResNet-8 (width 0.5), briefly trained and checkpointed."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return short_training(run_config(), fashion_mnist, workdir)


@pytest.fixture(scope="module")
def trained_s3(fashion_mnist):
  """An S3 3-bit ResNet-8 (width 0.5), briefly trained."""
  return short_training(run_config(quantizer="S3", steps=40), fashion_mnist)


@pytest.fixture(scope="module")
def trained_mixed(fashion_mnist, tmp_path_factory):
  """A DenseShift ResNet-8 at 4, 3 and 2 bits by stage with PACT 4-bit activations (8-bit
  signed at the stem, 8-bit at the classifier), briefly trained and checkpointed."""
  config = run_config()
  config.update(layer_quantizers="stage1_*/*=4,stage3_*/*=2", activation_bits=4,
                layer_activations="stem=8:signed,head=8")
  return short_training(config, fashion_mnist, str(tmp_path_factory.mktemp("mixed")))


@pytest.fixture(scope="module")
def packed(trained):
  return train.packed_from_checkpoint(trained["config"], trained["workdir"])


@pytest.fixture(scope="module")
def model_file(packed, tmp_path_factory):
  return packed.save(tmp_path_factory.mktemp("file") / "model.shiftjax")


# ----------------------------------------------------- packed == training model, eval mode


def test_packed_denseshift_matches_trained_model_on_full_test_set(trained, packed,
                                                                  fashion_mnist):
  images = fashion_mnist["test_images"]
  model, variables = trained["model"], trained["variables"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(lambda x: deploy.packed_apply(packed, x), images)
  assert_same_predictions(got, expected)
  accuracy = np.mean(np.argmax(got, -1) == fashion_mnist["test_labels"])
  assert accuracy > 0.2  # it learned something (chance is 0.1): not noise against noise
  # The packed words are what the kernels get: 3-bit codes, 10 per word.
  assert packed.arrays["stage1_block0/conv1/kernel"].dtype == np.uint32
  assert packed.metadata["source"] == {"model": "resnet8", "dataset": "fashion_mnist",
                                       "step": 60}


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


def _param(params, path):
  for part in path.split("/"):
    params = params[part]
  return params


def test_packed_mixed_widths_and_quantized_activations_match_on_full_test_set(
    trained_mixed, fashion_mnist, tmp_path):
  model, variables = trained_mixed["model"], trained_mixed["variables"]
  packed = train.packed_from_checkpoint(trained_mixed["config"], trained_mixed["workdir"])
  # Every layer at its own width, stored at exactly that many bits per weight.
  convs = [l for l in packed.layers if l.op in ("conv", "dense")]
  width = {"stem": None, "stage1": 4, "stage2": 3, "stage3": 2, "head": None}
  for layer in convs:
    bits = width[layer.name.split("_")[0]]
    assert (layer.quantizer.bits if layer.quantized else None) == bits, layer.name
    if bits:
      assert packed.arrays[f"{layer.name}/kernel"].shape == (
          math.prod(layer.shape) // 32, bits)
  sizes = [(math.prod(l.shape), l.quantizer.bits) for l in convs if l.quantized]
  assert packed.size_report()["bits_per_quantized_weight"] == (
      sum(n * b for n, b in sizes) / sum(n for n, _ in sizes))
  # The activation specs and their learned ranges, exactly as trained.
  specs = {l.name: l.activation for l in convs}
  assert specs["stem"] == sj.PACT(8, signed=True) and specs["head"] == sj.PACT(8)
  assert {specs[l.name] for l in convs if l.quantized} == {sj.PACT(4)}
  clips = {}
  for layer in convs:
    clips[layer.name] = packed.arrays[f"{layer.name}/activation_clip"]
    np.testing.assert_array_equal(
        clips[layer.name], np.asarray(_param(variables["params"], layer.name)["activation"]["clip"]))
  assert any(float(c) != 6.0 for c in clips.values())  # training moved the ranges
  # The file keeps them; the packed forward pass quantizes as training did.
  reloaded = deploy.load(packed.save(tmp_path / "mixed.shiftjax"))
  assert reloaded.layers == packed.layers
  images = fashion_mnist["test_images"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(lambda x: deploy.packed_apply(reloaded, x), images)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
  accuracy = np.mean(np.argmax(got, -1) == fashion_mnist["test_labels"])
  assert accuracy > 0.2  # it learned something (chance is 0.1)


def test_packed_s3_matches_trained_model_on_full_test_set(trained_s3, fashion_mnist):
  model, variables = trained_s3["model"], trained_s3["variables"]
  packed = ex.export(variables, model)
  images = fashion_mnist["test_images"]
  expected = apply_in_batches(jax.jit(lambda x: model.apply(variables, x, train=False)),
                              images)
  got = apply_in_batches(lambda x: deploy.packed_apply(packed, x), images)
  assert_same_predictions(got, expected)
  # S3 has a zero code: its convs take the decode + lax.conv path, and zeros survive.
  zeros = sum(int(np.sum(sj.codes.unpack_bitplanes(packed.arrays[f"{l.name}/kernel"], 3,
                                                    l.shape)
                          == packed.code_format.zero_code))
              for l in packed.layers if l.quantized)
  assert zeros > 0


@pytest.mark.parametrize("name, make, image_shape", [
    ("cifar_float", lambda: models.resnet8(width_multiplier=0.5), (28, 28, 1)),
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
    ("speech_float_mean_first_stride_1", lambda: models.SpeechResNet(
        num_classes=4, stage_sizes=(1,), widths=(8,), first_stride=1, pooling="mean"),
     (19, 16, 1)),
])
def test_packed_matches_model_for_each_architecture(name, make, image_shape):
  del name
  model = make()
  variables = random_variables(model, image_shape)
  images = jax.random.normal(rbg_key(5), (3, *image_shape))
  expected = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables,
                                                                            images))
  packed = ex.export(variables, model)
  got = np.asarray(deploy.packed_apply(packed, images))
  assert got.shape == expected.shape
  assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
  reloaded = deploy.from_bytes(packed.to_bytes())
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(reloaded, images)), got)


def test_speech_resnet_file_round_trip_rebuilds_the_module(tmp_path):
  model = models.speech_resnet(num_classes=6, stage_sizes=(1, 1), widths=(16, 32),
                               width_multiplier=0.5, stem_strides=(2, 1), first_stride=1,
                               pooling="meanmax", quantizer=sj.DenseShift(bits=3))
  variables = random_variables(model, (29, 16, 1))
  path = tmp_path / "speech.shiftjax"
  ex.export(variables, model).save(path)
  loaded = deploy.load(path)
  assert loaded.architecture == "SpeechResNet"
  assert loaded.config == {"num_classes": 6, "in_channels": 1,
                           "full_precision": ["stem", "head"], "stage_sizes": [1, 1],
                           "widths": [8, 16], "stem_strides": [2, 1], "first_stride": 1,
                           "pooling": "meanmax", **NO_RULES}
  assert [l.op for l in loaded.layers][-2:] == ["speech_meanmax_pool", "dense"]
  assert loaded.layers[-1].shape == (32, 6)  # mean and max of 16 channels
  module = ex.flax_module(loaded)
  features = jax.random.normal(rbg_key(3), (2, 29, 16, 1))
  np.testing.assert_array_equal(model.apply(variables, features, train=False),
                                module.apply(variables, features, train=False))


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "median", "pooling must be one of ('mean', 'max', 'meanmax'), got 'median'"),
    ("widths", [8], "stage_sizes and widths must be lists of 1..8 equal lengths"),
    ("stem_strides", [2], "stem_strides must be [time, frequency], got [2]"),
    ("first_stride", 0, "first_stride must be an integer in 1..8, got 0"),
    ("widths", [8, 10**6], "widths must be an integer in 1..4096, got 1000000"),
])
def test_bad_speech_resnet_config_is_refused(field, value, message):
  config = {"num_classes": 6, "in_channels": 1, "full_precision": ["stem"],
            "stage_sizes": [1, 1], "widths": [8, 16], "stem_strides": [2, 2],
            "first_stride": 2, "pooling": "max"}
  deploy.check_architecture("SpeechResNet", config)
  with pytest.raises(deploy.PackedModelError, match=re.escape(message)):
    deploy.check_architecture("SpeechResNet", dict(config, **{field: value}))


def test_batch_norm_folding_is_exact():
  """y * scale + bias == flax's BatchNorm in eval mode, to float32 rounding."""
  rng = np.random.default_rng(0)
  c = 16
  stats = {"mean": rng.normal(0, 2, c), "var": rng.uniform(0.01, 5, c)}
  affine = {"scale": rng.normal(1, 0.5, c), "bias": rng.normal(0, 1, c)}
  x = rng.normal(0, 3, (64, c)).astype(np.float32)
  bn = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=deploy.BN_EPSILON)
  variables = {"params": {k: jnp.asarray(v, jnp.float32) for k, v in affine.items()},
               "batch_stats": {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}
  expected = np.asarray(bn.apply(variables, x), np.float64)
  scale, bias = deploy.fold_batch_norm(affine["scale"].astype(np.float32),
                                   affine["bias"].astype(np.float32),
                                   stats["mean"].astype(np.float32),
                                   stats["var"].astype(np.float32))
  folded = x.astype(np.float64) * scale + bias
  np.testing.assert_allclose(folded, expected, rtol=0, atol=4e-6 * np.max(np.abs(expected)))


def test_float_kernels_in_bfloat16_on_request(trained, packed, fashion_mnist):
  half = ex.export(trained["variables"], trained["model"], float_dtype=jnp.bfloat16)
  assert half.arrays["stem/kernel"].dtype == jnp.bfloat16
  assert half.arrays["head/kernel"].dtype == jnp.bfloat16
  assert half.arrays["stem/bias"].dtype == np.float32
  for name in ("stage1_block0/conv1/kernel", "stage1_block0/conv1/scale"):
    np.testing.assert_array_equal(half.arrays[name], packed.arrays[name])
  reloaded = deploy.from_bytes(half.to_bytes())
  for name, a in half.arrays.items():
    assert reloaded.arrays[name].dtype == a.dtype
    np.testing.assert_array_equal(reloaded.arrays[name].view(np.uint8), a.view(np.uint8))
  images = fashion_mnist["test_images"][:EVAL_BATCH]
  full = np.asarray(deploy.packed_apply(packed, images))
  got = np.asarray(deploy.packed_apply(reloaded, images))
  assert np.max(np.abs(got - full)) <= 0.05 * np.max(np.abs(full))
  assert np.mean(np.argmax(got, -1) == np.argmax(full, -1)) > 0.97


# ------------------------------------------------------------------------- file format


def test_round_trip_keeps_arrays_and_metadata_exactly(packed, model_file):
  loaded = deploy.load(model_file)
  assert loaded.architecture == packed.architecture == "CifarResNet"
  assert loaded.config == packed.config == {
      "depth": 8, "num_classes": 10, "width_multiplier": 0.5, "in_channels": 1,
      "full_precision": ["stem", "head"], **NO_RULES}
  assert loaded.quantizer == packed.quantizer == sj.DenseShift(bits=3)
  assert loaded.layers == packed.layers
  assert loaded.float_dtype == "float32" and loaded.metadata == packed.metadata
  module = ex.flax_module(loaded)
  assert isinstance(module, models.CifarResNet)
  assert (module.depth, module.width_multiplier) == (8, 0.5)
  assert models.policy_of(module) == sj.LayerPolicy(sj.DenseShift(3), ("stem", "head"))
  assert list(loaded.arrays) == list(packed.arrays)
  for name, a in packed.arrays.items():
    b = loaded.arrays[name]
    assert b.dtype == a.dtype and b.shape == a.shape, name
    np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))
  buf = open(model_file, "rb").read()
  assert buf == packed.to_bytes()
  assert join_file(*split_file(buf)) == buf  # the module docstring's layout is the file's


def test_size_report_counts_bits_per_weight(packed, model_file, trained):
  # Bit planes: exactly 3 bits per weight (every kernel's size is a multiple of 32).
  report = packed.size_report()
  assert report["bits_per_quantized_weight"] == 3.0
  assert os.path.getsize(model_file) < report["float32_weight_bytes"] / 4
  # The kernels' word layout: 10 codes per word along K = kh*kw*I, the last word padded.
  words = ex.export(trained["variables"], trained["model"], code_layout="words")
  kernels = [l for l in words.layers if l.quantized]
  stored = sum(32 * -(-math.prod(l.shape[:-1]) // 10) * l.shape[-1] for l in kernels)
  assert words.size_report()["bits_per_quantized_weight"] == pytest.approx(
      stored / sum(math.prod(l.shape) for l in kernels))
  assert words.size_report()["bits_per_quantized_weight"] > 3.2


@pytest.mark.parametrize("where", ["data", "header", "prefix", "checksum"])
def test_truncated_file_is_refused(model_file, tmp_path, where):
  buf = open(model_file, "rb").read()
  _, header, _ = split_file(buf)
  cut = {"data": len(buf) - 100, "header": 200, "prefix": 10,
         "checksum": len(buf) - 5}[where]
  path = tmp_path / "cut.shiftjax"
  path.write_bytes(buf[:cut])
  expected = f"truncated at byte {cut} (expected {len(buf)})" if where in (
      "data", "checksum") else f"truncated at byte {cut} (expected at least"
  with pytest.raises(deploy.PackedModelError, match=re.escape(expected)):
    deploy.load(path)
  assert header["data_bytes"] > 0


def _layout(buf):
  """(end of the header, start of the data, {array name: (start, end)}) of a version 2 file."""
  _, header_len = struct.unpack_from("<IQ", buf, 8)
  head_end = 20 + header_len
  start = -(-(head_end + 32) // 64) * 64
  header = json.loads(buf[20:head_end])
  return head_end, start, {e["name"]: (start + e["offset"], start + e["offset"] + e["nbytes"])
                           for e in header["arrays"]}


@pytest.mark.parametrize("position", ["header", "header_digest", "kernel", "bias",
                                      "padding", "digest"])
def test_flipped_byte_is_refused_naming_where(model_file, tmp_path, position):
  buf = bytearray(open(model_file, "rb").read())
  head_end, _, spans = _layout(bytes(buf))
  kernel, bias = spans["stage2_block0/conv1/kernel"], spans["head/bias"]
  ordered = sorted(spans.values())
  gap = next(end for (_, end), (start, _) in zip(ordered, ordered[1:]) if end < start)
  index = {"header": 40, "header_digest": head_end + 7, "kernel": kernel[0] + 5,
           "bias": bias[1] - 1, "padding": gap, "digest": len(buf) - 1}[position]
  buf[index] ^= 0x10
  path = tmp_path / "flipped.shiftjax"
  path.write_bytes(bytes(buf))
  expected = {
      "header": f"header corrupted: the SHA-256 of bytes 0..{head_end} differs",
      "header_digest": f"header corrupted: the SHA-256 of bytes 0..{head_end} differs",
      "kernel": f"array 'stage2_block0/conv1/kernel' is corrupted: its bytes "
                f"{kernel[0]}..{kernel[1]} do not match its CRC-32",
      "bias": f"array 'head/bias' is corrupted: its bytes {bias[0]}..{bias[1]}",
      "padding": f"corrupted padding: byte {index} is 16, expected 0",
      "digest": f"checksum corrupted: bytes {len(buf) - 32}..{len(buf)}",
  }[position]
  with pytest.raises(deploy.PackedModelError, match=re.escape(expected)):
    deploy.load(path)


def test_unsupported_version_is_refused(model_file, tmp_path):
  _, header, data = split_file(open(model_file, "rb").read())
  path = tmp_path / "v5.shiftjax"
  path.write_bytes(join_file(5, header, data))
  with pytest.raises(deploy.PackedModelError,
                     match="unsupported format version 5 at byte 8 .* reads versions 1, 2, 3, 4"):
    deploy.load(path)


def test_not_a_model_file_is_refused(tmp_path):
  path = tmp_path / "other.shiftjax"
  path.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(deploy.PackedModelError, match="not a shiftjax packed model"):
    deploy.load(path)


def _rewritten(model_file, tmp_path, edit):
  version, header, data = split_file(open(model_file, "rb").read())
  edit(header)
  path = tmp_path / "edited.shiftjax"
  path.write_bytes(join_file(version, header, data))
  return path


def _entry(header, name):
  return next(e for e in header["arrays"] if e["name"] == name)


@pytest.mark.parametrize("edit, message", [
    # An array's declared shape (same byte count) disagrees with the architecture.
    (lambda h: _entry(h, "stage2_block0/conv1/kernel").update(
        shape=_entry(h, "stage2_block0/conv1/kernel")["shape"][::-1]),
     "layer 'stage2_block0/conv1' kernel has shape (3, 36), expected (36, 3)"),
    # The config says 11 classes; the stored head has 10.
    (lambda h: h["architecture"]["config"].update(num_classes=11),
     "layer 'head' has shape [32, 10], expected [32, 11]"),
    # A layer entry says another shape than the architecture.
    (lambda h: h["layers"][1].update(shape=[3, 3, 8, 9]),
     "layer 'stage1_block0/conv1' has shape [3, 3, 8, 9], expected [3, 3, 8, 8]"),
    (lambda h: _entry(h, "stem/bias").update(dtype="float64"),
     "array 'stem/bias' has dtype 'float64'; allowed: uint32, float32, bfloat16"),
    (lambda h: _entry(h, "stem/bias").update(dtype="object"),
     "array 'stem/bias' has dtype 'object'"),
    (lambda h: _entry(h, "head/bias").update(offset=-(-h["data_bytes"] // 64) * 64),
     "occupies bytes"),
    (lambda h: _entry(h, "head/bias").update(offset=0),
     "overlap"),
    (lambda h: h["arrays"].pop(),
     "array 'head/bias' is missing"),
    (lambda h: h["quantizer"].update(name="Ternary"),
     "unknown quantizer 'Ternary'"),
    (lambda h: h["architecture"].update(name="VisionTransformer"),
     "unknown architecture 'VisionTransformer'"),
    (lambda h: h["architecture"]["config"].update(depth=10**9),
     "depth must be an integer in 8..1202"),
    (lambda h: h["architecture"].update(name="SpeechResNet"),
     "SpeechResNet config must have exactly the fields"),
])
def test_inconsistent_header_is_refused_with_a_clear_message(model_file, tmp_path, edit,
                                                             message):
  path = _rewritten(model_file, tmp_path, edit)
  with pytest.raises(deploy.PackedModelError) as info:
    deploy.load(path)
  assert message in str(info.value)
  assert str(path) in str(info.value)


def test_load_runs_no_code_from_the_file(model_file, monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("load must not unpickle or np.load")
  for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                       (np, "load")):
    monkeypatch.setattr(module, name, forbidden)
  deploy.load(model_file)
  # And no module of the deployment package imports a deserializer that can run code.
  for path in glob.glob(os.path.join(os.path.dirname(sj.deploy.__file__), "*.py")):
    tree = ast.parse(open(path).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}, path
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"np.load", "eval", "exec", "compile", "__import__"}, path


def test_save_refuses_to_overwrite(packed, tmp_path):
  path = tmp_path / "m.shiftjax"
  packed.save(path)
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match=str(path)):
    packed.save(path)
  assert path.read_bytes() == before
  dataclasses.replace(packed, metadata={"note": "second"}).save(path, overwrite=True)
  assert deploy.load(path).metadata == {"note": "second"}
  assert sorted(os.listdir(tmp_path)) == ["m.shiftjax"]  # no temporary files left


def test_an_invalid_model_writes_nothing(packed, tmp_path):
  arrays = dict(packed.arrays)
  arrays["head/bias"] = np.zeros(11, np.float32)
  bad = deploy.PackedModel(packed.architecture, packed.config, packed.quantizer, packed.layers,
                       arrays)
  with pytest.raises(deploy.PackedModelError, match="layer 'head' bias has shape"):
    bad.save(tmp_path / "bad.shiftjax")
  assert os.listdir(tmp_path) == []


def test_export_names_a_parameter_the_architecture_lacks(trained):
  model = trained["model"]
  variables = jax.tree.map(lambda x: x, trained["variables"])  # a copy of the dicts
  variables["params"]["stage1_block0"]["extra"] = {"kernel": np.zeros((1, 1, 8, 8))}
  with pytest.raises(deploy.PackedModelError, match="stage1_block0/extra/kernel"):
    ex.export(variables, model)
  del variables["params"]["stage1_block0"]["extra"]
  del variables["params"]["stage1_block0"]["conv2"]
  with pytest.raises(deploy.PackedModelError, match="no 'stage1_block0/conv2/kernel'"):
    ex.export(variables, model)
  with pytest.raises(deploy.PackedModelError, match="supports CifarResNet, ImageNetResNet, SpeechResNet modules, got Dense"):
    ex.export(trained["variables"], nn.Dense(3))


# ------------------------------------------------------------- checkpoint -> file, launcher


def test_export_checkpoint_writes_model_file_and_refuses_overwrite(trained, packed):
  report = train.export_checkpoint(trained["config"], trained["workdir"])
  path = os.path.join(trained["workdir"], "model.shiftjax")
  assert report["path"] == path and report["file_bytes"] == os.path.getsize(path)
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


# --------------------------------------------------------------------- jax.export artifact

_STANDALONE = """
import sys
site_packages, artifact, images, out = sys.argv[1:]
sys.path.append(site_packages)  # jax and numpy, without .pth files (no editable installs)
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
  site_packages = os.path.dirname(os.path.dirname(jax.__file__))
  run = subprocess.run(
      [sys.executable, "-I", "-S", "-c", _STANDALONE, site_packages, str(artifact),
       str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
      cwd=tmp_path, env={"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")},
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "ok" in run.stdout
  logits = np.load(tmp_path / "logits.npy")
  expected = np.asarray(deploy.packed_apply(packed, images))
  assert logits.shape == (50, 10)
  assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))


# ---------------------------------------------------- version 1 files (the 'words' layout)

V1_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
V1_MODELS = ("resnet8_denseshift3", "resnet8_s3")  # tests/golden/make_v1_files.py wrote them


def _v1(name):
  path = os.path.join(V1_DIR, f"{name}.v1.shiftjax")
  return (path, np.load(os.path.join(V1_DIR, f"{name}.images.npy")),
          np.load(os.path.join(V1_DIR, f"{name}.logits.npy")))


@pytest.mark.parametrize("name", V1_MODELS)
def test_version1_file_loads_and_gives_its_logits(name, tmp_path):
  path, images, logits = _v1(name)
  assert struct.unpack_from("<I", open(path, "rb").read(), 8) == (1,)
  packed = deploy.load(path)
  assert packed.code_layout == "words"
  got = np.asarray(deploy.packed_apply(packed, images))
  # The logits the writing version computed (same ops; 1e-6 of the scale covers a jax
  # upgrade's rounding), and the same predictions.
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))
  # Rewritten at exactly 3 bits per weight (version 2): the same codes, identical logits.
  planes = sj.deploy.with_code_layout(packed, "bitplanes")
  assert planes.size_report()["bits_per_quantized_weight"] < (
      packed.size_report()["bits_per_quantized_weight"])
  planes.save(tmp_path / "v2.shiftjax")
  reloaded = deploy.load(tmp_path / "v2.shiftjax")
  assert reloaded.code_layout == "bitplanes"
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(reloaded, images)), got)
  back = sj.deploy.with_code_layout(reloaded, "words")
  for k, a in packed.arrays.items():
    np.testing.assert_array_equal(back.arrays[k], a)


def test_damaged_version1_file_is_refused(tmp_path):
  path, _, _ = _v1(V1_MODELS[0])
  buf = bytearray(open(path, "rb").read())
  (tmp_path / "cut.shiftjax").write_bytes(bytes(buf[:-100]))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"truncated at byte {len(buf) - 100} (expected {len(buf)})")):
    deploy.load(tmp_path / "cut.shiftjax")
  buf[len(buf) // 2] ^= 1
  (tmp_path / "flipped.shiftjax").write_bytes(bytes(buf))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"checksum mismatch: the file is corrupted (SHA-256 of bytes 0..{len(buf) - 32}")):
    deploy.load(tmp_path / "flipped.shiftjax")


@pytest.mark.parametrize("name", V1_MODELS)
def test_version2_file_loads_and_gives_its_logits(name, tmp_path):
  # tests/golden/make_v2_files.py wrote them with commit 4b7ef77 (the same models as v1).
  path = os.path.join(V1_DIR, f"{name}.v2.shiftjax")
  _, images, logits = _v1(name)
  assert struct.unpack_from("<I", open(path, "rb").read(), 8) == (2,)
  packed = deploy.load(path)
  assert packed.code_layout == "bitplanes"
  assert packed.config["layer_quantizers"] == [] and packed.config["activation"] is None
  assert all(l.activation is None and l.quantizer in (None, packed.quantizer)
             for l in packed.layers)
  got = np.asarray(deploy.packed_apply(packed, images))
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))
  # Saved again it is a version 3 file with the same arrays and identical logits.
  packed.save(tmp_path / "v3.shiftjax")
  buf = open(tmp_path / "v3.shiftjax", "rb").read()
  assert struct.unpack_from("<I", buf, 8) == (3,)
  reloaded = deploy.load(tmp_path / "v3.shiftjax")
  for k, a in packed.arrays.items():
    np.testing.assert_array_equal(reloaded.arrays[k], a)
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(reloaded, images)), got)


def test_damaged_version2_file_is_refused(tmp_path):
  path = os.path.join(V1_DIR, f"{V1_MODELS[0]}.v2.shiftjax")
  buf = bytearray(open(path, "rb").read())
  (tmp_path / "cut.shiftjax").write_bytes(bytes(buf[:-100]))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"truncated at byte {len(buf) - 100} (expected {len(buf)})")):
    deploy.load(tmp_path / "cut.shiftjax")
  header_len = struct.unpack_from("<Q", buf, 12)[0]
  buf[20 + header_len // 2] ^= 1
  (tmp_path / "header.shiftjax").write_bytes(bytes(buf))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"header corrupted: the SHA-256 of bytes 0..{20 + header_len}")):
    deploy.load(tmp_path / "header.shiftjax")


def test_bitplanes_and_words_files_give_identical_logits(trained, fashion_mnist):
  model, variables = trained["model"], trained["variables"]
  images = fashion_mnist["test_images"][:256]
  planes = ex.export(variables, model)
  words = ex.export(variables, model, code_layout="words")
  assert planes.code_layout == "bitplanes" and words.code_layout == "words"
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(planes, images)),
                                np.asarray(deploy.packed_apply(words, images)))
  # Both layouts hold the same codes.
  converted = sj.deploy.with_code_layout(words, "bitplanes")
  for k, a in planes.arrays.items():
    np.testing.assert_array_equal(converted.arrays[k], a)
  with pytest.raises(deploy.PackedModelError, match="code_layout must be one of"):
    ex.export(variables, model, code_layout="nibbles")


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
