"""Fixtures of the packed-ResNet tests (export, format, apply): the real Fashion-MNIST
and three short trainings on it, each run once per test session.

DenseShift 3-bit (checkpointed in train.py's layout), S3 3-bit and a mixed-width model,
all with the launcher's step, ``train.step_function``. Models are initialized with the
``rbg`` PRNG, whose ``model.init`` compiles in seconds where threefry takes tens of
seconds on this CPU.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import default
from resnet_helpers import EVAL_BATCH, rbg_key
from shiftjax import data as data_lib
from shiftjax import loop
from shiftjax import train

SOURCE_DIR = data_lib.fashion_mnist.DEFAULT_SOURCE_DIR


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


@pytest.fixture(scope="session")
def fashion_mnist():
  """The real Fashion-MNIST (Debian's dataset-fashion-mnist files, read directly)."""
  read = lambda name: data_lib.read_idx(os.path.join(SOURCE_DIR, name))
  test_images = read("t10k-images-idx3-ubyte.gz")[..., None]
  return {"test_images": np.asarray(data_lib.normalize(test_images, "fashion_mnist")),
          "test_labels": read("t10k-labels-idx1-ubyte.gz").astype(np.int32),
          "train_images": read("train-images-idx3-ubyte.gz")[..., None],
          "train_labels": read("train-labels-idx1-ubyte.gz").astype(np.int32)}


def short_training(config, data, workdir=None):
  """The launcher's step (``train.step_function``) for ``config.num_train_steps`` steps;
  checkpoints into ``workdir`` in its layout when given. (``train_and_evaluate`` would
  add tfds decoding and evaluation to this module.)"""
  model = train.create_model(config, num_classes=10)
  lr_fn = train.create_learning_rate_fn(config, 1, 1)
  state = train.create_train_state(rbg_key(config.seed), config, model, (28, 28, 1),
                                   lr_fn)
  step = jax.jit(train.step_function(config, model, lr_fn))
  order = np.random.default_rng(0).permutation(len(data["train_labels"]))
  b = config.batch_size
  for i in range(config.num_train_steps):
    idx = order[i * b:(i + 1) * b]
    state, _ = step(state, {"image": data["train_images"][idx],
                            "label": data["train_labels"][idx]}, rbg_key(1))
  if workdir is not None:
    manager = train.checkpoint_manager(workdir, config)
    manager.save(int(state.step), args=ocp.args.StandardSave(loop.checkpointed(state)))
    manager.wait_until_finished()
    manager.close()
  variables = {"params": state.params, **state.state}
  return {"config": config, "workdir": workdir, "model": model,
          "variables": jax.device_get(variables),
          "float32_weight_bytes": train.weight_bytes(
              state.params, state.state["batch_stats"],
              train.layer_quantizers(train.layer_plan(config)))[
                  "float32_weight_bytes"]}


@pytest.fixture(scope="session")
def trained(fashion_mnist, tmp_path_factory):
  """A DenseShift 3-bit ResNet-8 (width 0.5), briefly trained and checkpointed."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return short_training(run_config(), fashion_mnist, workdir)


@pytest.fixture(scope="session")
def trained_s3(fashion_mnist):
  """An S3 3-bit ResNet-8 (width 0.5), briefly trained."""
  return short_training(run_config(quantizer="S3", steps=40), fashion_mnist)


@pytest.fixture(scope="session")
def trained_mixed(fashion_mnist, tmp_path_factory):
  """A DenseShift ResNet-8 at 4, 3 and 2 bits by stage with PACT 4-bit activations (8-bit
  signed at the stem, 8-bit at the classifier), briefly trained and checkpointed."""
  config = run_config()
  config.update(layer_quantizers="stage1_*/*=4,stage3_*/*=2", activation_bits=4,
                layer_activations="stem=8:signed,head=8")
  return short_training(config, fashion_mnist, str(tmp_path_factory.mktemp("mixed")))


@pytest.fixture(scope="session")
def packed(trained):
  return train.packed_from_checkpoint(trained["config"], trained["workdir"])


@pytest.fixture(scope="session")
def model_file(packed, tmp_path_factory):
  return packed.save(tmp_path_factory.mktemp("file") / "model.shiftjax")
