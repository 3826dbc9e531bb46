"""Trains a shift ResNet; all logic lives in ``shiftjax.train`` (intentionally short).

    python -m experiments.train --config=experiments/configs/fashion_mnist.py --workdir=DIR

Restarting with the same ``--workdir`` resumes from its last checkpoint. A config or flag
error is one line on stderr and exit status 2 (``--verbose``: the traceback).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _errors
from shiftjax import host_memory
from shiftjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_bool("reuse_freed_memory", True,
                  "Keep freed host memory for reuse (shiftjax.host_memory): on CPU, spares "
                  "every step from faulting in XLA's scratch buffer again.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.reuse_freed_memory:  # before JAX starts its threads
    host_memory.reuse_freed_memory()
  _errors.check_run(FLAGS.config, FLAGS.workdir)
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(train.format_summary(summary, FLAGS.workdir))


if __name__ == "__main__":
  _errors.run(main)
