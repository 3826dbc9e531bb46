"""Float vs S3 3-bit vs DenseShift 3-bit on Fashion-MNIST, same model and budget.

Trains the main job's model (``experiments/configs/fashion_mnist.py``) three times,
changing only the quantizer, and prints the full-test-set accuracies side by side:

    python benchmarks/fashion_mnist_accuracy.py [--workdir=/tmp/fmnist_bench] [--config.num_epochs=4]

Runs one after the other (never two trainings at once on a small machine); each run
resumes from its own workdir if interrupted. Extra ``--config.*`` flags apply to all three.
"""

import os
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from shiftjax import host_memory
import method_comparison  # benchmarks/, the directory of this script

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "fmnist_accuracy"),
                    "Parent directory; one subdirectory per method.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "fashion_mnist.py"), "Base config (the main job's).")

METHODS = {"float": {"quantizer": "float"},
           "S3 3-bit": {"quantizer": "S3", "bits": 3},
           "DenseShift 3-bit": {"quantizer": "DenseShift", "bits": 3}}


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  logging.set_verbosity(logging.WARNING)
  base = FLAGS.config
  summaries = method_comparison.train_each(base, METHODS, FLAGS.workdir)
  print(f"\nFashion-MNIST, {base.model} (width x{base.width_multiplier}), "
        f"{base.num_epochs:g} epochs, batch {base.batch_size}, augment={base.augment}")
  print(f"{'method':<18} {'test accuracy':>13} {'steps':>6} {'wall s':>7}")
  for name, s in summaries.items():
    print(f"{name:<18} {s['test_accuracy']:>13.4f} {s['steps']:>6d} "
          f"{s['training_wall_seconds']:>7.0f}")


if __name__ == "__main__":
  app.run(main)
