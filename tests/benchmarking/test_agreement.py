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
  assert (result.predictions, result.same, result.ties, result.differ) == (4, 2, 1, 1)
  assert str(result) == "2/4 same top-1, 1 tie(s), 1 differ"
  assert str(agreement.top1_agreement(lambda x: trained[x], lambda x: trained[x],
                                      np.arange(4))) == "4/4 same top-1"


def test_every_position_of_a_sequence_is_a_prediction():
  rng = np.random.default_rng(0)
  trained = rng.normal(size=(5, 7, 11))  # 5 sequences x 7 positions x 11 tokens
  packed = trained.copy()
  packed[1, 3] = -trained[1, 3]            # one position predicts another token
  result = agreement.top1_agreement(lambda x: trained[x], lambda x: packed[x],
                                    np.arange(5), batch=2)
  assert (result.predictions, result.same, result.ties) == (35, 34, 0)


def test_total_sums_runs_into_one_cell():
  runs = [agreement.Agreement(10, 9, 1), agreement.Agreement(10, 10, 0)]
  assert agreement.total(runs) == "19/20, 1 tie(s)"
  assert agreement.total(runs[1:]) == "10/10"
  assert agreement.total([]) == ""
