"""Float vs S3 3-bit vs DenseShift 2/3/4-bit on Fashion-MNIST, same model and budget.

Trains the main job's model (``experiments/configs/fashion_mnist.py``) once per method
and seed, changing only the quantizer (and the seed), and prints the full-test-set
accuracies: each seed's, their mean and standard deviation, and the gap to float with
its standard error:

    python benchmarks/fashion_mnist_accuracy.py [--seeds=3] [--methods=float,"DenseShift 3-bit"] [--workdir=/tmp/fmnist_bench] [--config.num_epochs=4]

Runs one after the other (never two trainings at once on a small machine); each run
resumes from its own workdir if interrupted. Extra ``--config.*`` flags apply to all.
"""

import os
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from shiftjax import host_memory
from shiftjax.benchmarking import method_comparison

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "fmnist_accuracy"),
                    "Parent directory; one subdirectory per method and seed.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. N-1 of every method.", lower_bound=1)
flags.DEFINE_list("methods", None, "A subset of the methods (default: all).")
flags.DEFINE_string("reference", "float", "The method every gap is measured against "
                    "(trained too when --methods leaves it out).")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "fashion_mnist.py"), "Base config (the main job's).")


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  logging.set_verbosity(logging.WARNING)
  try:
    methods = method_comparison.select_methods(
        FLAGS.methods, method_comparison.FASHION_MNIST_METHODS, method_comparison.VARIANTS,
        reference=FLAGS.reference)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  base = FLAGS.config
  summaries = method_comparison.train_each(base, methods,
                                           FLAGS.workdir, range(FLAGS.seeds))
  print(f"\nFashion-MNIST, {base.model} (width x{base.width_multiplier}), "
        f"{base.num_epochs:g} epochs, batch {base.batch_size}, augment={base.augment}, "
        f"seeds 0..{FLAGS.seeds - 1}")
  method_comparison.print_table(summaries, FLAGS.reference)


if __name__ == "__main__":
  app.run(main)
