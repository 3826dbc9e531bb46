"""``make_dataset``: the pipeline of any dataset, made by the reader its spec names.

``DatasetSpec.reader`` says how a split is read; ``FACTORIES`` maps each reader to the
function that makes its pipelines. This module sits above every reader (``pipeline`` for
the in-memory datasets, ``imagenet`` for the streamed one) and nothing below imports it,
so the readers never import each other: adding a reader is a name in
``datasets.READERS``, a module below this one, and an entry here.
"""

from __future__ import annotations

import os
from typing import Callable

from shiftjax.data import imagenet
from shiftjax.data import pipeline
from shiftjax.data.datasets import IN_MEMORY, STREAMING, DatasetSpec, get_spec

Pipeline = pipeline.TrainPipeline | pipeline.EvalPipeline

# Each takes ``make_dataset``'s arguments (``prefetch`` only when given, so each keeps its
# own default: a streamed batch takes longer to build, so more are built ahead).
FACTORIES: dict[str, Callable[..., Pipeline]] = {
    IN_MEMORY: pipeline.make_in_memory_dataset,
    STREAMING: imagenet.make_dataset,
}


def factory(spec: DatasetSpec) -> Callable[..., Pipeline]:
  """The function making ``spec``'s pipelines, chosen by ``spec.reader`` alone."""
  return FACTORIES[spec.reader]


def make_dataset(name: str, split: str | None = None, *, batch_size: int, train: bool,
                 seed: int = 0, data_dir: str | os.PathLike | None = None,
                 augment: bool | pipeline.Augmentation = True,
                 prefetch: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 image_size: int | None = None) -> Pipeline:
  """A training or evaluation pipeline over tfds dataset ``name``.

  Args:
    name: a key of ``shiftjax.data.SPECS`` (``fashion_mnist``, ``mnist``, ``cifar10``,
      ``imagenet2012``, ``synthetic_slu``, ``fluent_speech_commands``,
      ``speech_commands``).
    split: a tfds split (``"train"``, ``"test"``, ``"train[:90%]"``...); None: the
      spec's train split when ``train``, its eval split otherwise.
    batch_size: the global batch size, divisible by the number of processes.
    train: True gives a ``TrainPipeline`` (shuffled, augmented, drop remainder),
      False an ``EvalPipeline`` (in order, every example once, padded and masked).
    seed: non-negative seed of shuffling and augmentation (training only).
    data_dir: tfds data directory, None for the tfds default.
    augment: True: the dataset's standard training augmentation; False: none; or an
      augmentation to use instead (``SpecAugment(4, 40, 2, 12)`` for a speech set).
    prefetch: batches built ahead in a background thread (0: none); None: the reader's
      default (2 in memory, 4 streamed).
    process_index, process_count: this host's place; default ``jax.process_index()``
      and ``jax.process_count()``.
    image_size: ``imagenet2012``: side of the served crops (default 224); other
      datasets have one fixed size and accept only that (or None).
  """
  make = factory(get_spec(name))
  ahead = {} if prefetch is None else {"prefetch": prefetch}
  return make(name, split, batch_size=batch_size, train=train, seed=seed, data_dir=data_dir,
              augment=augment, process_index=process_index, process_count=process_count,
              image_size=image_size, **ahead)
