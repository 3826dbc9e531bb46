"""Shared by the accuracy benchmarks (``benchmarks/fashion_mnist_accuracy.py``,
``slu_accuracy.py``, ``activation_bits.py``, ``bn_reestimation.py``): each method trained
over the same base config and several seeds, and the statistics of the test accuracies."""

import math
import os
import statistics
import tempfile
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from shiftjax import data as data_lib
from shiftjax import train


def _ds3(**overrides):
  return {"quantizer": "DenseShift", "bits": 3, **overrides}


def _s3(**overrides):
  return {"quantizer": "S3", "bits": 3, **overrides}


# The methods each accuracy benchmark trains by default (its table's rows).
FASHION_MNIST_METHODS = {"float": {"quantizer": "float"},
                         "S3 3-bit": _s3(),
                         "DenseShift 2-bit": {"quantizer": "DenseShift", "bits": 2},
                         "DenseShift 3-bit": _ds3(),
                         "DenseShift 4-bit": {"quantizer": "DenseShift", "bits": 4}}
SLU_METHODS = {**{name: FASHION_MNIST_METHODS[name]
                  for name in ("float", "DenseShift 3-bit", "S3 3-bit")},
               # Closes DenseShift's gap on speech (README); trained after its teacher.
               "DenseShift 3-bit distilled": _ds3(distill_from_method="float")}

_SPEC_AUGMENT_X2 = {"max_time": 40, "max_freq": 12}
# Variants of the training settings tried to close the gap to float, for either
# benchmark (the README's tried-variants tables); run only when named in --methods.
# Values are absolute: "latent lr x4" is latent_lr_scale=4.0 whatever the base config's.
VARIANTS = {
    "float no weight decay": {"quantizer": "float", "weight_decay_on": "none"},
    "DenseShift 3-bit no weight decay": _ds3(weight_decay_on="none"),
    "DenseShift 3-bit latents not decayed": _ds3(weight_decay_on="all_but_latents"),
    "S3 3-bit latents not decayed": _s3(weight_decay_on="all_but_latents"),
    "DenseShift 3-bit latent lr x0.25": _ds3(latent_lr_scale=0.25),
    "DenseShift 3-bit latent lr x1": _ds3(latent_lr_scale=1.0),
    "DenseShift 3-bit latent lr x4": _ds3(latent_lr_scale=4.0),
    "DenseShift 3-bit latent lr x16": _ds3(latent_lr_scale=16.0),
    "S3 3-bit latent lr x1": _s3(latent_lr_scale=1.0),
    "S3 3-bit latent lr x4": _s3(latent_lr_scale=4.0),
    "DenseShift 3-bit binary": _ds3(encoding="binary"),
    "DenseShift 3-bit exact": _ds3(surrogate="exact"),
    "DenseShift 3-bit float warm start": _ds3(float_start_epochs=2),
    "DenseShift 3-bit float warm start lr 0.01": _ds3(float_start_epochs=2,
                                                      learning_rate=0.01),
    "float label smoothing 0.1": {"quantizer": "float", "label_smoothing": 0.1},
    "DenseShift 3-bit label smoothing 0.1": _ds3(label_smoothing=0.1),
    "S3 3-bit dense init": _s3(init_method="dense"),
    "S3 3-bit he init": _s3(init_method="he"),
    "S3 3-bit reference regularizer": _s3(s3_regularizer=1e-5),
    "S3 3-bit regularizer x10": _s3(s3_regularizer=1e-4),
    "S3 3-bit regularizer x100": _s3(s3_regularizer=1e-3),
    # Speech only: SpecAugment's widest masks doubled (synthetic_slu: 40 frames, 12 bins).
    "float SpecAugment x2": {"quantizer": "float", "spec_augment": _SPEC_AUGMENT_X2},
    "DenseShift 3-bit SpecAugment x2": _ds3(spec_augment=_SPEC_AUGMENT_X2),
    # Distilled from the same seed's float run (trained first; its cost is not counted).
    "DenseShift 3-bit distilled": SLU_METHODS["DenseShift 3-bit distilled"],
    "float distilled": {"quantizer": "float", "distill_from_method": "float"},  # born again
    "DenseShift 4-bit binary": {"quantizer": "DenseShift", "bits": 4, "encoding": "binary"},
    "DenseShift 4-bit exact": {"quantizer": "DenseShift", "bits": 4, "surrogate": "exact"},
}
# Every named method of either benchmark: what a run's directory name stands for.
ALL_METHODS = {**FASHION_MNIST_METHODS, **SLU_METHODS, **VARIANTS}


# Overrides that say how train_each runs a method, not config fields.
_RUN_KEYS = ("float_start_epochs", "distill_from_method")


