"""parameter_quantizers: parameters a user's own code multiplies (jnp.einsum, x @ w),
outside flax's layers, quantized by rules over their paths, in linen and NNX."""

import itertools
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shiftjax as sj
from shiftjax import loop
from shiftjax import optim
from shiftjax.deploy import packed_layers
from shiftjax.interception import LATENTS, ShiftParameter, quantize_model
from shiftjax.policy import LayerPolicy, PolicyError
from tiny_models import X, LinenMLP, LinenRawMixer, NnxMLP, NnxRawMixer

DS3 = sj.DenseShift(3, e0=-2)
S3 = sj.S3(3, e0=-2)
POLICY = LayerPolicy(None, parameter_quantizers=(("heads", DS3), ("proj/w", S3)))


def _linen():
  model = quantize_model(LinenRawMixer(), POLICY)
  return model, model.init(jax.random.key(0), X)


def _reference(x, heads, w, scale):
  """The mixer written out by hand on given weights."""
  h = jnp.einsum("bd,dhk->bhk", x * scale, heads).reshape(x.shape[0], 8)
  return jax.nn.relu(h) @ w


def test_linen_named_parameters_hold_latents_and_are_read_quantized():
  model, variables = _linen()
  params = variables["params"]
  assert set(params["heads"]) == {LATENTS} and set(params["heads"][LATENTS]) == {
      "sign", "exponent"}
  assert set(params["proj"]["w"][LATENTS]) == {"sign", "shift", "sparse"}
  assert params["scale"].shape == (5,)  # no rule names it: float
  heads = DS3.weight(params["heads"][LATENTS])
  w = S3.weight(params["proj"]["w"][LATENTS])
  assert set(np.abs(np.asarray(heads)).ravel()) <= {2.0 ** e for e in range(-2, 2)}
  np.testing.assert_array_equal(model.apply(variables, X),
                                _reference(X, heads, w, params["scale"]))


def test_nnx_parameters_read_as_the_quantized_weight_every_way():
  model = quantize_model(NnxRawMixer(nnx.Rngs(0)), POLICY)
  assert isinstance(model.heads, ShiftParameter) and isinstance(model.proj.w, ShiftParameter)
  assert not isinstance(model.scale, ShiftParameter)
  heads = DS3.weight(model.heads.get_value()[LATENTS])
  for read in (model.heads[...], model.heads.value, jnp.asarray(model.heads),
               jnp.einsum("dhk->dhk", model.heads)):
    np.testing.assert_array_equal(read, heads)
  h = jnp.ones((2, 8))
  w = S3.weight(model.proj.w.get_value()[LATENTS])
  np.testing.assert_array_equal(h @ model.proj.w, h @ w)
  np.testing.assert_array_equal(model.proj.w @ jnp.ones((3,)), w @ jnp.ones((3,)))
  assert model.heads.shape == (5, 2, 4) and model.heads.ndim == 3
  np.testing.assert_array_equal(model(X), _reference(X, heads, w, model.scale[...]))


def test_linen_and_nnx_with_the_same_latents_give_identical_outputs():
  linen_model, variables = _linen()
  params = variables["params"]
  nnx_model = quantize_model(NnxRawMixer(nnx.Rngs(1)), POLICY)
  nnx_model.heads.set_value(params["heads"])
  nnx_model.proj.w.set_value(params["proj"]["w"])
  np.testing.assert_array_equal(linen_model.apply(variables, X), nnx_model(X))


