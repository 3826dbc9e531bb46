"""agreement.top1_agreement: same top-1, ties named as such, and real differences."""

import numpy as np

from shiftjax.benchmarking import agreement


def test_same_ties_and_differences_are_counted_apart():
  trained = np.array([[3.0, 1.0, 0.0],     # clear winner, packed agrees
                      [2.0, 2.0005, 0.0],  # top two 5e-4 apart: packed's 1e-3 noise flips it
                      [5.0, 1.0, 0.0],     # clear winner, packed says another class
                      [0.0, 1.0, 4.0]])
  packed = trained + np.array([[0.0, 0.0, 0.0],
                               [0.001, 0.0, 0.0],
                               [-5.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0]])
  result = agreement.top1_agreement(lambda x: trained[x], lambda x: packed[x],
                                    np.arange(4), batch=3)
  assert (result.images, result.same, result.ties, result.differ) == (4, 2, 1, 1)
  assert str(result) == "2/4 same top-1, 1 tie(s), 1 differ"
  assert str(agreement.top1_agreement(lambda x: trained[x], lambda x: trained[x],
                                      np.arange(4))) == "4/4 same top-1"
