"""Evaluates a training checkpoint on the full test split.

    python -m experiments.evaluate --config=experiments/configs/fashion_mnist.py --workdir=DIR [--step=N]

A config or flag error is one line on stderr and exit status 2 (``--verbose``: the
traceback).
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _errors
from shiftjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the training run.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
config_flags.DEFINE_config_file("config", None, "The run's configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _errors.check_run(FLAGS.config, FLAGS.workdir)
  print(json.dumps(train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step),
                   indent=2))


if __name__ == "__main__":
  _errors.run(main)
