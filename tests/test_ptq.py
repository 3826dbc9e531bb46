"""Post-training quantization of trained float models (linen and NNX)."""

import flax.linen as nn
from flax import nnx
import jax
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import ptq
from shiftjax.policy import LayerPolicy
from tiny_models import LinenMLP, NnxMLP, X

DS4 = sj.DenseShift(4)


def test_round_to_values_picks_the_nearest():
  values = np.array([-1.0, -0.5, 0.5, 1.0])
  np.testing.assert_array_equal(
      ptq.round_to_values(np.array([-2, -0.7, -0.76, 0.1, 0.74, 0.76, 3.0]), values),
      [-1.0, -0.5, -1.0, 0.5, 0.5, 1.0, 1.0])


def test_best_offset_follows_the_weights_scale():
  w = np.random.default_rng(0).normal(size=(64, 32)) * 0.01
  base = ptq.best_offset(w, DS4).e0
  assert ptq.best_offset(w * 8, DS4).e0 == base + 3
  values = ptq.best_offset(w, DS4).values()
  assert values.max() >= np.abs(w).max() / 2  # the format reaches the weights


def test_error_feedback_keeps_the_layer_output_closer_than_nearest_rounding():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(512, 32)) @ rng.normal(size=(32, 32))  # correlated inputs
  w = rng.normal(size=(32, 16)) * 0.1
  values = ptq.best_offset(w, sj.DenseShift(3)).values().astype(np.float64)
  nearest = ptq.round_to_values(w, values)
  fed_back = ptq.error_feedback_rounding(w, x.T @ x, values)
  assert set(np.unique(fed_back)) <= set(values)
  assert np.sum((x @ (w - fed_back)) ** 2) < 0.8 * np.sum((x @ (w - nearest)) ** 2)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_trained_models_become_shift_models_with_exact_powers_and_corrected_bias(framework):
  calibration = [(X,)]
  policy = LayerPolicy(DS4, full_precision=("head",))
  if framework == "linen":
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    quantized, qvars = ptq.quantize_trained(model, policy, variables, calibration,
                                            rounding="error_feedback", bias_correction=True)
    weights = quantized.shift_policy.quantizer_for("fc1").weight(qvars["params"]["fc1"]["kernel"])
    spec = quantized.shift_policy.quantizer_for("fc1")
    fc1 = lambda v: nn.Dense(16).apply({"params": v["params"]["fc1"]}, X)  # float fc1 out
    float_out = fc1(variables)
    shift_out = X @ weights + qvars["params"]["fc1"]["bias"]
  else:
    model = NnxMLP(nnx.Rngs(0))
    quantized = ptq.quantize_trained(model, policy, calibration=calibration,
                                     rounding="error_feedback", bias_correction=True)
    spec = quantized.fc1.kernel.weight_spec
    weights = quantized.fc1.kernel[...]
    float_out = model.fc1(X)
    shift_out = quantized.fc1(X)
  assert set(np.unique(np.asarray(weights)).tolist()) <= set(spec.values().tolist())
  assert spec.bits == 4 and spec.e0 != 0  # its own offset
  # Bias correction: over the calibration inputs the layer's mean output is the float's.
  np.testing.assert_allclose(np.mean(shift_out, 0), np.mean(float_out, 0), atol=1e-5)


def test_bad_requests_are_refused():
  with pytest.raises(ValueError, match="rounding must be one of"):
    ptq.quantize_trained(NnxMLP(nnx.Rngs(0)), LayerPolicy(DS4), rounding="stochastic")
  with pytest.raises(ValueError, match="need calibration inputs"):
    ptq.quantize_trained(NnxMLP(nnx.Rngs(0)), LayerPolicy(DS4), bias_correction=True)
  with pytest.raises(ValueError, match="activation specs learn"):
    ptq.quantize_trained(NnxMLP(nnx.Rngs(0)), LayerPolicy(DS4, activation=sj.PACT(4)))
