"""BatchNorm statistics re-estimated after training: does it close the gap to float?

For every finished run of an accuracy benchmark under ``--workdir`` (each method and
seed of ``benchmarks/fashion_mnist_accuracy.py`` or ``benchmarks/slu_accuracy.py``; give
the same ``--config``), restores the checkpoint, re-estimates the BatchNorm running
statistics with forward passes in training mode over ``--batches`` batches of
``--batch_size`` un-augmented training examples (``transfer.recalibrate_batch_stats``;
weights unchanged) and prints the full-test-split accuracy before and after:

    python benchmarks/bn_reestimation.py --workdir=/tmp/fmnist_accuracy [--batches=60]
    python benchmarks/bn_reestimation.py --workdir=/tmp/slu_accuracy \\
        --config=experiments/configs/slu_denseshift3.py --config.data_dir=data/tfds

The runs' own statistics are running averages (momentum 0.9) collected while the weights
still moved; re-estimating them on the final weights is a post-training fix that costs
no training.
"""

import collections
import itertools
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from shiftjax import data as data_lib
from shiftjax import loop
from shiftjax import train
from shiftjax import transfer
from shiftjax.benchmarking import method_comparison

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Parent directory of the accuracy benchmark's runs.",
                    required=True)
flags.DEFINE_integer("batches", 60, "Training batches for the re-estimation.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Examples per re-estimation batch.", lower_bound=1)
flags.DEFINE_integer("max_seed", 9, "Look for seeds 0 .. this.", lower_bound=0)
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "fashion_mnist.py"), "The benchmark's base config.")


def reestimation_batches(config, count: int, batch_size: int) -> list:
  """The first ``count`` shuffled, un-augmented training batches, normalized."""
  ds = data_lib.make_dataset(config.dataset, batch_size=batch_size, train=True, seed=0,
                             data_dir=config.data_dir or None, augment=False,
                             image_size=config.get("image_size"))
  batches = itertools.islice(ds.iterator(0), count)
  return [data_lib.normalize(b["image"], config.dataset) for b in batches]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = FLAGS.config
  batches = reestimation_batches(base, FLAGS.batches, FLAGS.batch_size)
  width = max(map(len, method_comparison.ALL_METHODS))
  print(f"{'method':<{width}} {'seed':>4} {'as trained':>10} {'BN re-estimated':>15} "
        f"{'change':>7}")
  changes = collections.defaultdict(list)
  for name, seed, workdir in method_comparison.finished_runs(FLAGS.workdir, FLAGS.max_seed):
    config = method_comparison.method_config(base, method_comparison.ALL_METHODS[name], seed)
    try:
      model, variables, _ = train.restore_variables(config, workdir)
    except ValueError as e:  # e.g. a checkpoint of an older optimizer layout
      print(f"{name:<{width}} {seed:4d} not restored: {str(e).splitlines()[0]}")
      continue
    state = loop.TrainState(0, variables["params"], {"batch_stats": variables["batch_stats"]},
                            None)
    before = train.evaluate_test_split(config, model, state)["test_accuracy"]
    reestimated = transfer.recalibrate_batch_stats(model.apply, variables, batches)
    state = state.replace(state={"batch_stats": jax.device_put(reestimated["batch_stats"])})
    after = train.evaluate_test_split(config, model, state)["test_accuracy"]
    print(f"{name:<{width}} {seed:4d} {before:10.4f} {after:15.4f} "
          f"{100 * (after - before):+7.2f}", flush=True)
    changes[name].append(after - before)
  print("mean change over the seeds, in points:")
  for name, values in changes.items():
    print(f"{name:<{width}} {len(values):4d} seeds {100 * sum(values) / len(values):+7.2f}")


if __name__ == "__main__":
  app.run(main)
