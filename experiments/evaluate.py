"""Evaluates a training checkpoint on the full test split.

    python -m experiments.evaluate --config=experiments/configs/fashion_mnist.py --workdir=DIR [--step=N]

A config or flag error is one line on stderr and exit status 2 (``--verbose``: the
traceback).
"""

import json

from experiments import _errors
from experiments import _run_flags
from shiftjax import train

_run_flags.define()


def main(argv):
  config, workdir, step = _run_flags.checked_run(argv)
  print(json.dumps(train.evaluate_checkpoint(config, workdir, step), indent=2))


if __name__ == "__main__":
  _errors.run(main)
