"""The flags of the launchers that read a training run's checkpoint (evaluate, export):
``--config`` (the run's, locked), ``--workdir`` and ``--step``."""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _errors


def define() -> None:
  """Defines ``--workdir``, ``--step`` and ``--config`` (the first and last required)."""
  flags.DEFINE_string("workdir", None, "Workdir of the training run.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  config_flags.DEFINE_config_file("config", None, "The run's configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def checked_run(argv: list[str]):
  """``(config, workdir, step)`` of the flags, checked before anything is read
  (``_errors.check_run``); extra arguments are a usage error."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  _errors.check_run(values.config, values.workdir)
  return values.config, values.workdir, values.step
