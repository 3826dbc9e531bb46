"""Whether a packed model predicts what the trained model does, prediction by prediction."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
  """Top-1 of a packed model against the trained one's over ``predictions`` (an image's
  class, or a language model's next token at one position): ``same`` equal; of the
  others, ``ties`` are predictions whose trained top two logits lie within the packed
  model's rounding of each other (a tie, named as such), ``differ`` the rest."""
  predictions: int
  same: int
  ties: int

  @property
  def differ(self) -> int:
    return self.predictions - self.same - self.ties

  def __str__(self) -> str:
    return (f"{self.same}/{self.predictions} same top-1" +
            (f", {self.ties} tie(s)" if self.ties else "") +
            (f", {self.differ} differ" if self.differ else ""))


def top1_agreement(trained: Callable, packed: Callable, inputs: np.ndarray,
                   batch: int = 1000, rtol: float = 1e-3) -> Agreement:
  """Compares ``argmax`` of ``trained(x)`` and ``packed(x)`` over ``inputs`` in batches
  of ``batch`` inputs. The logits' last axis is the classes; every other position is a
  prediction of its own (``[batch, classes]`` for a classifier, ``[batch, time,
  vocabulary]`` for a language model's next tokens). A disagreement is a tie where the
  two models' logits of that prediction differ by at most ``rtol`` of its largest logit
  (rounding, not another model) and the trained model's top two logits lie within twice
  that difference."""
  predictions = same = ties = 0
  for i in range(0, len(inputs), batch):
    a = np.asarray(trained(inputs[i:i + batch]), np.float64)
    b = np.asarray(packed(inputs[i:i + batch]), np.float64)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    predictions += len(a)
    agree = np.argmax(a, -1) == np.argmax(b, -1)
    top2 = np.sort(a, -1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    noise = np.max(np.abs(a - b), -1)
    rounding = noise <= rtol * np.max(np.abs(a), -1)
    same += int(agree.sum())
    ties += int((~agree & rounding & (gap <= 2 * noise)).sum())
  return Agreement(predictions, same, ties)


def total(agreements: Sequence[Agreement]) -> str:
  """Several runs' agreements as one table cell: ``same/predictions[, ties]`` (empty for
  none)."""
  if not agreements:
    return ""
  ties = sum(a.ties for a in agreements)
  return (f"{sum(a.same for a in agreements)}/{sum(a.predictions for a in agreements)}"
          + (f", {ties} tie(s)" if ties else ""))
