"""Exports a training run's checkpoint as a packed model file (BN folded, N-bit codes).

    python -m experiments.export --config=experiments/configs/fashion_mnist.py --workdir=DIR [--output=PATH] [--overwrite]

Writes ``<workdir>/model.shiftjax`` (or ``--output``) and prints its size against the
float32 weights. An existing file is kept unless ``--overwrite``. Load it with
``shiftjax.deploy.load`` and run it with ``shiftjax.deploy.packed_apply``. A config or
flag error is one line on stderr and exit status 2 (``--verbose``: the traceback).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _errors
from shiftjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the training run.")
flags.DEFINE_string("output", None, "Packed model path; default <workdir>/model.shiftjax.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
flags.DEFINE_enum("float_dtype", "float32", ["float32", "bfloat16"],
                  "Storage of the full-precision layers (stem, head).")
config_flags.DEFINE_config_file("config", None, "The run's configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _errors.check_run(FLAGS.config, FLAGS.workdir)
  report = train.export_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.output,
                                   overwrite=FLAGS.overwrite, step=FLAGS.step,
                                   float_dtype=FLAGS.float_dtype)
  print(train.format_export_report(report))


if __name__ == "__main__":
  _errors.run(main)
