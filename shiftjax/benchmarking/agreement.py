"""Whether a packed model predicts what the trained model does, image by image."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
  """Top-1 of a packed model against the trained one's on ``images`` inputs: ``same``
  equal; of the others, ``ties`` are inputs whose trained top two logits lie within
  the packed model's rounding of each other (a tie, named as such), ``differ`` the rest."""
  images: int
  same: int
  ties: int

  @property
  def differ(self) -> int:
    return self.images - self.same - self.ties

  def __str__(self) -> str:
    return (f"{self.same}/{self.images} same top-1" +
            (f", {self.ties} tie(s)" if self.ties else "") +
            (f", {self.differ} differ" if self.differ else ""))


def top1_agreement(trained: Callable, packed: Callable, inputs: np.ndarray,
                   batch: int = 1000, rtol: float = 1e-3) -> Agreement:
  """Compares ``argmax`` of ``trained(x)`` and ``packed(x)`` (logits) over ``inputs`` in
  batches. A disagreement is a tie where the two models' logits of that input differ by
  at most ``rtol`` of its largest logit (rounding, not another model) and the trained
  model's top two logits lie within twice that difference."""
  same = ties = 0
  for i in range(0, len(inputs), batch):
    a = np.asarray(trained(inputs[i:i + batch]), np.float64)
    b = np.asarray(packed(inputs[i:i + batch]), np.float64)
    agree = np.argmax(a, -1) == np.argmax(b, -1)
    top2 = np.sort(a, -1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    noise = np.max(np.abs(a - b), -1)
    rounding = noise <= rtol * np.max(np.abs(a), -1)
    same += int(agree.sum())
    ties += int((~agree & rounding & (gap <= 2 * noise)).sum())
  return Agreement(len(inputs), same, ties)
