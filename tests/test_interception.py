"""quantize_model: a user's own linen and NNX models quantized by rules over module paths."""

import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shiftjax as sj
from shiftjax import layers
from shiftjax.interception import ShiftKernel, quantize_model
from shiftjax.policy import LayerPolicy, PolicyError
from tiny_models import (IMAGES, TOKENS, X, LinenMLP, LinenTinyViT, NnxMLP,
                         NnxTinyTransformer)

DS3 = sj.DenseShift(3)


class ExplicitShiftMLP(nn.Module):
  """The same MLP written with explicit shift layers."""
  quantizer: sj.quantizers.Quantizer

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.ShiftDense(16, quantizer=self.quantizer, name="fc1")(x))
    x = nn.LayerNorm(name="norm")(x)
    return layers.ShiftDense(3, name="head")(x)


def _latent_kernels(params) -> dict[str, dict]:
  flat = {}

  def visit(tree, path):
    for key, value in tree.items():
      if key == "kernel" and isinstance(value, dict):
        flat["/".join(path)] = value
      elif isinstance(value, dict):
        visit(value, (*path, key))
  visit(params, ())
  return flat


def test_linen_layers_get_latents_by_rules_and_the_rest_stays_float():
  policy = LayerPolicy(DS3, full_precision=("head",),
                       layer_quantizers=(("attention/*", sj.S3(4)),))
  model = quantize_model(LinenTinyViT(), policy)
  params = model.init(jax.random.key(0), IMAGES)["params"]
  latents = _latent_kernels(params)
  assert sorted(latents) == ["attention/key", "attention/out", "attention/query",
                             "attention/value", "mix", "patch_embed"]
  assert set(latents["attention/query"]) == set(sj.S3(4).init(jax.random.key(0), (1, 1)))
  assert latents["patch_embed"]["exponent"].shape == (3, 2, 2, 3, 8)  # chain: 3 latents
  assert params["head"]["kernel"].shape == (8, 4)  # float
  out = model.apply({"params": params}, IMAGES)
  assert out.shape == (2, 4) and np.isfinite(out).all()
  # The float model itself is untouched: it still makes float kernels.
  assert LinenTinyViT().init(jax.random.key(0), IMAGES)["params"]["mix"]["kernel"].shape == (8, 8)


def test_linen_weights_seen_by_the_layers_are_exact_powers_of_two():
  model = quantize_model(LinenMLP(), LayerPolicy(DS3, full_precision=("head",)))
  params = model.init(jax.random.key(0), X)["params"]
  captured = {}

  def spy(next_fun, args, kwargs, context):
    if context.module.name == "fc1":
      kernel = DS3.weight(params["fc1"]["kernel"])
      captured["w"] = kernel
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    model.apply({"params": params}, X)
  values = set(np.unique(np.asarray(captured["w"])).tolist())
  assert values <= set(DS3.values().tolist())


def test_rules_quantized_model_equals_the_model_written_with_shift_layers():
  model = quantize_model(LinenMLP(), LayerPolicy(DS3, full_precision=("head",)))
  variables = model.init(jax.random.key(0), X)
  explicit = ExplicitShiftMLP(DS3)
  assert jax.tree.map(jnp.shape, explicit.init(jax.random.key(0), X)) == jax.tree.map(
      jnp.shape, variables)
  np.testing.assert_array_equal(model.apply(variables, X), explicit.apply(variables, X))


def test_linen_and_nnx_models_with_the_same_latents_give_identical_outputs():
  policy = LayerPolicy(DS3, full_precision=("head",), activation=sj.PACT(4))
  linen_model = quantize_model(LinenMLP(), policy)
  variables = linen_model.init(jax.random.key(0), X)
  nnx_model = quantize_model(NnxMLP(nnx.Rngs(1)), policy)
  p = variables["params"]
  nnx_model.fc1.kernel.set_value(p["fc1"]["kernel"])
  nnx_model.fc1.activation.set_value(p["fc1"]["activation"])
  for name in ("fc1", "head"):
    getattr(nnx_model, name).bias.set_value(p[name]["bias"])
  nnx_model.head.kernel.set_value(p["head"]["kernel"])
  np.testing.assert_array_equal(linen_model.apply(variables, X), nnx_model(X))


