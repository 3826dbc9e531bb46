"""shiftjax.benchmarking.timing on fake contenders and a fake clock: no timed assertions."""

import jax.numpy as jnp
import pytest

from shiftjax.benchmarking import timing


class FakeClock:
  """A clock that each contender advances by its own cost; it logs who ran when."""

  def __init__(self):
    self.now = 0.0
    self.log = []

  def __call__(self):
    return self.now

  def contender(self, name, cost, result=None):
    def call():
      self.log.append(name)
      self.now += cost
      return result
    return call


def test_each_contender_is_timed_by_its_own_calls_in_alternation():
  clock, pauses = FakeClock(), []
  costs = {"a": [1.0, 2.0, 3.0, 10.0], "b": [0.5] * 4}
  def contender(name):
    def call():
      clock.log.append(name)
      clock.now += costs[name].pop(0)
      return jnp.ones(2)  # blocked on inside the interval
    return call
  t = timing.interleaved({"a": contender("a"), "b": contender("b")}, repeats=3, warmup=1,
                         pause=0.05, counters={}, clock=clock, sleep=pauses.append)
  # One warm-up call of each (not timed), then a, b, a, b, a, b.
  assert clock.log == ["a", "b", "a", "b", "a", "b", "a", "b"]
  assert t["a"].all == (2.0, 3.0, 10.0) and t["b"].all == (0.5, 0.5, 0.5)
  assert t["a"].median == 3.0 and t["b"].median == 0.5
  assert pauses == [0.05] * 6  # before every timed call, outside the interval


def test_before_each_runs_untimed_before_every_timed_call_of_each_contender():
  clock, before = FakeClock(), []

  def evict(name):
    before.append(name)
    clock.now += 100.0  # would dominate the timings if it were inside the interval
  contenders = {n: clock.contender(n, 1.0) for n in "xy"}
  t = timing.interleaved(contenders, repeats=2, warmup=1, before_each=evict, counters={},
                         clock=clock)
  assert before == ["x", "y", "x", "y"]  # not before the warm-up calls
  assert t["x"].all == t["y"].all == (1.0, 1.0)


def test_rotation_starts_each_repetition_one_contender_later():
  clock = FakeClock()
  contenders = {n: clock.contender(n, 1.0) for n in "xyz"}
  timing.interleaved(contenders, repeats=4, warmup=0, rotate=True, counters={}, clock=clock)
  assert "".join(clock.log) == "xyz" "yzx" "zxy" "xyz"


def test_percentiles_interpolate_as_numpy_does():
  t = timing.Timing(tuple(float(i) for i in range(11)))
  assert (t.median, t.p10, t.p90) == (5.0, 1.0, 9.0)
  assert timing.Timing((1.0, 2.0)).percentile(10) == pytest.approx(1.1)
  assert timing.Timing((4.0, 1.0, 3.0, 2.0)).median == 2.5


def test_counters_give_per_call_differences_and_reported_values_replace_them():
  clock, cpu = FakeClock(), [0.0]
  def local():
    clock.now += 1.0
    cpu[0] += 1.5  # two threads busy part of the time
  def child():
    clock.now += 2.0
    cpu[0] += 0.01  # this process only waits
    return timing.Reported({"cpu": 1.75})
  t = timing.interleaved({"local": local, "child": child}, repeats=2, warmup=0,
                         counters={"cpu": lambda: cpu[0]}, clock=clock)
  assert t["local"].all == (1.0, 1.0) and t["local"].median_of("cpu") == 1.5
  assert t["child"].all == (2.0, 2.0) and t["child"].counters["cpu"] == (1.75, 1.75)
  with pytest.raises(KeyError, match=r"no counter 'faults'; read: \['cpu'\]"):
    t["local"].median_of("faults")


def test_default_counter_is_the_process_cpu_time():
  t = timing.interleaved({"f": lambda: None}, repeats=2, warmup=0)
  assert set(t["f"].counters) == {"cpu"} and len(t["f"].counters["cpu"]) == 2


def test_repeats_must_be_positive():
  with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
    timing.interleaved({"f": lambda: None}, repeats=0)
