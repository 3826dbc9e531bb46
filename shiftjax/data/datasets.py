"""What the pipeline knows about each dataset: shapes, classes, splits, statistics.

Adding a dataset that fits in memory is one ``DatasetSpec`` in ``SPECS``. One that does
not (``imagenet2012``) names another ``DatasetSpec.reader``, whose factory
``readers.py`` maps it to (see ``pipeline.py``'s docstring).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from shiftjax.data.augment import Augmentation, CropFlip

# Per-channel statistics of the training split, images scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How a split is read (``DatasetSpec.reader``): decoded into memory whole
# (``pipeline.make_in_memory_dataset``), or example by example from disk
# (``imagenet.make_dataset``). ``readers.FACTORIES`` maps each to its factory; the names
# live here so a spec can be checked without importing the readers.
IN_MEMORY = "in_memory"
STREAMING = "streaming"
READERS = (IN_MEMORY, STREAMING)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A tfds image-classification dataset as the pipeline serves it.

  Attributes:
    name: the tfds name.
    image_shape: ``(H, W, C)`` of the served uint8 images.
    num_classes: labels are int32 in ``0 .. num_classes - 1``.
    mean, std: per-channel statistics for ``(image / 255 - mean) / std``.
    train_split, eval_split: the tfds splits a run trains and evaluates on.
    augment: training augmentation, None for none.
    max_bytes: decoded size of a split up to which ``pipeline.load_split`` reads it into
      memory whole (it refuses larger ones).
    reader: one of ``READERS``: ``"in_memory"`` (the split decoded once, then batches
      gathered from memory) or ``"streaming"`` (each example read and decoded when a
      batch needs it, for datasets too big for memory).
  """
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  eval_split: str = "test"
  augment: Augmentation | None = None
  max_bytes: int = 1 << 29
  reader: str = IN_MEMORY

  def __post_init__(self):
    # A typo would otherwise surface only when a pipeline is made, far from the spec.
    if self.reader not in READERS:
      raise ValueError(f"dataset {self.name!r}: unknown reader {self.reader!r}; allowed: "
                       f"{', '.join(READERS)}")


SPECS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", (28, 28, 1), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
        augment=CropFlip(pad=2, flip=True)),
    # Digits are not mirror-symmetric: crop only.
    "mnist": DatasetSpec(
        "mnist", (28, 28, 1), 10, MNIST_MEAN, MNIST_STD,
        augment=CropFlip(pad=2, flip=False)),
    "cifar10": DatasetSpec(
        "cifar10", (32, 32, 3), 10, CIFAR10_MEAN, CIFAR10_STD,
        augment=CropFlip(pad=4, flip=True)),
}


def get_spec(name: str) -> DatasetSpec:
  """The spec of dataset ``name``; ValueError listing the known names otherwise."""
  if name not in SPECS:
    raise ValueError(f"unknown dataset {name!r}; shiftjax.data serves "
                     f"{', '.join(sorted(SPECS))}")
  return SPECS[name]


def normalize(images, name: str, dtype=jnp.float32):
  """uint8 ``[..., C]`` -> ``(images / 255 - mean) / std`` in ``dtype``; use on device."""
  spec = get_spec(name)
  mean = jnp.asarray(spec.mean, dtype)
  std = jnp.asarray(spec.std, dtype)
  return (jnp.asarray(images, dtype) / 255 - mean) / std