def method_config(base: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                  seed: int) -> ml_collections.ConfigDict:
  """``base`` with a method's overrides (``_RUN_KEYS`` aside) and ``seed``, not
  exporting: the config ``train_each`` trains for that method and seed."""
  config = base.copy_and_resolve_references()
  config.unlock()
  config.update({k: v for k, v in overrides.items() if k not in _RUN_KEYS})
  config.seed = int(seed)
  config.export_packed = False
  return config


def train_each(base: ml_collections.ConfigDict, methods: Mapping[str, Mapping[str, Any]],
               parent_workdir: str, seeds: Sequence[int] = (0,)) -> dict[str, list[dict]]:
  """{method name: [summary of each seed]} of ``base`` trained once per method and seed.

  Runs one after the other (never two trainings at once on a small machine), each in
  ``<parent_workdir>/<name, lower case, spaces as _>[_seed<s>]`` so that an interrupted
  benchmark resumes (and "DenseShift 2-bit" and "DenseShift 3-bit" never share one);
  nothing is exported.

  A method whose overrides hold ``distill_from_method=<name>`` is distilled
  (``config.distill_from``) from that method's run of the same seed, which must come
  earlier in ``methods`` (it is trained first).

  A method whose overrides hold ``float_start_epochs=k`` is a float warm start at the
  same budget: float for k epochs (in ``<its directory>_float_start``; the method's other
  overrides, a learning rate for one, apply to this stage too), converted
  (``config.init_from``), then the method for the remaining epochs; its training time
  is the two stages'.
  """
  names = list(methods)
  for i, (name, overrides) in enumerate(methods.items()):
    teacher = overrides.get("distill_from_method")
    if teacher is not None and teacher not in names[:i]:
      raise ValueError(f"{name} distills from {teacher!r}, which must be one of the "
                       f"methods trained before it: {names[:i]}")
  summaries = {name: [] for name in methods}
  for seed in seeds:
    for name, overrides in methods.items():
      float_epochs = overrides.get("float_start_epochs", 0)
      config = method_config(base, overrides, seed)
      workdir = os.path.join(parent_workdir, directory_name(name, seed))
      teacher = overrides.get("distill_from_method")
      if teacher is not None:
        config.distill_from = os.path.join(parent_workdir, directory_name(teacher, seed))
      if not float_epochs:
        summaries[name].append(train.train_and_evaluate(config, workdir))
        continue
      if not 0 < float_epochs < base.num_epochs:
        raise ValueError(f"{name}: float_start_epochs must be in (0, {base.num_epochs}), "
                         f"got {float_epochs}")
      start = config.copy_and_resolve_references()
      start.quantizer, start.num_epochs = "float", float(float_epochs)
      float_summary = train.train_and_evaluate(start, workdir + "_float_start")
      config.init_from = workdir + "_float_start"
      config.num_epochs = base.num_epochs - float_epochs
      summary = dict(train.train_and_evaluate(config, workdir))
      summary["training_wall_seconds"] += float_summary["training_wall_seconds"]
      summary["steps"] += float_summary["steps"]
      summaries[name].append(summary)
  return summaries


def select_methods(names: Sequence[str] | None, methods: Mapping[str, dict],
                   variants: Mapping[str, dict], reference: str = "float") -> dict[str, dict]:
  """The overrides of each named method (all of ``methods`` when ``names`` is empty),
  ``reference`` first; a name in neither mapping is a usage error listing the known."""
  known = {**methods, **variants}
  names = list(names or methods)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {list(known)}")
  if reference not in names:
    names = [reference, *names]  # every gap is measured against it
  return {n: known[n] for n in names}


def define_flags(workdir_name: str, config_path: str, config_help: str) -> None:
  """The absl flags of a method-comparison benchmark: ``--workdir`` (a temporary
  directory's ``workdir_name`` by default), ``--seeds``, ``--methods``, ``--reference``
  and ``--config`` (``config_path`` by default; ``--config.*`` apply to every run)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), workdir_name),
                      "Parent directory; one subdirectory per method and seed.")
  flags.DEFINE_integer("seeds", 1, "Seeds 0 .. N-1 of every method.", lower_bound=1)
  flags.DEFINE_list("methods", None, "A subset of the methods (default: all).")
  flags.DEFINE_string("reference", "float", "The method every gap is measured against "
                      "(trained too when --methods leaves it out).")
  config_flags.DEFINE_config_file("config", config_path, config_help)


def run_from_flags(methods: Mapping[str, dict], title: str | None = None,
                   extra: Mapping[str, Callable[[dict], float]] | None = None,
                   prepare: Callable[[ml_collections.ConfigDict], None] | None = None
                   ) -> None:
  """Trains the methods ``define_flags``' flags select (of ``methods`` and ``VARIANTS``)
  one after the other, as the launcher would (freed host memory reused), and prints the
  table (``print_table``) under a line naming ``title`` (default: the dataset) and the
  base config. ``prepare(base config)`` runs first (e.g. builds a dataset)."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
  from shiftjax import host_memory  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  logging.set_verbosity(logging.WARNING)
  try:
    selected = select_methods(values.methods, methods, VARIANTS, reference=values.reference)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  base = values.config
  if prepare is not None:
    prepare(base)
  summaries = train_each(base, selected, values.workdir, range(values.seeds))
  print(f"\n{title or base.dataset}, {base.model} (width x{base.width_multiplier}), "
        f"{base.num_epochs:g} epochs, batch {base.batch_size}, augment={base.augment}, "
        f"seeds 0..{values.seeds - 1}")
  print_table(summaries, values.reference, extra)


