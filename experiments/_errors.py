"""One-line errors for the launchers: a config or flag error is a message, not a traceback.

Each launcher ends with ``_errors.run(main)`` instead of ``app.run(main)``. A flag that
does not parse, or a config that ``main`` rejects (``ValueError`` and so
``shiftjax.PolicyError``, ``TypeError``, ``KeyError``, ``FileNotFoundError``,
``FileExistsError``; the library raises them before anything is compiled or written)
prints one line to stderr, ``error: <what was wrong>``, and exits with status 2, as a
Unix command does for a usage error. ``--verbose`` or ``SHIFTJAX_TRACEBACK=1`` in the
environment keeps the full traceback.

``check_run`` validates a config and its workdir before the launcher calls the library:
``shiftjax.train.validate_config``, a data directory that does not exist, and a workdir
whose checkpoint another config wrote (orbax would fail deep in the restore, with a
shape and no name, and asyncio's noise after it).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import orbax.checkpoint as ocp

from shiftjax import train
from shiftjax import trees

flags.DEFINE_bool("verbose", False, "On a config or flag error, print the full traceback "
                  "(also: SHIFTJAX_TRACEBACK=1), not one line.")

TRACEBACK_ENV = "SHIFTJAX_TRACEBACK"
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError)
USAGE_EXIT_CODE = 2
_TRACEBACK = "Traceback (most recent call last):"


def _wants_traceback(argv=None) -> bool:
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbose
  # Flags did not parse: look for the switch by hand.
  return any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv or ())


def one_line(error: BaseException) -> str:
  """The error's message on one line (a KeyError's without its quotes; an error wrapping
  another, as ml_collections' AttributeError wraps a KeyError, by the inner one's)."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):
    error = error.args[0]
  message = (error.args[0] if isinstance(error, KeyError) and len(error.args) == 1
             and isinstance(error.args[0], str) else str(error))
  if _TRACEBACK in message:  # ml_collections quotes a config file's whole traceback
    head, _, tail = message.partition(_TRACEBACK)
    message = head + [line for line in tail.splitlines() if line.strip()][-1]
  return " ".join(message.split()) or type(error).__name__


def fail(message: str) -> None:
  """Prints ``error: message`` (one line) to stderr and exits with status 2."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  # os._exit: no interpreter shutdown, where orbax's and jax's threads may print more.
  os._exit(USAGE_EXIT_CODE)  # pylint: disable=protected-access


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _wants_traceback(argv):
      raise
    fail(f"{one_line(e)} (--helpshort lists the flags)")
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<a field it lacks>
    if _wants_traceback(argv):
      raise
    fail(f"the config has no field {one_line(e)}")


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)``, with config and flag errors as one line and exit status 2, and
  absl's logging at WARNING unless ``--verbosity`` is given."""

  @functools.wraps(main)
  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:  # absl's INFO floods stderr (orbax: each step)
      logging.set_verbosity(logging.WARNING)
    try:
      # ml_collections reports a config file it could not read when the config is used.
      if "config" in flags.FLAGS:
        flags.FLAGS.config.keys()
    except OSError as e:
      if _wants_traceback():
        raise
      fail(f"--config: {one_line(e)}")
    try:
      return main(argv)
    except app.UsageError as e:
      if _wants_traceback():
        raise
      fail(one_line(e))
    except CONFIG_ERRORS as e:
      if _wants_traceback():
        raise
      fail(f"{one_line(e)} (--verbose for the traceback)")

  app.run(guarded, flags_parser=_parse_flags)


def _tree_shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{'params/stem/kernel': shape, ...}`` of a tree of arrays or array metadata."""
  return {path: tuple(leaf.shape) for path, leaf in trees.flatten(tree).items()}


def _checkpoint_shapes(workdir: str) -> tuple[int | None, dict[str, tuple[int, ...]]]:
  """``(latest step, shapes of its params and batch_stats)`` from orbax's metadata (no
  array is read); ``(None, {})`` without a checkpoint."""
  directory = os.path.join(os.path.abspath(workdir), train.CHECKPOINT_DIR)
  if not os.path.isdir(directory):  # a manager would create it
    return None, {}
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = manager.latest_step()
    if step is None:
      return None, {}
    stored = manager.item_metadata(step)
  finally:
    manager.close()
  return step, _tree_shapes({k: stored[k] for k in ("params", "batch_stats") if k in stored})


def check_run(config, workdir: str) -> None:
  """Errors in ``config`` and ``workdir``, before the launcher calls the library.

  ``shiftjax.train.validate_config(config)``; FileNotFoundError when ``config.data_dir``
  does not exist (the library's own error would come after tfds's warnings); ValueError
  naming ``--workdir`` when its latest checkpoint holds parameters of another model than
  ``config``'s (another model, width, method, bits or per-layer rules): the shapes of
  the checkpoint's ``params`` and ``batch_stats`` against those ``config``'s model would
  have (``jax.eval_shape``: nothing is compiled). A workdir without a checkpoint passes.

  Skipped when ``config.distributed``: ``jax.distributed.initialize()`` must come before
  anything touches the devices, and ``train_and_evaluate`` validates after it.
  """
  if config.get("distributed", False):
    return
  train.validate_config(config)
  data_dir = config.get("data_dir", "")
  if data_dir and not config.get("prepare_offline_data") and not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"config.data_dir={data_dir!r}: no such directory; give the directory that holds "
        f"the prepared {config.dataset} (tfds layout), or '' for tfds's default "
        "(~/tensorflow_datasets)")
  step, stored = _checkpoint_shapes(workdir)
  if step is None:
    return
  abstract = train.abstract_checkpoint(config)
  expected = _tree_shapes({k: abstract[k] for k in ("params", "batch_stats")})
  if stored == expected:
    return
  only_stored = sorted(set(stored) - set(expected))
  only_expected = sorted(set(expected) - set(stored))
  if only_stored or only_expected:
    path = (only_stored or only_expected)[0]
    where = "only in the checkpoint" if only_stored else "missing from the checkpoint"
    difference = f"{path} is {where}"
  else:
    path = next(p for p in sorted(stored) if stored[p] != expected[p])
    difference = f"{path} has shape {stored[path]} there, {expected[path]} with this config"
  raise ValueError(
      f"--workdir={workdir}: its checkpoint (step {step}) belongs to another config "
      f"({difference}; this config: {config.model}, width_multiplier "
      f"{config.get('width_multiplier', 1.0)}, {train.describe_policy(config)}, "
      f"{config.dataset}); pass that run's config, or a new --workdir")
