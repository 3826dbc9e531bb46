"""ImageNet (tfds ``imagenet2012``): JPEGs decoded per example, never held in memory.

Reading goes through ``tfds.data_source`` (random access to the array_record files, no
TensorFlow); tfds decodes each JPEG (OpenCV if installed, else Pillow) and Pillow crops
and resizes it. The batching is ``shiftjax.data.pipeline``'s: ``TrainPipeline`` and
``EvalPipeline`` with the same guarantees (training batch ``step`` is a pure function of
``(seed, step)``, so resuming needs no iterator state; every process reads only its
slice of the global batch; evaluation sees every example once, padded and masked; a
background thread builds batches ahead). Only the source and the augmentation differ:

* ``ImageSource``: ``get(indices)`` reads the examples in a thread pool; each thread
  reads, decodes and transforms one example (decoding and resizing release the GIL).
* Training: ``RandomResizedCrop`` (Inception-style, torchvision's parameters: area 8% to
  100%, aspect ratio 3/4 to 4/3, 10 tries then a center crop) to ``image_size`` and a
  random horizontal flip. Its random numbers are drawn for the whole global batch from
  ``(seed, step)`` before any image is seen, then turned into boxes with each image's
  size, so the crops do not depend on how the batch is split between hosts or threads.
* Evaluation: resize the shorter side to ``resize_size`` (256), center crop
  ``image_size`` (224); done as one Pillow resize of the matching box of the original.

Resizing is bilinear with Pillow's antialiasing. Images come out uint8 ``[B, S, S, 3]``
(grayscale and CMYK-decoded images are converted to RGB); labels int32 in 0..999.

Getting the data. ImageNet cannot be downloaded automatically. Download
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` from image-net.org into a
directory ``MANUAL``, then, on a machine with TensorFlow (the tfds ImageNet builder reads
the tars and re-encodes odd images with TensorFlow: ``pip install tensorflow-cpu``)::

    tfds build imagenet2012 --manual_dir=MANUAL --data_dir=DATA --file_format=array_record

and copy ``DATA/imagenet2012`` to the training machines; train with
``--config.data_dir=DATA``. Reading the prepared files needs no TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any, Callable

import numpy as np
import PIL.Image

from shiftjax.data import pipeline
from shiftjax.data.datasets import IMAGENET_MEAN, IMAGENET_STD, STREAMING, DatasetSpec

NAME = "imagenet2012"
# What ``shiftjax.data.datasets.SPECS`` holds for it (the sizes are those served by
# default; ``make_dataset(image_size=...)`` changes them). Its splits are far over
# ``max_bytes``, so it is streamed: ``readers.make_dataset`` sends it to ``make_dataset``.
SPEC = DatasetSpec(NAME, (224, 224, 3), 1000, IMAGENET_MEAN, IMAGENET_STD,
                   train_split="train", eval_split="validation", augment=None,
                   reader=STREAMING)
IMAGE_SIZE = 224
RESIZE_SIZE = 256
DEFAULT_THREADS = 16

_RESAMPLE = PIL.Image.Resampling.BILINEAR


def _to_rgb(image: np.ndarray) -> PIL.Image.Image:
  """uint8 ``[H, W]``, ``[H, W, 1|3|4]`` -> RGB Pillow image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
    raise ValueError(f"expected an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image, got "
                     f"shape {image.shape}")
  return PIL.Image.fromarray(image).convert("RGB")


def _open(image: Any) -> PIL.Image.Image:
  """A decoded array, or encoded bytes (JPEG/PNG), as an RGB Pillow image."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    import io  # pylint: disable=g-import-not-at-top
    with PIL.Image.open(io.BytesIO(bytes(image))) as opened:
      return opened.convert("RGB")
  return _to_rgb(image)


def center_crop_box(width: int, height: int, image_size: int,
                    resize_size: int) -> tuple[float, float, float, float]:
  """Box of the original that 'shorter side to resize_size, center crop' keeps."""
  side = min(width, height) * image_size / resize_size
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def resize_center_crop(image: Any, image_size: int = IMAGE_SIZE,
                       resize_size: int = RESIZE_SIZE) -> np.ndarray:
  """Evaluation transform: uint8 ``[image_size, image_size, 3]``."""
  pil = _open(image)
  box = center_crop_box(pil.width, pil.height, image_size, resize_size)
  return np.asarray(pil.resize((image_size, image_size), _RESAMPLE, box=box))


class RandomResizedCrop:
  """Random area/aspect crop resized to ``size`` plus a random mirror (training).

  ``sample(rng, n)`` draws every random number for ``n`` examples (independent of the
  images); ``apply(images, params)`` decodes and crops a list of images with them.
  """

  def __init__(self, size: int = IMAGE_SIZE, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
               attempts: int = 10, num_threads: int = DEFAULT_THREADS):
    if size <= 0:
      raise ValueError(f"size must be positive, got {size}")
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    self.size = size
    self.scale = scale
    self.ratio = ratio
    self.flip = flip
    self.attempts = attempts
    self.num_threads = num_threads
    self._pool = None  # created on first use

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``uniform`` float ``[n, attempts, 4]`` in [0, 1) (area, log-ratio, top, left),
    ``flip`` bool ``[n]``."""
    uniform = rng.random((n, self.attempts, 4))
    flip = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
    return {"uniform": uniform, "flip": flip}

  def box(self, width: int, height: int, uniform: np.ndarray) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the crop for one image (torchvision's rule)."""
    area = width * height
    log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
    for u_area, u_ratio, u_top, u_left in uniform:
      target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
      aspect = math.exp(log_lo + u_ratio * (log_hi - log_lo))
      w = int(round(math.sqrt(target * aspect)))
      h = int(round(math.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top = int(u_top * (height - h + 1))
        left = int(u_left * (width - w + 1))
        return (left, top, left + w, top + h)
    # Fallback: the largest centered crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < self.ratio[0]:
      w, h = width, int(round(width / self.ratio[0]))
    elif in_ratio > self.ratio[1]:
      w, h = int(round(height * self.ratio[1])), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)

  def transform(self, image: Any, uniform: np.ndarray, flip: bool) -> np.ndarray:
    """One image: the box ``uniform`` selects, resized to ``size``, maybe flipped.

    Returns uint8 ``[size, size, 3]``.
    """
    pil = _open(image)
    out = pil.resize((self.size, self.size), _RESAMPLE,
                     box=self.box(pil.width, pil.height, uniform))
    if flip:
      out = out.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)

  def apply(self, images, params: dict[str, np.ndarray]) -> np.ndarray:
    """Encoded or decoded images (a sequence of ``n``) -> uint8 ``[n, size, size, 3]``."""
    jobs = list(zip(images, params["uniform"], params["flip"]))
    out = np.empty((len(jobs), self.size, self.size, 3), np.uint8)
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          max(1, self.num_threads), thread_name_prefix="shiftjax-augment")
    for i, image in enumerate(self._pool.map(lambda job: self.transform(*job), jobs)):
      out[i] = image
    return out


