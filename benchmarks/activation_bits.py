"""DenseShift 3-bit weights with float, 8-bit and 4-bit activations on Fashion-MNIST.

The main job's model and budget (``experiments/configs/fashion_mnist.py``), changing only
``activation_bits`` (PACT, the inputs of every quantized conv; stem and classifier
inputs stay float, as in DenseShift's detection setting where only the shift layers' inputs
were quantized). Prints each setting's test accuracy over seeds with the gap to float
activations, and for every run the agreement of the packed file (format version 4, run
by the ResNet's own code through ``shiftjax.export.load``: weights and activations
quantized from the file) with the training model's top-1 over the full test set, which
must be 1.0:

    python benchmarks/activation_bits.py [--seeds=1] [--bits=8,4] [--workdir=/tmp/fmnist_accuracy]

The float-activation run is ``benchmarks/fashion_mnist_accuracy.py``'s "DenseShift
3-bit" (same directory name): with the same ``--workdir`` it is not trained again.
"""

import os
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import jax
import numpy as np

from shiftjax import deploy
from shiftjax import export
from shiftjax import host_memory
from shiftjax import train
from shiftjax.benchmarking import method_comparison

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "fmnist_accuracy"),
                    "Parent directory; one subdirectory per setting and seed.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. N-1 of every setting.", lower_bound=1)
flags.DEFINE_list("bits", ["8", "4"], "Activation widths to compare with float.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "fashion_mnist.py"), "Base config (the main job's).")

REFERENCE = "DenseShift 3-bit"


def top1_trained_and_packed(config, workdir, images) -> tuple[np.ndarray, np.ndarray]:
  """Top-1 predictions of a run's training model (restored checkpoint, eval mode) and
  of its packed file (exported, serialized and read back)."""
  model, variables, _ = train.restore_variables(config, workdir)
  packed = deploy.from_bytes(train.packed_from_checkpoint(config, workdir).to_bytes())
  packed_model, packed_variables = export.load(packed)
  trained = method_comparison.predictions(
      jax.jit(lambda x: model.apply(variables, x, train=False)), images)
  packed_fn = jax.jit(lambda v, x: packed_model.apply(v, x, train=False))
  return trained, method_comparison.predictions(lambda x: packed_fn(packed_variables, x),
                                                images)


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  logging.set_verbosity(logging.WARNING)
  settings = {REFERENCE: {"quantizer": "DenseShift", "bits": 3, "activation_bits": 0}}
  for bits in FLAGS.bits:
    settings[f"{REFERENCE} act {int(bits)}-bit"] = {
        "quantizer": "DenseShift", "bits": 3, "activation_bits": int(bits)}
  base = FLAGS.config
  summaries = method_comparison.train_each(base, settings, FLAGS.workdir, range(FLAGS.seeds))
  images, labels = method_comparison.fashion_mnist_test_set()
  print(f"\nFashion-MNIST, {base.model}, {base.num_epochs:g} epochs, batch "
        f"{base.batch_size}: DenseShift 3-bit weights, PACT activations (inputs of the "
        f"quantized convs), seeds 0..{FLAGS.seeds - 1}")
  method_comparison.print_table(summaries, REFERENCE)
  print(f"\n{'run':<34} {'trained top-1':>13} {'packed top-1':>12} {'agreement':>10}")
  for name, overrides in settings.items():
    for seed in range(FLAGS.seeds):
      config = method_comparison.method_config(base, overrides, seed)
      workdir = os.path.join(FLAGS.workdir, method_comparison.directory_name(name, seed))
      trained, packed = top1_trained_and_packed(config, workdir, images)
      print(f"{name + f' seed {seed}':<34} {np.mean(trained == labels):13.4f} "
            f"{np.mean(packed == labels):12.4f} {np.mean(trained == packed):10.4f}")


if __name__ == "__main__":
  app.run(main)