def test_straight_through_gradients_match_the_hand_derived_formula():
  """Loss sum(y * c), y = x @ W(latents) with W a parameter the code multiplies:
  dL/dW = x^T c, and DenseShift's sign latent gets dL/dW * sqrt(S + 1) * 2**e0."""
  c = jax.random.normal(jax.random.key(9), (4, 3))

  class LinenMatmul(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("w", nn.initializers.lecun_normal(), (5, 3))

  class NnxMatmul(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((5, 3)))

    def __call__(self, x):
      return x @ self.w

  policy = LayerPolicy(None, parameter_quantizers=(("w", DS3),))
  linen_model = quantize_model(LinenMatmul(), policy)
  params = linen_model.init(jax.random.key(0), X)["params"]
  grads = jax.grad(lambda p: jnp.sum(linen_model.apply({"params": p}, X) * c))(params)
  nnx_model = quantize_model(NnxMatmul(), policy)
  nnx_grads = nnx.grad(lambda m: jnp.sum(m(X) * c))(nnx_model)
  for latents, grad in ((params["w"][LATENTS], grads["w"][LATENTS]),
                        (nnx_model.w.get_value()[LATENTS], nnx_grads["w"].get_value()[LATENTS])):
    index = np.log2(np.abs(np.asarray(DS3.weight(latents)))) - DS3.e0  # S
    expected = (X.T @ c) * np.sqrt(index + 1.0) * 2.0 ** DS3.e0
    np.testing.assert_allclose(grad["sign"], expected, rtol=1e-6)


def test_latents_of_parameters_get_the_latent_learning_rate_scale():
  _, variables = _linen()
  mask = optim.latent_mask(variables["params"])
  assert all(jax.tree.leaves(mask["heads"])) and all(jax.tree.leaves(mask["proj"]))
  assert not mask["scale"]


def test_packed_files_of_both_frameworks_run_as_the_trained_model(tmp_path):
  linen_model, variables = _linen()
  packed, packed_variables = sj.deploy.pack_model(linen_model, variables, X)
  path = packed_layers.save_model(tmp_path / "linen.shiftjax", packed, packed_variables)
  loaded, loaded_variables = packed_layers.load_model(path, LinenRawMixer())
  np.testing.assert_array_equal(loaded.apply(loaded_variables, X),
                                linen_model.apply(variables, X))
  assert "heads" not in loaded_variables["params"]  # codes only, no latents

  nnx_model = quantize_model(NnxRawMixer(nnx.Rngs(0)), POLICY)
  path = packed_layers.save_model(tmp_path / "nnx.shiftjax", sj.deploy.pack_model(nnx_model))
  tree = sj.deploy.load(path)
  assert {p: e.kind for p, e in tree.layers.items()} == {"heads": "Param", "proj/w": "Param"}
  assert tree.arrays["codes/heads"].shape == (2, 3)  # 40 codes in bit planes of 3 bits
  loaded = packed_layers.load_model(path, NnxRawMixer(nnx.Rngs(7)))
  np.testing.assert_array_equal(loaded(X), nnx_model(X))
  exported = jax.export.deserialize(bytearray(packed_layers.export_artifact(loaded, X)))
  np.testing.assert_allclose(exported.call(X), nnx_model(X), rtol=1e-6)


def test_summary_lists_parameters_with_their_work_unknown():
  summary = sj.summarize(quantize_model(NnxRawMixer(nnx.Rngs(0)), POLICY), X)
  by_path = {l.path: l for l in summary.layers}
  assert (by_path["heads"].kind, by_path["heads"].bits, by_path["heads"].params,
          by_path["heads"].macs) == ("Param", 3, 40, None)
  assert summary.other_params == 5  # the float scale
  assert "? " in str(summary) or "?\n" in str(summary)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("rules, message", [
    ((("mix*", DS3),), "pattern 'mix*' matches no parameter outside the model's layers; "
                       "those parameters: heads, proj/w, scale"),
    ((("heads", DS3), ("head*", S3)), "layer 'heads' gets two parameter specs"),
])
def test_bad_parameter_rules_are_refused_naming_the_pattern_and_the_paths(
    framework, rules, message):
  policy = LayerPolicy(None, parameter_quantizers=rules)
  with pytest.raises(PolicyError, match=re.escape(message)):
    if framework == "linen":
      jax.eval_shape(quantize_model(LinenRawMixer(), policy).init, jax.random.key(0), X)
    else:
      quantize_model(NnxRawMixer(nnx.Rngs(0)), policy)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_parameter_rule_naming_a_layers_kernel_points_to_layer_rules(framework):
  policy = LayerPolicy(None, parameter_quantizers=(("fc1/kernel", DS3),))
  with pytest.raises(PolicyError, match="names a layer's parameters .*layer_quantizers"):
    if framework == "linen":
      jax.eval_shape(quantize_model(LinenMLP(), policy).init, jax.random.key(0), X)
    else:
      quantize_model(NnxMLP(nnx.Rngs(0)), policy)


def test_a_parameter_rule_without_a_weight_spec_is_refused():
  with pytest.raises(PolicyError, match="parameter_quantizers pattern 'heads': None"):
    LayerPolicy(None, parameter_quantizers=(("heads", None),))


def _batches(start):
  """Batches as a function of the step (an exact resume)."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(128, 5)).astype(np.float32)
  ys = (xs[:, 0] > 0).astype(np.int32) + (xs[:, 1] > 0)
  for step in itertools.count(start):
    i = (step * 32) % len(xs)
    yield {"image": xs[i:i + 32], "label": ys[i:i + 32]}


def _model(framework):
  return quantize_model(LinenRawMixer() if framework == "linen" else NnxRawMixer(nnx.Rngs(0)),
                        POLICY)


def _fit(model, workdir, **kwargs):
  return loop.fit(model, _batches, optimizer=optax.adam(1e-2), num_steps=20,
                  checkpoint_every=10, progress_bar=False, workdir=workdir, **kwargs)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_fit_resumes_a_model_with_quantized_parameters_bit_exactly(framework, tmp_path):
  straight = _fit(_model(framework), str(tmp_path / "straight"))
  _fit(_model(framework), str(tmp_path / "resumed"), stop_after_steps=10)
  resumed = _fit(_model(framework), str(tmp_path / "resumed"))
  assert int(resumed.state.step) == 20
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)


def test_latent_learning_rate_scale_reaches_quantized_parameters():
  model = _model("nnx")
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  after = nnx.state(_fit(model, None, latent_lr_scale=0.0).model, nnx.Param)
  for name in ("heads",):
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
      np.testing.assert_array_equal(a, b)  # latents frozen by the scale
  assert not np.array_equal(before["scale"].get_value(), after["scale"].get_value())


def test_nnx_from_float_encodes_the_parameters_nearest_powers_of_two():
  model = NnxRawMixer(nnx.Rngs(0))
  quantized = quantize_model(model, POLICY, from_float=True)
  for name, spec, read in (("heads", DS3, lambda m: m.heads), ("proj/w", S3, lambda m: m.proj.w)):
    target = sj.transfer.target_weights(np.asarray(read(model)[...]), spec)
    np.testing.assert_array_equal(np.asarray(read(quantized)[...]), target, err_msg=name)