class ImageSource:
  """Random access to a tfds image split, examples read in a thread pool.

  ``get(indices)`` returns ``{'image', 'label'}``: with a ``transform`` the images are
  its outputs stacked (uint8 ``[n, ...]``), without one an object array of the images as
  tfds returns them (for an augmentation that decodes them itself).
  """

  def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike | None = None,
               transform: Callable[[Any], np.ndarray] | None = None,
               num_threads: int = DEFAULT_THREADS):
    self.name = name
    self.split = split
    self._source = pipeline.data_source(name, split, data_dir)
    self._length = len(self._source)
    self.transform = transform
    self.num_threads = max(1, num_threads)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                       thread_name_prefix="shiftjax-read")

  def __len__(self) -> int:
    return self._length

  def _read(self, index: int) -> tuple[Any, int]:
    example = self._source[int(index)]
    image = example["image"]
    if self.transform is not None:
      image = self.transform(image)
    return image, int(example["label"])

  def get(self, indices: np.ndarray) -> pipeline.Batch:
    """``{"image": uint8 [n, S, S, 3], "label": int32 [n]}`` of examples ``indices``."""
    results = list(self._pool.map(self._read, np.asarray(indices).tolist()))
    labels = np.asarray([label for _, label in results], np.int32)
    if self.transform is not None:
      images = np.stack([image for image, _ in results]) if results else np.zeros(
          (0, 0, 0, 3), np.uint8)
    else:
      images = np.empty(len(results), object)
      images[:] = [image for image, _ in results]
    return {"image": images, "label": labels}

  def close(self) -> None:
    """Stops the reader threads."""
    self._pool.shutdown(wait=False)


def make_dataset(name: str = NAME, split: str | None = None, *, batch_size: int,
                 train: bool, seed: int = 0, data_dir: str | os.PathLike | None = None,
                 augment: bool | pipeline.Augmentation = True, prefetch: int = 4,
                 process_index: int | None = None, process_count: int | None = None,
                 image_size: int | None = None, resize_size: int | None = None,
                 num_threads: int = DEFAULT_THREADS
                 ) -> pipeline.TrainPipeline | pipeline.EvalPipeline:
  """The ``"streaming"`` reader: ImageNet batches read and decoded per example.

  ``readers.make_dataset``'s contract, with ImageNet's own knobs.

  Args:
    name, split: the tfds dataset and split (None: ``'train'`` / ``'validation'``).
    batch_size, train, seed, data_dir, prefetch, process_index, process_count: as in
      ``shiftjax.data.make_dataset``.
    augment: training only: random-resized-crop and flip; False gives the evaluation
      transform (resize, center crop) in a shuffled training order. The crop decodes
      the images itself, so no other augmentation can take its place.
    image_size: side of the served square images (default 224).
    resize_size: evaluation: shorter side before the center crop (default
      ``image_size * 256 / 224``, i.e. 256 for 224).
    num_threads: threads reading and decoding examples.
  """
  # Fail before opening any file.
  if not isinstance(augment, bool):
    raise ValueError(f"{name}: augment must be True or False (its crop decodes the "
                     f"images), got {augment!r}")
  pipeline.host_slice(batch_size, process_index, process_count)
  if train:
    pipeline.check_seed(seed)
  image_size = IMAGE_SIZE if image_size is None else int(image_size)
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if resize_size is None:
    resize_size = int(round(image_size * RESIZE_SIZE / IMAGE_SIZE))
  if split is None:
    split = SPEC.train_split if train else SPEC.eval_split
  hosts = {"process_index": process_index, "process_count": process_count,
           "prefetch": prefetch}
  evaluation = lambda image: resize_center_crop(image, image_size, resize_size)
  if train and augment:
    source = ImageSource(name, split, data_dir=data_dir, num_threads=num_threads)
    return pipeline.TrainPipeline(
        source, batch_size=batch_size, seed=seed,
        augment=RandomResizedCrop(image_size, num_threads=num_threads), **hosts)
  source = ImageSource(name, split, data_dir=data_dir, transform=evaluation,
                       num_threads=num_threads)
  if train:
    return pipeline.TrainPipeline(source, batch_size=batch_size, seed=seed, augment=None,
                                  **hosts)
  return pipeline.EvalPipeline(source, batch_size=batch_size, **hosts)
