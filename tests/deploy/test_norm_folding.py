"""BatchNorm folding into packed layers of any linen model (deploy.norm_folding)."""

import warnings

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import models
from shiftjax.deploy import norm_folding
from shiftjax.deploy import packed_layers
from shiftjax.deploy import packed_tree
from shiftjax.policy import LayerPolicy

X = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))


def trained_like(variables, seed=0):
  """``variables`` with BatchNorm statistics and affine parameters far from their init,
  so that folding is not the identity."""
  rng = np.random.default_rng(seed)
  out = dict(variables)
  out["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), variables["batch_stats"])
  out["params"] = jax.tree_util.tree_map_with_path(
      lambda p, a: (a + 0.3 * rng.standard_normal(a.shape).astype(np.float32))
      if "bn" in jax.tree_util.keystr(p) else a, variables["params"])
  return out


def pack(model, *args, **kwargs):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    packed = sj.deploy.pack_model(model, *args, **kwargs)
  return packed, [str(w.message) for w in caught]


def test_the_affine_map_is_the_batch_norm_written_out():
  bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
  y = jax.random.normal(jax.random.key(0), (5, 6))
  variables = trained_like({"params": {"bn": bn.init(jax.random.key(1), y)["params"]},
                            "batch_stats": {"bn": bn.init(jax.random.key(1), y)["batch_stats"]}})
  s, t = norm_folding.affine(variables, norm_folding.Fold("conv", "bn", 1e-3))
  p, stats = variables["params"]["bn"], variables["batch_stats"]["bn"]
  np.testing.assert_allclose(s, p["scale"] / np.sqrt(stats["var"] + 1e-3), rtol=1e-6)
  np.testing.assert_allclose(t, p["bias"] - stats["mean"] * s, rtol=1e-6)
  expected = bn.apply({"params": p, "batch_stats": stats}, y)
  np.testing.assert_allclose(y * s + t, expected, rtol=1e-5, atol=1e-6)


def test_a_resnet_folds_every_batch_norm_after_a_quantized_conv(tmp_path):
  model = models.resnet8(quantizer=sj.DenseShift(3), width_multiplier=0.5)
  variables = trained_like(model.init(jax.random.key(0), X))
  expected = model.apply(variables, X)
  (packed, packed_variables), messages = pack(model, variables, X, train=False)
  assert messages == []  # the stem's BatchNorm follows a float conv: nothing to say
  folded = {p: e.folded_norm for p, e in type(packed).packed_layers}
  assert folded == {f"{block}/{conv}": f"{block}/{norm}"
                    for block, pairs in [
                        ("stage1_block0", [("conv1", "bn1"), ("conv2", "bn2")]),
                        ("stage2_block0", [("conv1", "bn1"), ("conv2", "bn2"),
                                           ("shortcut", "shortcut_bn")]),
                        ("stage3_block0", [("conv1", "bn1"), ("conv2", "bn2"),
                                           ("shortcut", "shortcut_bn")])]
                    for conv, norm in pairs}
  # The folded norms' variables are gone; the stem's stays.
  assert set(packed_variables["params"]["stage2_block0"]) == {"conv1", "conv2", "shortcut"}
  assert packed_variables["batch_stats"]["stage2_block0"] == {}
  assert set(packed_variables["batch_stats"]["stem_bn"]) == {"mean", "var"}
  got = packed.apply(packed_variables, X, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))
  # Unfolded, the packed model computes exactly what the trained one does.
  plain, plain_variables = sj.deploy.pack_model(model, variables, X, fold_batch_norm=False,
                                                train=False)
  np.testing.assert_array_equal(plain.apply(plain_variables, X, train=False), expected)
  # The file keeps the folds: the loaded model gives the packed model's logits.
  path = packed_layers.save_model(tmp_path / "resnet.shiftjax", packed, packed_variables)
  loaded, loaded_variables = packed_layers.load_model(path, models.resnet8(
      width_multiplier=0.5))
  np.testing.assert_array_equal(loaded.apply(loaded_variables, X, train=False), got)


