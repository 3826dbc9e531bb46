"""shiftjax.benchmarking.weight_values: the share of each weight magnitude in a model
(benchmarks/weight_values.py prints it)."""

import jax
import numpy as np
import pytest

import shiftjax as sj
from shiftjax.benchmarking import weight_values


def test_fractions_count_every_quantized_weight_once():
  s3, dense = sj.S3(3), sj.DenseShift(3)
  conv = s3.init(jax.random.key(0), (3, 3, 4, 8))
  head = dense.init(jax.random.key(1), (8, 2))
  params = {"stage1": {"conv": {"kernel": conv}}, "stem": {"kernel": np.ones((3, 3))},
            "head": {"kernel": head}}
  got = weight_values.magnitude_fractions(params, {"stage1/conv": s3, "head": dense})
  weights = np.concatenate([np.abs(np.asarray(s3.weight(conv))).ravel(),
                            np.abs(np.asarray(dense.weight(head))).ravel()])
  assert weights.size == 3 * 3 * 4 * 8 + 16  # the float stem is not counted
  values, counts = np.unique(weights, return_counts=True)
  assert got == pytest.approx(dict(zip(values.tolist(), (counts / weights.size).tolist())))
  assert sum(got.values()) == pytest.approx(1.0)
