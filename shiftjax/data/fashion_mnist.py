"""Fashion-MNIST prepared offline from Debian's ``dataset-fashion-mnist`` package.

``prepare_fashion_mnist(data_dir)`` writes the real 60k + 10k examples into ``data_dir``
exactly where and how tfds would put the ``fashion_mnist`` dataset downloaded from the
internet: ``<data_dir>/fashion_mnist/3.0.1/`` holding ``dataset_info.json``,
``features.json``, ``label.labels.txt`` and one ``fashion_mnist-{train,test}.array_record-
00000-of-00001`` file per split. The builder is tfds's own ``FashionMNIST`` (same name,
version, features, description), subclassed without registration, with only the data
source replaced: the idx files in ``source_dir`` instead of a download. So the ordinary
``tfds.data_source("fashion_mnist", data_dir=data_dir)`` reads it, and so does everything
built on it.

TensorFlow is not needed: the official generator reads files with ``tf.io.gfile`` and the
``Image`` feature encodes arrays with ``tf.image.encode_png``, so the subclass reads the
gzip files with the standard library and hands the feature ready PNG bytes
(``encode_png_gray``): the pixels decode identically, only the compressed bytes differ
from a TF-made copy. Keys (the example's index in the idx file) are the official ones, so
tfds stores the examples in the same (key-hash) order as it would the downloaded copy.
The format is array_record, the one ``tfds.data_source`` reads without TensorFlow.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

# split -> (images file, labels file, number of examples), as Debian installs them.
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
# idx magic numbers: 0x0000 08 (uint8) 0N (number of dimensions).
_IDX_UINT8 = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file (``.gz`` or not) into a numpy array of its stored shape.

  Only the unsigned-byte type used by (Fashion-)MNIST is supported. Raises ValueError
  naming the file when the header or the length is wrong.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UINT8:
    raise ValueError(f"{path} is not an unsigned-byte idx file (header {data[:4]!r})")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape))
  if len(data) - header != expected:
    raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), "
                     f"file holds {len(data) - header} bytes after the header")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_split(source_dir: str | os.PathLike | None, split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 [N, 28, 28], labels uint8 [N])`` of ``split`` (``'train'``: 60k,
  ``'test'``: 10k) straight from the idx files, for code that wants arrays, not tfds."""
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
  source_dir = os.fspath(source_dir or DEFAULT_SOURCE_DIR)
  images_file, labels_file, _ = _FILES[split]
  paths = [os.path.join(source_dir, f) for f in (images_file, labels_file)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"Fashion-MNIST files {missing} are missing; install them with "
                            "'apt-get install dataset-fashion-mnist'")
  return read_idx(paths[0]), read_idx(paths[1])


def normalized_arrays(split: str, source_dir: str | os.PathLike | None = None
                      ) -> dict[str, np.ndarray]:
  """``{'image': float32 [N, 28, 28, 1], 'label': int32 [N]}`` of ``split``, the images
  normalized with the dataset's mean and std (as the main job's pipeline does)."""
  from shiftjax.data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # pylint: disable=g-import-not-at-top
  images, labels = read_split(source_dir, split)
  images = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
  return {"image": images[..., None], "label": labels.astype(np.int32)}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
  return (struct.pack(">I", len(payload)) + kind + payload
          + struct.pack(">I", zlib.crc32(kind + payload)))


def encode_png_gray(image: np.ndarray) -> bytes:
  """uint8 ``[H, W]`` -> 8-bit grayscale PNG bytes (filter 0, zlib level 6).

  Written out here because it is 3x faster than Pillow's encoder, which is most of the
  preparation time; any PNG decoder (Pillow, OpenCV, TF) reads it.
  """
  h, w = image.shape
  rows = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1)  # filter byte 0
  header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, gray, no interlace
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
          + _png_chunk(b"IEND", b""))


with tfds.core.registered.skip_registration():

  class _LocalFashionMNIST(tfds_mnist.FashionMNIST):
    """tfds's FashionMNIST, reading the idx files from a local directory."""
    name = "fashion_mnist"
    # dataset_info.json records the builder's module; keep the official one so the
    # prepared metadata matches a copy prepared by tfds from the internet.
    __module__ = tfds_mnist.FashionMNIST.__module__
    # Nothing is downloaded, so no URL checksums; looking them up would also need
    # `importlib_resources`, which tfds does not install.
    url_infos = None

    def __init__(self, *, source_dir: str, **kwargs):
      self._source_dir = source_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {
          split: self._generate_examples(
              os.path.join(self._source_dir, images),
              os.path.join(self._source_dir, labels), num)
          for split, (images, labels, num) in _FILES.items()
      }

    def _generate_examples(self, images_path, labels_path, num_examples
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
      images = read_idx(images_path)
      labels = read_idx(labels_path)
      if images.shape != (num_examples, 28, 28) or labels.shape != (num_examples,):
        raise ValueError(
            f"expected {num_examples} images of 28x28 and as many labels in "
            f"{images_path} and {labels_path}, got shapes {images.shape} and "
            f"{labels.shape}")
      # Same keys (the index) and order as the official generator.
      for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {"image": encode_png_gray(image), "label": int(label)}


def prepare_fashion_mnist(data_dir: str | os.PathLike | None = None,
                          source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR) -> str:
  """Prepares the real Fashion-MNIST as the tfds dataset ``fashion_mnist`` (array_record).

  Args:
    data_dir: tfds data directory; None means the tfds default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    source_dir: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

  Returns:
    The prepared dataset's directory, ``<data_dir>/fashion_mnist/<version>``.

  Idempotent: when the dataset is already prepared there (by this function or by tfds
  itself), nothing is read or written. The first time takes about 6 s of CPU.
  Afterwards ``tfds.data_source("fashion_mnist", data_dir=data_dir)`` serves it.
  """
  source_dir = os.fspath(source_dir)
  builder = _LocalFashionMNIST(
      source_dir=source_dir,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format="array_record")
  if builder.is_prepared():
    return os.fspath(builder.data_dir)
  missing = [f for images, labels, _ in _FILES.values() for f in (images, labels)
             if not os.path.isfile(os.path.join(source_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST source files missing in {source_dir}: {', '.join(missing)}. "
        "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
        "pass source_dir= where the idx .gz files are, or prepare with tfds on a "
        "machine with internet: `tfds build fashion_mnist --file_format=array_record`.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(builder.data_dir)

