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

from absl import app

from shiftjax.benchmarking import method_comparison

method_comparison.define_flags(
    "fmnist_accuracy", os.path.join(os.path.dirname(__file__), "..", "experiments",
                                    "configs", "fashion_mnist.py"),
    "Base config (the main job's).")


def main(argv):
  del argv
  method_comparison.run_from_flags(method_comparison.FASHION_MNIST_METHODS,
                                   title="Fashion-MNIST")


if __name__ == "__main__":
  app.run(main)
