"""One timing harness for the benchmarks: contenders called in alternation.

``interleaved({name: fn}, repeats)`` calls every contender once per repetition, one after
the other (in a rotating order with ``rotate=True``), so that load from other processes
on a shared machine hits all of them alike: their ratios hold where absolute times do
not. Each call's result is waited for (``jax.block_until_ready``) inside the timed
interval. Besides wall time, counters read before and after every call (by default the
process's CPU time, all threads) give per-call differences; a contender whose work runs
elsewhere (a child process) returns ``Reported`` values in their place.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

# The counters read around each call unless others are given: {name: reading}.
CPU_TIME = {"cpu": time.process_time}


@dataclasses.dataclass(frozen=True)
class Reported:
  """What a contender returns when its call's counters are not this process's to read
  (it ran in a child process): ``{counter name: value of that call}``, used in place of
  the differences read here. Wall time is always measured here."""
  values: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Timing:
  """One contender's timed calls: wall seconds of each (``all``, in the order run) and
  each counter's difference per call (``counters``: ``{name: per-call values}``)."""
  all: tuple[float, ...]
  counters: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

  @property
  def median(self) -> float:
    return float(np.median(self.all))

  @property
  def p10(self) -> float:
    return self.percentile(10)

  @property
  def p90(self) -> float:
    return self.percentile(90)

  def percentile(self, q: float) -> float:
    """The ``q``-th percentile of the wall times (linear interpolation, ``np.percentile``)."""
    return float(np.percentile(self.all, q))

  def median_of(self, counter: str) -> float:
    """The median per-call difference of ``counter`` (``'cpu'``: CPU seconds)."""
    if counter not in self.counters:
      raise KeyError(f"no counter {counter!r}; read: {sorted(self.counters)}")
    return float(np.median(self.counters[counter]))


def interleaved(contenders: Mapping[str, Callable[[], Any]], repeats: int, *,
                warmup: int = 1, rotate: bool = False, pause: float = 0.0,
                before_each: Callable[[str], Any] | None = None,
                counters: Mapping[str, Callable[[], float]] = CPU_TIME,
                clock: Callable[[], float] = time.perf_counter,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, Timing]:
  """``{name: Timing}`` of ``repeats`` calls of each contender, in alternation.

  Args:
    contenders: ``{name: fn}``, each ``fn()`` one call to time (its result is blocked on).
    repeats: timed calls of each contender.
    warmup: untimed calls of each contender first (compilation, a donated state's first
      step), all of one contender's in a row.
    rotate: start each repetition one contender later, so that none always follows the
      same one; else the order of ``contenders`` every time.
    pause: seconds slept before each timed call, not timed (idle threads of the previous
      contender stop spinning).
    before_each: called with the contender's name before each of its timed calls (after
      ``pause``), not timed: e.g. evicting the caches.
    counters: ``{name: reading}`` read before and after each call; their differences.
    clock, sleep: the wall clock and the sleep (tests give fakes).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}")
  names = list(contenders)
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(contenders[name]())
  wall = {name: [] for name in names}
  counted = {name: {c: [] for c in counters} for name in names}
  for rep in range(repeats):
    shift = rep % len(names) if rotate and names else 0
    for name in names[shift:] + names[:shift]:
      if pause:
        sleep(pause)
      if before_each is not None:
        before_each(name)
      start = clock()
      before = {c: read() for c, read in counters.items()}
      result = jax.block_until_ready(contenders[name]())
      wall[name].append(clock() - start)
      after = {c: read() for c, read in counters.items()}
      reported = result.values if isinstance(result, Reported) else {}
      for c in counters:
        counted[name][c].append(reported[c] if c in reported else after[c] - before[c])
  return {name: Timing(tuple(wall[name]), {c: tuple(v) for c, v in counted[name].items()})
          for name in names}
