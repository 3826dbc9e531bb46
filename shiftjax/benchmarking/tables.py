"""Markdown tables of results over seeds, as the benchmarks print them."""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = list(values)
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A markdown table: the header, its rule, one line a row."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