def test_straight_through_gradients_match_the_hand_derived_formulas():
  """Loss sum(y * c) of y = x @ W(latents) + b: dL/dW = x^T c, and the latents get
  dL/dW times the spec's straight-through derivative: 1 for DeepShift-Q's latent
  weight; sqrt(S + 1) * 2**e0 for DenseShift's sign latent (the 'sqrt' surrogate)."""
  c = jax.random.normal(jax.random.key(9), (4, 3))
  for spec in (sj.DeepShiftQ(5), sj.DenseShift(3, e0=-2)):
    class OneLayer(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(3, name="fc")(x)
    for model in (quantize_model(OneLayer(), LayerPolicy(spec)),
                  quantize_model(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), LayerPolicy(spec))):
      if isinstance(model, nn.Module):
        params = model.init(jax.random.key(0), X)["params"]
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, X) * c))(params)
        latents, grad = params["fc"]["kernel"], grads["fc"]["kernel"]
      else:
        grads = nnx.grad(lambda m: jnp.sum(m(X) * c))(model)
        latents, grad = model.kernel.get_value(), grads["kernel"].get_value()
      upstream = X.T @ c
      if isinstance(spec, sj.DeepShiftQ):
        np.testing.assert_allclose(grad["weight"], upstream, rtol=1e-6)
      else:
        index = np.log2(np.abs(np.asarray(spec.weight(latents)))) - spec.e0  # S
        expected = upstream * np.sqrt(index + 1.0) * 2.0 ** spec.e0
        np.testing.assert_allclose(grad["sign"], expected, rtol=1e-6)


def test_nnx_model_trains_with_nnx_optimizer_and_jit():
  model = quantize_model(NnxTinyTransformer(nnx.Rngs(0)), LayerPolicy(
      DS3, full_precision=("head",), layer_quantizers=(("out", sj.S3(3)),)))
  assert isinstance(model.qkv.kernel, ShiftKernel) and isinstance(model.out.kernel, ShiftKernel)
  assert isinstance(model.conv.kernel, ShiftKernel)
  assert not isinstance(model.head.kernel, ShiftKernel)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  targets = jnp.roll(TOKENS, -1, axis=1)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(TOKENS)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < losses[0]


def test_nnx_from_float_encodes_the_nearest_powers_of_two():
  model = NnxMLP(nnx.Rngs(0))
  quantized = quantize_model(model, LayerPolicy(DS3, full_precision=("head",)),
                             from_float=True)
  w = np.asarray(quantized.fc1.kernel[...])
  target = sj.transfer.target_weights(np.asarray(model.fc1.kernel[...]), DS3)
  np.testing.assert_array_equal(w, target)
  assert not isinstance(model.fc1.kernel, ShiftKernel)  # the float model is untouched


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("policy, message", [
    (LayerPolicy(DS3, layer_quantizers=(("norm", sj.S3(3)),)),
     "pattern 'norm' matches 'norm' (LayerNorm), which a shift spec cannot serve"),
    (LayerPolicy(DS3, layer_quantizers=(("fc9", sj.S3(3)),)),
     "pattern 'fc9' matches no layer of the model; its layers: fc1, head"),
    (LayerPolicy(DS3, layer_activations=(("fc1/bias", sj.PACT(4)),)),
     "pattern 'fc1/bias' names parameters (fc1/bias)"),
    (LayerPolicy(DS3, layer_quantizers=(("fc*", sj.S3(3)), ("*1", sj.S3(4)))),
     "layer 'fc1' gets two weight specs: pattern 'fc*'"),
])
def test_bad_rules_are_refused_naming_the_pattern_and_the_paths(framework, policy, message):
  with pytest.raises(PolicyError, match=re.escape(message)):
    if framework == "linen":
      jax.eval_shape(quantize_model(LinenMLP(), policy).init, jax.random.key(0), X)
    else:
      quantize_model(NnxMLP(nnx.Rngs(0)), policy)


def test_a_model_with_no_quantizable_layer_is_refused():
  class NormsOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm(name="norm")(x)
  with pytest.raises(PolicyError, match=r"no layer a shift spec can serve .*norm \(LayerNorm\)"):
    jax.eval_shape(quantize_model(NormsOnly(), LayerPolicy(DS3)).init, jax.random.key(0), X)
  with pytest.raises(PolicyError, match="no layer a shift spec can serve"):
    quantize_model(nnx.LayerNorm(5, rngs=nnx.Rngs(0)), LayerPolicy(DS3))


def test_bad_arguments_are_refused():
  with pytest.raises(TypeError, match="LayerPolicy"):
    quantize_model(LinenMLP(), DS3)
  with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
    quantize_model(lambda x: x, LayerPolicy(DS3))
  with pytest.raises(ValueError, match="NNX models"):
    quantize_model(LinenMLP(), LayerPolicy(DS3), from_float=True)
  with pytest.raises(ValueError, match="no method 'encode'"):
    quantize_model(LinenMLP(), LayerPolicy(DS3), methods=("encode",))
