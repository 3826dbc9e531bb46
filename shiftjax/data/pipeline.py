"""Input pipelines: resumable training batches and exact single-pass evaluation.

Reading goes through ``tfds.data_source`` (random access to array_record files, no
TensorFlow). The batches are then made with plain numpy, not grain or tf.data, because:

* Resuming is exact by construction: training batch ``step`` is a pure function of
  ``(seed, step)`` (``TrainPipeline.batch``): the epoch's permutation comes from
  ``(seed, epoch)``, the augmentation from ``(seed, step)``. Resuming at step k is
  ``iterator(start_step=k)``; no iterator state has to be checkpointed.
* The datasets trained here (Fashion-MNIST 47 MB, MNIST, CIFAR-10 184 MB decoded) fit in
  memory, so a split is decoded once and a batch is one fancy-index gather plus one
  vectorized augmentation (``augment.py``): about 1 ms for a Fashion-MNIST batch of
  128, 2-5 ms for CIFAR-10, against a 200-500 ms training step. Grain could express
  the same index sampling, but here it would add worker processes competing with XLA
  for the 2 cores and iterator state to checkpoint, and buy nothing the few lines
  below do not; tf.data needs TensorFlow.
* A background thread builds the next few batches while the device trains.

Multi-host: every process computes the same *global* batch (indices and augmentation
parameters) and keeps its ``process_index``-th slice of ``batch_size // process_count``
examples; assemble the global array with ``jax.make_array_from_process_local_data``.

This module is the bottom of the reading stack: it imports no other reader. A dataset
that does not fit in memory (``imagenet.py``) builds on it: a source with the
``ArraySource`` interface (``__len__``, ``get(indices) -> {'image', 'label'}``) that
reads ``tfds.data_source`` records and decodes/resizes each (a thread pool), an
augmentation with the ``sample``/``apply`` interface, and a factory with
``make_in_memory_dataset``'s signature that ``readers.py`` selects by the spec's
``DatasetSpec.reader``. The samplers and the host split (``host_slice``) stay as they are.

Batches are dicts of numpy arrays: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32
``[B]``, and for evaluation ``mask`` bool ``[B]`` (False on padding). Normalization is
left to the device (``datasets.normalize``). Exact bitwise reproducibility assumes the
same numpy version (numpy may change its random streams between versions).
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tensorflow_datasets as tfds

from shiftjax.data.augment import Augmentation
from shiftjax.data.datasets import DatasetSpec, get_spec

Batch = dict[str, np.ndarray]

# First entropy word of the random streams, so shuffling and augmentation never share one.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
# Records read per data_source call when loading a split.
_READ_CHUNK = 4096


class ArraySource:
  """An in-memory split: uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                       f"{images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels must have shape {images.shape[:1]}, got {labels.shape}")
    self.images = images
    self.labels = labels.astype(np.int32, copy=False)

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> Batch:
    """``{"image": uint8 [n, H, W, C], "label": int32 [n]}`` of examples ``indices``."""
    return {"image": self.images[indices], "label": self.labels[indices]}


def _how_to_prepare(name: str, data_dir: str | None) -> str:
  where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
  if name == "fashion_mnist":
    return (f"fashion_mnist is not prepared in {where}. Prepare it offline with "
            "shiftjax.data.prepare_fashion_mnist(data_dir) (needs `apt-get install "
            "dataset-fashion-mnist`).")
  return (f"{name} is not prepared in {where}. On a machine with internet and "
          f"TensorFlow run `tfds build {name} --file_format=array_record "
          f"--data_dir=DIR` and copy DIR/{name} there.")


