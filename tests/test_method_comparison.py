"""The statistics the accuracy benchmarks print over seeds (benchmarks/method_comparison.py)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import method_comparison  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_mean_and_sample_std():
  mean, std = method_comparison.mean_and_std([0.90, 0.92, 0.97])
  assert mean == pytest.approx(0.93)
  # Sample (n - 1) standard deviation: squares 0.0009 + 0.0001 + 0.0016 over 2.
  assert std == pytest.approx(math.sqrt(0.0026 / 2))
  assert method_comparison.mean_and_std([0.5]) == (0.5, 0.0)


def test_gap_and_its_standard_error():
  gap, se = method_comparison.gap_to([0.90, 0.92], [0.91, 0.95, 0.96])
  assert gap == pytest.approx(0.94 - 0.91)
  # sqrt(s_ref^2 / 2 + s^2 / 3) with s_ref^2 = 0.0002, s^2 = (0.0009 + 0.0001 + 0.0004) / 2.
  assert se == pytest.approx(math.sqrt(0.0002 / 2 + 0.0007 / 3))


def test_table_prints_every_seed_and_the_gap(capsys):
  runs = lambda accs: [{"test_accuracy": a, "steps": 10, "training_wall_seconds": 5.0,
                        "packed_weight_bytes": 2048} for a in accs]
  method_comparison.print_table({"float": runs([0.90, 0.92]), "shift": runs([0.88, 0.89])},
                                "float", {"packed KiB": lambda s: s["packed_weight_bytes"] / 1024})
  out = capsys.readouterr().out.splitlines()
  shift = next(l for l in out if l.startswith("shift"))
  assert "0.8800  0.8900" in shift and "0.8850" in shift
  assert "-2.50 +- " in shift and shift.rstrip().endswith("2.0")
