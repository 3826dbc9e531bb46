"""Exports a training run's checkpoint as a packed model file (BN folded, N-bit codes).

    python -m experiments.export --config=experiments/configs/fashion_mnist.py --workdir=DIR [--output=PATH] [--overwrite]

Writes ``<workdir>/model.shiftjax`` (or ``--output``) and prints its size against the
float32 weights. The file is format version 4: ``shiftjax.export.load(path)`` gives
``(model, variables)``, run with ``model.apply(variables, images, train=False)`` (the
ResNet's own flax code on the packed codes); ``shiftjax.deploy.load`` reads it without
flax. An existing file is kept unless ``--overwrite``. A config or flag error is one line
on stderr and exit status 2 (``--verbose``: the traceback).
"""

from absl import flags

from experiments import _errors
from experiments import _run_flags
from shiftjax import train

FLAGS = flags.FLAGS
_run_flags.define()
flags.DEFINE_string("output", None, "Packed model path; default <workdir>/model.shiftjax.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output file.")
flags.DEFINE_enum("float_dtype", "float32", ["float32", "bfloat16"],
                  "Storage of the full-precision layers (stem, head).")


def main(argv):
  config, workdir, step = _run_flags.checked_run(argv)
  report = train.export_checkpoint(config, workdir, FLAGS.output, overwrite=FLAGS.overwrite,
                                   step=step, float_dtype=FLAGS.float_dtype)
  print(train.format_export_report(report))


if __name__ == "__main__":
  _errors.run(main)