def data_source(name: str, split: str, data_dir: str | os.PathLike | None,
                how_to_prepare: Callable[[str, str | None], str] | None = None):
  """``tfds.data_source`` of a prepared dataset; FileNotFoundError saying how to prepare it.

  ``how_to_prepare(name, data_dir)`` writes that message (default: the image datasets').
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds gives no clear error for a dataset that is not there.
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except  # e.g. a builder not registered
      prepared = False
    if not prepared:
      raise FileNotFoundError((how_to_prepare or _how_to_prepare)(name, data_dir)) from e
    raise


def get_items(source, keys: list[int]) -> list[dict[str, Any]]:
  """Examples ``keys`` of a tfds data source, read in one call where it can."""
  try:
    return source.__getitems__(keys)
  except TypeError:
    # tfds.testing.mock_data installs a __getitems__ that cannot be called (tfds 4.9.10).
    return [source[k] for k in keys]


def load_split(name: str, split: str, *,
               data_dir: str | os.PathLike | None = None) -> ArraySource:
  """Decodes a whole tfds split into memory (about 6 s for Fashion-MNIST's 60k).

  Raises FileNotFoundError saying how to prepare the dataset when it is not in
  ``data_dir``, ValueError when it is too big for memory or has an unexpected shape.
  """
  spec = get_spec(name)
  source = data_source(name, split, data_dir)
  n = len(source)
  nbytes = n * math.prod(spec.image_shape)
  if nbytes > spec.max_bytes:
    raise ValueError(f"{name}[{split}] is {nbytes / 2**20:.0f} MiB decoded, over the "
                     f"{spec.max_bytes / 2**20:.0f} MiB read into memory")
  images = np.empty((n, *spec.image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(n, start + _READ_CHUNK)))
    for i, example in zip(keys, get_items(source, keys)):
      image = np.asarray(example["image"])
      if image.shape != spec.image_shape:
        raise ValueError(f"{name}[{split}] example {i} has image shape {image.shape}, "
                         f"expected {spec.image_shape}")
      images[i] = image
      labels[i] = example["label"]
  return ArraySource(images, labels)


def host_slice(batch_size: int, process_index: int | None,
               process_count: int | None) -> slice:
  """This process's part of a global batch; ValueError if it cannot be split evenly."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if count <= 0 or not 0 <= index < count:
    raise ValueError(f"process_index must be in 0..{count - 1}, got {index}")
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} must be divisible by the number of "
                     f"processes {count}")
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


def check_seed(seed) -> None:
  """ValueError unless ``seed`` is a non-negative integer (bools excluded)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


class Prefetcher:
  """Iterates ``produce`` in a daemon thread, up to ``size`` items ahead.

  The thread starts at once (so the first batches are built while the model compiles)
  and stops at ``close()``, at the end of a ``with`` block, or when the prefetcher is
  garbage collected. An exception raised by ``produce`` is raised by ``next``.
  """

  _END = object()

  def __init__(self, produce: Iterator[Batch], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    # The thread sees only the queue and the event, not self: dropping the last
    # reference to the prefetcher runs __del__, which stops the thread.
    self._thread = threading.Thread(
        target=self._work, args=(produce, self._queue, self._stop), daemon=True,
        name="shiftjax-prefetch")
    self._thread.start()

  @staticmethod
  def _work(produce, q: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    try:
      for item in produce:
        if not put((item, None)):
          return
      put((Prefetcher._END, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((None, e))

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Batch:
    if self._stop.is_set():
      raise StopIteration
    item, error = self._queue.get()
    if error is not None:
      self.close()
      raise error
    if item is Prefetcher._END:
      self.close()
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the background thread; batches not yet taken are dropped."""
    self._stop.set()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


def _maybe_prefetch(produce: Iterator[Batch], size: int) -> Iterator[Batch]:
  return Prefetcher(produce, size) if size > 0 else produce


class TrainPipeline:
  """Shuffled, augmented training batches of fixed size, reproducible at any step.

  Batch ``step`` holds the examples ``perm[i * B:(i + 1) * B]`` of epoch
  ``step // steps_per_epoch``, ``i = step % steps_per_epoch``, where ``perm`` is a fresh
  permutation for each epoch; the ``N % B`` examples left over in an epoch are dropped
  (different ones each epoch).
  """

  def __init__(self, source: ArraySource, *, batch_size: int, seed: int,
               augment: Augmentation | None = None, process_index: int | None = None,
               process_count: int | None = None, prefetch: int = 2):
    self._host = host_slice(batch_size, process_index, process_count)
    check_seed(seed)
    if len(source) < batch_size:
      raise ValueError(f"batch_size {batch_size} is larger than the split "
                       f"({len(source)} examples)")
    self.source = source
    self.batch_size = batch_size
    self.local_batch_size = self._host.stop - self._host.start
    self.seed = int(seed)
    self.augment = augment
    self.prefetch = prefetch
    self.num_examples = len(source)
    self.steps_per_epoch = self.num_examples // batch_size
    self._perm = (-1, None)  # (epoch, permutation), replaced as a whole: thread-safe.

  def _permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._perm
    if cached_epoch != epoch:
      rng = np.random.default_rng([_SHUFFLE_STREAM, self.seed, epoch])
      perm = rng.permutation(self.num_examples)
      self._perm = (epoch, perm)
    return perm

  def indices(self, step: int) -> np.ndarray:
    """Example indices of global batch ``step``: int ``[batch_size]``."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

  def batch(self, step: int) -> Batch:
    """This process's part of training batch ``step``: a pure function of (seed, step)."""
    indices = self.indices(step)
    batch = self.source.get(indices[self._host])
    if self.augment is not None:
      rng = np.random.default_rng([_AUGMENT_STREAM, self.seed, step])
      params = self.augment.sample(rng, self.batch_size)
      params = {k: v[self._host] for k, v in params.items()}
      batch["image"] = self.augment.apply(batch["image"], params)
    return batch

  def iterator(self, start_step: int = 0, num_steps: int | None = None, *,
               prefetch: int | None = None) -> Iterator[Batch]:
    """Batches ``start_step, start_step + 1, ...`` (forever, or ``num_steps`` of them).

    ``prefetch`` batches are built ahead in a background thread (default: the
    pipeline's; 0 builds them in the caller, lazily). Close the iterator (a
    ``Prefetcher``), or drop it, to stop the thread.
    """
    if num_steps is None:
      steps = itertools.count(start_step)
    else:
      steps = range(start_step, start_step + num_steps)
    produce = (self.batch(step) for step in steps)
    prefetch = self.prefetch if prefetch is None else prefetch
    return _maybe_prefetch(produce, prefetch)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterator(0)