def fashion_mnist_test_set() -> tuple[np.ndarray, np.ndarray]:
  """The full test split as normalized NHWC float32 images and labels (Debian's files)."""
  return fashion_mnist_images("t10k"), _read_fashion_mnist("t10k-labels-idx1-ubyte.gz")


def fashion_mnist_images(split: str, count: int | None = None) -> np.ndarray:
  """The first ``count`` images of ``'train'`` or ``'t10k'``, normalized NHWC float32."""
  images = _read_fashion_mnist(f"{split}-images-idx3-ubyte.gz")[:count, ..., None]
  return np.asarray(data_lib.normalize(images, "fashion_mnist"))


def _read_fashion_mnist(name: str) -> np.ndarray:
  return data_lib.read_idx(os.path.join(data_lib.fashion_mnist.DEFAULT_SOURCE_DIR, name))


def predictions(fn: Callable, images: np.ndarray, batch: int = 1000) -> np.ndarray:
  """Top-1 of ``fn(images)`` (logits), in batches."""
  return np.concatenate([np.argmax(np.asarray(fn(images[i:i + batch])), -1)
                         for i in range(0, len(images), batch)])


def directory_name(name: str, seed: int) -> str:
  """``'denseshift_3-bit_seed1'``: the workdir of a method and seed below the parent."""
  return "_".join(name.lower().split()) + (f"_seed{seed}" if seed else "")


def finished_runs(parent: str, max_seed: int = 9):
  """``(method name, seed, workdir)`` of every finished run (one with a summary) of the
  methods in ``ALL_METHODS`` below ``parent``, as ``train_each`` names them."""
  for name in ALL_METHODS:
    for seed in range(max_seed + 1):
      workdir = os.path.join(parent, directory_name(name, seed))
      if os.path.exists(os.path.join(workdir, train.SUMMARY_FILE)):
        yield name, seed, workdir


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_to(reference: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
  """Mean of ``values`` minus mean of ``reference``, and its standard error
  ``sqrt(s_a^2 / n_a + s_b^2 / n_b)`` (the seeds of the two are independent runs)."""
  (m_ref, s_ref), (m, s) = mean_and_std(reference), mean_and_std(values)
  return m - m_ref, math.sqrt(s_ref ** 2 / len(reference) + s ** 2 / len(values))


def print_table(summaries: Mapping[str, list[dict]], reference: str,
                extra: Mapping[str, Callable[[dict], float]] = None) -> None:
  """Per method: each seed's test accuracy, mean +- std, the gap to ``reference`` +- its
  standard error, steps and mean training wall time; ``extra`` adds columns
  (``{header: function of the first seed's summary}``)."""
  extra = dict(extra or {})
  seeds = len(next(iter(summaries.values())))
  ref = [s["test_accuracy"] for s in summaries[reference]]
  width = max(18, *map(len, summaries))
  acc_width = max(len("accuracy per seed"), 8 * seeds)
  gap_header = "gap to " + reference
  gap_width = max(17, len(gap_header))
  print(f"{'method':<{width}} {'accuracy per seed':>{acc_width}} {'mean':>7} {'std':>7} "
        f"{gap_header:>{gap_width}} {'steps':>6} {'wall s':>7}"
        + "".join(f" {h:>10}" for h in extra))
  for name, runs in summaries.items():
    acc = [s["test_accuracy"] for s in runs]
    mean, std = mean_and_std(acc)
    gap, se = gap_to(ref, acc)
    wall = statistics.fmean(s["training_wall_seconds"] for s in runs)
    print(f"{name:<{width}} {''.join(f'{a:8.4f}' for a in acc):>{acc_width}} {mean:7.4f} "
          f"{std:7.4f} {f'{100 * gap:+.2f} +- {100 * se:4.2f}':>{gap_width}} "
          f"{runs[0]['steps']:6d} "
          f"{wall:7.0f}" + "".join(f" {fn(runs[0]):>10.1f}" for fn in extra.values()))
  print("gap in points (x100), +- its standard error over seeds")
