"""Batch-wise, vectorized image augmentation in numpy.

Randomness is drawn for a whole *global* batch (``sample``) and applied to any slice of
it (``apply``), so the augmented examples do not depend on how the batch is split across
hosts. Images are uint8 ``[B, H, W, C]`` and stay so.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class Augmentation(Protocol):
  """What a ``TrainPipeline`` augments with: ``CropFlip``, ``speech.SpecAugment``, ..."""

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random parameters of ``n`` examples (the global batch), each ``[n, ...]``."""

  def apply(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """``images`` augmented with the rows of ``params`` that belong to them."""


def crop_and_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray,
                  flip: np.ndarray, pad: int) -> np.ndarray:
  """Zero-pads by ``pad``, cuts the ``H x W`` window at ``(dy, dx)``, mirrors if ``flip``.

  Args:
    images: ``[B, H, W, C]``.
    dy, dx: int ``[B]`` in ``0 .. 2 * pad``: top-left corner of the window in the padded
      image (``pad, pad`` is the identity).
    flip: bool ``[B]``: mirror the window left-right.
    pad: zero border width.

  Returns:
    ``[B, H, W, C]`` of ``images.dtype``:
    ``out[b] = padded[b, dy[b]:dy[b] + H, dx[b]:dx[b] + W]`` (then ``[:, ::-1]`` if flip).
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = dy[:, None] + np.arange(h)
  cols = np.where(flip[:, None], dx[:, None] + (w - 1 - np.arange(w)),
                  dx[:, None] + np.arange(w))
  # One gather does crop and flip for the whole batch.
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclasses.dataclass(frozen=True)
class CropFlip:
  """Random crop after zero padding by ``pad`` and, if ``flip``, random mirroring."""
  pad: int
  flip: bool

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random parameters of ``n`` examples: int ``dy``, ``dx``, bool ``flip`` ``[n]``."""
    dy = rng.integers(0, 2 * self.pad + 1, size=n)
    dx = rng.integers(0, 2 * self.pad + 1, size=n)
    flip = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
    return {"dy": dy, "dx": dx, "flip": flip}

  def apply(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` images cropped and flipped by ``sample``'s ``params``."""
    return crop_and_flip(images, params["dy"], params["dx"], params["flip"], self.pad)
