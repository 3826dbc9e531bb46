"""BatchNorm statistics re-estimated after training: does it close the gap to float?

For every finished run of ``benchmarks/fashion_mnist_accuracy.py`` under ``--workdir``
(each method and seed), restores the checkpoint, re-estimates the BatchNorm running
statistics with forward passes in training mode over the first ``--batches`` batches of
128 training images (``transfer.recalibrate_batch_stats``; weights unchanged) and prints
the test accuracy before and after, per method over its seeds:

    python benchmarks/bn_reestimation.py --workdir=/tmp/fmnist_accuracy [--batches=60]

The runs' own statistics are running averages (momentum 0.9) collected while the weights
still moved; re-estimating them on the final weights is a post-training fix that costs
no training.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from shiftjax import transfer
from shiftjax import train
# benchmarks/: the methods, their config overrides and the --workdir and --config flags.
import fashion_mnist_accuracy
import method_comparison

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 60, "Training batches of 128 for the re-estimation.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  images, labels = method_comparison.fashion_mnist_test_set()
  train_images = method_comparison.fashion_mnist_images("train", 128 * FLAGS.batches)
  batches = [train_images[i:i + 128] for i in range(0, len(train_images), 128)]
  methods = {**fashion_mnist_accuracy.METHODS, **fashion_mnist_accuracy.VARIANTS}
  base = FLAGS.config
  print(f"{'method':<26} {'seed':>4} {'as trained':>10} {'BN re-estimated':>15}")
  for name, overrides in methods.items():
    for seed in range(10):
      workdir = os.path.join(FLAGS.workdir, method_comparison.directory_name(name, seed))
      if not os.path.exists(os.path.join(workdir, train.SUMMARY_FILE)):
        continue
      config = base.copy_and_resolve_references()
      config.update(overrides, seed=seed)
      model, variables, _ = train.restore_variables(config, workdir)
      apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
      before = method_comparison.predictions(lambda x: apply(variables, x), images)
      recalibrated = transfer.recalibrate_batch_stats(model.apply, variables, batches)
      after = method_comparison.predictions(lambda x: apply(recalibrated, x), images)
      print(f"{name:<26} {seed:4d} {np.mean(before == labels):10.4f} "
            f"{np.mean(after == labels):15.4f}")


if __name__ == "__main__":
  app.run(main)
