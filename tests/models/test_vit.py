"""The float linen ViT: shapes, module paths, pooling, dropout, one training step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from shiftjax.models import vit

TINY = vit.ViTConfig(patch_size=7, hidden_dim=16, depth=2, num_heads=2, mlp_dim=32)
# For the tests that compile a forward or a gradient: compile time grows with depth.
SHALLOW = dataclasses.replace(TINY, depth=1)


def images(n=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 28, 28, 1)), jnp.float32)


def init(model, x):
  # Compiled whole: op-by-op (eager) initialization costs seconds of dispatch here.
  return jax.jit(model.init)(jax.random.key(0), x)["params"]


def layer_paths(model, x, kinds):
  """Module paths of the layers of ``kinds`` that run in a forward pass."""
  paths = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, kinds) and context.method_name == "__call__":
      paths.add("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), x)
  return paths


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_logits_shape(pooling):
  model = vit.ViT(dataclasses.replace(TINY, pooling=pooling, num_classes=7))
  x = images()
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  logits = jax.eval_shape(model.apply, {"params": params}, x)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32


def test_every_matmul_and_conv_is_a_standard_layer_at_a_documented_path():
  x = images()
  paths = layer_paths(vit.ViT(TINY), x, (nn.Dense, nn.DenseGeneral, nn.Conv))
  expected = {"patch_embed", "head"} | {
      f"encoder_block{i}/{name}" for i in range(2)
      for name in ("attention/query", "attention/key", "attention/value",
                   "attention/out", "mlp/fc1", "mlp/fc2")}
  assert paths == expected
  dense_general = layer_paths(vit.ViT(TINY), x, nn.DenseGeneral)
  assert dense_general == {p for p in expected if "/attention/" in p}


def param_shapes(model):
  params = jax.eval_shape(model.init, jax.random.key(0), images())["params"]
  return traverse_util.flatten_dict(params, sep="/")


def test_params_are_the_layers_plus_norms_and_position_embedding():
  params = param_shapes(vit.ViT(TINY))
  owners = {p.rsplit("/", 1)[0] if "/" in p else p for p in params}
  assert {"pos_embed", "norm", "encoder_block1/norm2"} <= owners
  assert "cls_token" not in owners
  assert params["patch_embed/kernel"].shape == (7, 7, 1, 16)
  assert params["pos_embed"].shape == (1, 16, 16)  # 4x4 patches of 7x7
  cls = param_shapes(vit.ViT(dataclasses.replace(TINY, pooling="cls")))
  assert cls["cls_token"].shape == (1, 1, 16) and cls["pos_embed"].shape == (1, 17, 16)


def test_default_config_size():
  assert sum(x.size for x in param_shapes(vit.vit_tiny()).values()) == 539_914


def test_dropout_is_off_by_default_and_active_when_asked():
  model = vit.ViT(SHALLOW)
  dropped = vit.ViT(dataclasses.replace(SHALLOW, dropout_rate=0.5))

  @jax.jit  # one compilation for the four forward passes
  def outputs(x):
    variables = model.init(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(1)}
    return (model.apply(variables, x, train=True), model.apply(variables, x),
            dropped.apply(variables, x, train=True, rngs=rngs), dropped.apply(variables, x))

  train, test, dropped_train, dropped_test = outputs(images())
  np.testing.assert_array_equal(train, test)
  np.testing.assert_array_equal(dropped_test, test)
  assert not np.allclose(dropped_train, dropped_test)


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=5), "patch_size 5 does not divide image_size 28"),
    (dict(hidden_dim=30, num_heads=4), "num_heads 4 does not divide hidden_dim 30"),
    (dict(pooling="max"), "got 'max'"),
    (dict(depth=0), "depth must be >= 1, got 0"),
])
def test_bad_config_is_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    vit.ViTConfig(**kwargs)


def test_wrong_image_size_is_rejected_with_the_shape():
  with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 1\)"):
    vit.ViT(TINY).init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))


def test_a_few_adam_steps_reduce_the_loss_on_a_tiny_batch():
  model = vit.ViT(SHALLOW)
  x, y = images(8), jnp.arange(8) % 10
  params = init(model, x)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(5):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3, losses