class EvalPipeline:
  """The whole split once, in order, in ``ceil(N / batch_size)`` batches of fixed size.

  The last batch is padded with zero images and label 0; ``mask`` is False there, so
  ``sum(metric * mask)`` counts each example exactly once. Every process yields the same
  number of batches (its slice of each global batch), as collectives need.
  """

  def __init__(self, source: ArraySource, *, batch_size: int,
               process_index: int | None = None, process_count: int | None = None,
               prefetch: int = 2):
    self._host = host_slice(batch_size, process_index, process_count)
    self.source = source
    self.batch_size = batch_size
    self.local_batch_size = self._host.stop - self._host.start
    self.prefetch = prefetch
    self.num_examples = len(source)
    self.num_batches = -(-self.num_examples // batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def batch(self, i: int) -> Batch:
    """This process's part of evaluation batch ``i`` with its ``mask``."""
    if not 0 <= i < self.num_batches:
      raise IndexError(f"evaluation batch {i} out of range 0..{self.num_batches - 1}")
    indices = np.arange(i * self.batch_size, (i + 1) * self.batch_size)[self._host]
    mask = indices < self.num_examples
    batch = self.source.get(np.where(mask, indices, 0))
    if not mask.all():
      batch["image"][~mask] = 0
      batch["label"][~mask] = 0
    batch["mask"] = mask
    return batch

  def iterator(self, *, prefetch: int | None = None) -> Iterator[Batch]:
    """Every batch once, in order, the last one padded (``mask`` False on padding)."""
    produce = (self.batch(i) for i in range(self.num_batches))
    prefetch = self.prefetch if prefetch is None else prefetch
    return _maybe_prefetch(produce, prefetch)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterator()


def training_augmentation(spec: DatasetSpec,
                          augment: bool | Augmentation) -> Augmentation | None:
  """What a training pipeline of ``spec`` augments with: ``augment`` itself when it is
  an augmentation (a stronger SpecAugment, say), the spec's standard one for True,
  none for False."""
  if isinstance(augment, bool):
    return spec.augment if augment else None
  if not (callable(getattr(augment, "sample", None))
          and callable(getattr(augment, "apply", None))):
    raise TypeError(f"augment must be a bool or an augmentation with sample/apply "
                    f"methods, got {augment!r}")
  return augment


def make_in_memory_dataset(name: str, split: str | None = None, *, batch_size: int,
                           train: bool, seed: int = 0,
                           data_dir: str | os.PathLike | None = None,
                           augment: bool | Augmentation = True,
                           prefetch: int = 2, process_index: int | None = None,
                           process_count: int | None = None,
                           image_size: int | None = None) -> TrainPipeline | EvalPipeline:
  """The ``"in_memory"`` reader: the split decoded once, batches gathered from memory.

  Arguments as ``readers.make_dataset``'s; speech specs decode their waveforms with their
  own ``load``, the others go through ``load_split``. ``image_size`` must be unset or the
  spec's one size.
  """
  spec: DatasetSpec = get_spec(name)
  if image_size is not None and image_size != spec.image_shape[0]:
    raise ValueError(f"{name} has {spec.image_shape[0]}x{spec.image_shape[1]} images; "
                     f"image_size={image_size} is not available (leave it unset)")
  # Fail before reading any data.
  host_slice(batch_size, process_index, process_count)
  if train:
    check_seed(seed)
    augmentation = training_augmentation(spec, augment)
  if split is None:
    split = spec.train_split if train else spec.eval_split
  load = getattr(spec, "load", None)  # speech specs decode waveforms into features
  source = (load(split, data_dir) if load is not None
            else load_split(name, split, data_dir=data_dir))
  hosts = {"process_index": process_index, "process_count": process_count,
           "prefetch": prefetch}
  if train:
    return TrainPipeline(source, batch_size=batch_size, seed=seed,
                         augment=augmentation, **hosts)
  return EvalPipeline(source, batch_size=batch_size, **hosts)