class SharedOutput(nn.Module):
  """conv's output feeds its BatchNorm and the residual sum (cannot fold); fc's feeds
  only its BatchNorm (folds); head's BatchNorm normalizes in training mode (cannot)."""

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(8, (3, 3), name="conv")(x)
    z = nn.relu(nn.BatchNorm(use_running_average=True, name="conv_bn")(y)) + y
    z = nn.Dense(16, name="fc")(jnp.mean(z, axis=(1, 2)))
    z = nn.relu(nn.BatchNorm(use_running_average=True, name="fc_bn")(z))
    z = nn.Dense(4, name="head")(z)
    return nn.BatchNorm(use_running_average=False, name="head_bn")(z)


def test_a_pattern_that_cannot_fold_stays_and_is_named():
  model = sj.quantize_model(SharedOutput(), LayerPolicy(sj.DenseShift(3)))
  variables = trained_like(model.init(jax.random.key(0), X))
  (packed, packed_variables), messages = pack(model, variables, X, mutable=["batch_stats"])
  assert {p: e.folded_norm for p, e in type(packed).packed_layers} == {
      "conv": None, "fc": "fc_bn", "head": None}
  assert len(messages) == 2
  assert "'conv_bn' after layer 'conv' stays unfolded: the layer's output is also used" in (
      messages[0] + messages[1])
  assert "'head_bn' after layer 'head' stays unfolded: it normalizes with batch " in (
      messages[0] + messages[1])
  assert "conv_bn" in packed_variables["params"] and "fc_bn" not in packed_variables["params"]
  # head_bn uses the batch's statistics: compare without updating the running ones.
  expected, _ = model.apply(variables, X, mutable=["batch_stats"])
  got, _ = packed.apply(packed_variables, X, mutable=["batch_stats"])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))


def test_a_layer_entry_keeps_its_folded_norm_and_refuses_a_bad_one():
  entry = packed_tree.LayerEntry("Conv", sj.DenseShift(3), (3, 3, 4, 8), None, "block/bn")
  assert packed_tree._entry_from_json("block/conv", entry.to_json()) == entry  # pylint: disable=protected-access
  unfolded = packed_tree.LayerEntry("Conv", sj.DenseShift(3), (3, 3, 4, 8))
  assert "folded_norm" not in unfolded.to_json()  # files without folds read as before
  with pytest.raises(sj.deploy.PackedModelError, match="folded_norm must be a module path"):
    packed_tree._entry_from_json("block/conv", dict(entry.to_json(), folded_norm=3))  # pylint: disable=protected-access


class NnxSharedOutput(nnx.Module):
  """SharedOutput in NNX: conv_bn cannot fold (conv's output is used twice), fc_bn can."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv_bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 16, rngs=rngs)
    self.fc_bn = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    y = self.conv(x)
    z = nnx.relu(self.conv_bn(y)) + y
    z = nnx.relu(self.fc_bn(self.fc(jnp.mean(z, axis=(1, 2)))))
    return self.head(z)


def test_an_nnx_model_folds_what_it_can_and_its_file_keeps_the_folds(tmp_path):
  model = sj.quantize_model(NnxSharedOutput(nnx.Rngs(0)), LayerPolicy(sj.DenseShift(3)))
  rng = np.random.default_rng(0)
  for norm in (model.conv_bn, model.fc_bn):
    norm.mean[...] = rng.standard_normal(norm.mean.shape).astype(np.float32)
    norm.var[...] = rng.uniform(0.5, 2.0, norm.var.shape).astype(np.float32)
    norm.scale[...] = rng.uniform(0.5, 2.0, norm.scale.shape).astype(np.float32)
  model.eval()
  expected = model(X)
  packed, messages = pack(model, example_inputs=(X,))
  assert messages == ["BatchNorm 'conv_bn' after layer 'conv' stays unfolded: the layer's "
                      "output is also used elsewhere"]
  assert packed.fc.folded_norm == "fc_bn" and not hasattr(packed.conv, "folded_norm")
  assert not hasattr(packed.fc_bn, "mean") and hasattr(packed.conv_bn, "mean")
  got = packed(X)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))
  assert hasattr(model.fc_bn, "mean")  # the trained model is untouched
  # Without example inputs nothing is traced, so nothing folds.
  assert not hasattr(sj.deploy.pack_model(model).fc, "folded_norm")
  path = packed_layers.save_model(tmp_path / "nnx.shiftjax", packed)
  fresh = NnxSharedOutput(nnx.Rngs(7))
  fresh.eval()
  np.testing.assert_array_equal(packed_layers.load_model(path, fresh)(X), got)
