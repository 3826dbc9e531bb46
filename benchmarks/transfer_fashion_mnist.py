r"""Float -> 3-bit DenseShift on real Fashion-MNIST: conversion, fine-tuning vs scratch.

    python benchmarks/transfer_fashion_mnist.py [--float_steps=300 --shift_steps=300]

(absl flags, as the launchers; ``experiments.configs`` comes from the installed package.)

1. Trains a float ResNet-8 (width 1/2) for ``float_steps`` steps.
2. Converts it to 3-bit DenseShift (``shiftjax.transfer``) and prints the test accuracy
   before any shift training: as converted, and after re-estimating the BatchNorm
   statistics on 30 training batches (no weight changes); per-layer and per-channel
   scale exponents.
3. Trains the DenseShift model for ``shift_steps`` steps twice with the same budget:
   fine-tuned from the conversion (``--config.init_from``, lr 0.01) and from scratch
   (low-variance init, lr 0.1), and prints both test accuracies (full 10k test split).

About 10 minutes on 2 CPU cores. Needs Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments.configs import default
import shiftjax as sj
from shiftjax import data as data_lib
from shiftjax import host_memory
from shiftjax import models
from shiftjax import train
from shiftjax import transfer

FLAGS = flags.FLAGS
flags.DEFINE_integer("float_steps", 300, "Steps of the float model.")
flags.DEFINE_integer("shift_steps", 300, "Steps of each DenseShift model.")
flags.DEFINE_float("finetune_lr", 0.01, "Learning rate fine-tuning from the conversion.")
flags.DEFINE_float("scratch_lr", 0.1, "Learning rate from scratch.")
flags.DEFINE_float("width", 0.5, "ResNet-8 width multiplier.")
flags.DEFINE_integer("seed", 0, "Seed of every run.")
flags.DEFINE_string("workdir", None, "Default: a temporary directory.")


def config(args, workdir_data, **overrides):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = args.width
  c.dataset = "fashion_mnist"
  c.data_dir = workdir_data
  c.prepare_offline_data = True
  c.quantizer = "float"
  c.bits = 3
  c.batch_size = 128
  c.eval_batch_size = 500
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.lr_schedule = "cosine"
  c.warmup_epochs = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.progress_bar = False
  c.seed = args.seed
  for k, v in overrides.items():
    c[k] = v
  return c


def accuracy(model, variables, images, labels, batch=1000):
  apply = jax.jit(model.apply)
  correct = 0
  for i in range(0, len(labels), batch):
    logits = apply(variables, data_lib.normalize(images[i:i + batch], "fashion_mnist"))
    correct += int(jnp.sum(jnp.argmax(logits, -1) == labels[i:i + batch]))
  return correct / len(labels)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  host_memory.reuse_freed_memory()  # as experiments/train.py does

  root = args.workdir or tempfile.mkdtemp(prefix="transfer_fashion_mnist_")
  data_dir = os.path.join(root, "tfds")
  start = time.time()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"ResNet-8 width {args.width}, batch 128, seed {args.seed}; workdir {root}")

  float_dir = os.path.join(root, "float")
  summary = train.train_and_evaluate(
      config(args, data_dir, num_train_steps=args.float_steps), float_dir)
  print(f"float ResNet-8, {args.float_steps} steps (lr 0.1 cosine): "
        f"test accuracy {summary['test_accuracy']:.4f}")

  test = data_lib.load_split("fashion_mnist", "test", data_dir=data_dir)
  calibration = data_lib.load_split("fashion_mnist", "train[:3840]", data_dir=data_dir)
  batches = [data_lib.normalize(calibration.images[i:i + 128], "fashion_mnist")
             for i in range(0, 3840, 128)]
  loaded = transfer.load_float_params(float_dir)
  q = sj.DenseShift(3)
  shift_model = models.resnet8(width_multiplier=args.width, quantizer=q)
  shapes = jax.eval_shape(lambda: shift_model.init(jax.random.key(0, impl="rbg"),
                                                   test.images[:1] * 1.0))
  print("3-bit DenseShift converted from it, before any shift training (10k test images):")
  for granularity in ("layer", "channel"):
    converted = transfer.variables_from_float(shapes, loaded, q, granularity=granularity)
    direct = accuracy(shift_model, converted, test.images, test.labels)
    recalibrated = transfer.recalibrate_batch_stats(shift_model.apply, converted, batches)
    recal = accuracy(shift_model, recalibrated, test.images, test.labels)
    print(f"  {granularity:7s} scale exponents: as converted {direct:.4f}, "
          f"BatchNorm re-estimated on 30 batches {recal:.4f}")

  results = {}
  for name, overrides in (
      ("fine-tuned from float", dict(init_from=float_dir, learning_rate=args.finetune_lr)),
      ("from scratch", dict(learning_rate=args.scratch_lr))):
    workdir = os.path.join(root, name.replace(" ", "_"))
    t = time.time()
    s = train.train_and_evaluate(config(args, data_dir, quantizer="DenseShift", bits=3,
                                        num_train_steps=args.shift_steps, **overrides),
                                 workdir)
    results[name] = s["test_accuracy"]
    print(f"3-bit DenseShift {name:22s} {args.shift_steps} steps, lr "
          f"{overrides['learning_rate']}: test accuracy {s['test_accuracy']:.4f} "
          f"({time.time() - t:.0f} s)")
  print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
