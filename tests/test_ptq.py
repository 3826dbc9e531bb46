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
  with pytest.raises(ValueError, match="parameter_quantizers .* need quantize_model"):
    ptq.quantize_trained(NnxMLP(nnx.Rngs(0)),
                         LayerPolicy(DS4, parameter_quantizers=(("w", DS4),)))


class _ConvNet(nn.Module):
  """A small ResNet-like model: a bias-less conv into BatchNorm, a float head."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3), strides=(2, 1), use_bias=False, name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def _im2col(x, window=(3, 3), strides=(2, 1)):
  """SAME-padded windows of ``x [N, H, W, C]`` by hand, rows in (kh, kw, C) order."""
  kh, kw = window
  h_out, w_out = -(-x.shape[1] // strides[0]), -(-x.shape[2] // strides[1])
  pad_h = max((h_out - 1) * strides[0] + kh - x.shape[1], 0)
  pad_w = max((w_out - 1) * strides[1] + kw - x.shape[2], 0)
  x = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                 (0, 0)))
  return np.stack([x[:, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
                   .reshape(x.shape[0], -1)
                   for i in range(h_out) for j in range(w_out)], 1).reshape(-1, kh * kw * x.shape[-1])


@pytest.mark.parametrize("kwargs", [dict(strides=(2, 1)), dict(padding="VALID"),
                                    dict(kernel_dilation=2, padding=((1, 0), (2, 1)))])
def test_conv_patches_times_the_flat_kernel_is_the_conv(kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  conv = nn.Conv(5, (3, 2), use_bias=False, **kwargs)
  variables = conv.init(jax.random.key(1), x)
  patches = ptq.conv_patches(conv, x)
  np.testing.assert_allclose(patches @ np.asarray(variables["params"]["kernel"]).reshape(-1, 5),
                             np.asarray(conv.apply(variables, x)).reshape(-1, 5),
                             rtol=1e-5, atol=1e-5)
  assert ptq.conv_patches(nn.Conv(6, (3, 3), feature_group_count=3), x) is None


def test_error_feedback_rounds_a_conv_against_its_input_patches():
  """GPTQ on a conv (a float head, BatchNorm after): the kernel is rounded with the
  Hessian of its hand-made im2col rows, not by nearest rounding."""
  rng = np.random.default_rng(2)
  mix = rng.normal(size=(2, 2))
  batches = [(rng.normal(size=(4, 7, 6, 2)) @ mix).astype(np.float32) for _ in range(2)]
  model = _ConvNet()
  variables = model.init(jax.random.key(0), batches[0])
  policy = LayerPolicy(sj.DenseShift(3), full_precision=("head",))
  quantized, qvars = ptq.quantize_trained(model, policy, variables,
                                          [(b,) for b in batches], rounding="error_feedback")
  spec = quantized.shift_policy.quantizer_for("conv1")
  weights = np.asarray(spec.weight(qvars["params"]["conv1"]["kernel"]))
  w = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
  rows = np.concatenate([_im2col(b.astype(np.float64)) for b in batches])
  values = spec.values().astype(np.float64)
  expected = ptq.error_feedback_rounding(w.reshape(-1, 6), rows.T @ rows, values)
  np.testing.assert_array_equal(weights.reshape(-1, 6), expected)
  nearest = ptq.round_to_values(w.reshape(-1, 6), values)
  assert np.any(expected != nearest)
  flat = w.reshape(-1, 6)
  assert (np.sum((rows @ (flat - expected)) ** 2) < np.sum((rows @ (flat - nearest)) ** 2))
  # The rest of the model is untouched: BatchNorm statistics and the float head.
  assert quantized.shift_policy.quantizer_for("head") is None
  np.testing.assert_array_equal(qvars["batch_stats"]["bn"]["mean"],
                                variables["batch_stats"]["bn"]["mean"])
