"""Layers and models: the layer policy, shift convs vs plain convs, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import layers, models, train


def param_shapes(model, image_shape):
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return variables["params"]


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Standard counts: He et al. 2016 (ResNet-20 with 1x1 projection shortcuts) and
# torchvision's resnet18 / resnet50.
@pytest.mark.parametrize("name, image_shape, expected", [
    ("resnet20", (32, 32, 3), 272_474),
    ("resnet18", (224, 224, 3), 11_689_512),
    ("resnet50", (224, 224, 3), 25_557_032),
])
def test_float_parameter_counts_match_the_standard_models(name, image_shape, expected):
  num_classes = 10 if name == "resnet20" else 1000
  assert count(param_shapes(models.get(name, num_classes=num_classes), image_shape)) == expected


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_depths_and_default_policy(depth):
  params = param_shapes(models.get(f"resnet{depth}", quantizer=sj.DenseShift(3)), (32, 32, 3))
  quantized = train.quantized_kernels(params)
  n = (depth - 2) // 6
  # Every conv of every block is quantized, plus the two 1x1 projection shortcuts.
  assert len(quantized) == 3 * n * 2 + 2
  assert "stage2_block0/shortcut" in quantized and "stage3_block0/shortcut" in quantized
  assert not layers.is_latent_kernel(params["stem"]["kernel"])
  assert not layers.is_latent_kernel(params["head"]["kernel"])


def test_policy_patterns_keep_matching_layers_float():
  model = models.resnet20(policy=sj.LayerPolicy(sj.S3(3), ("stem", "head", "stage3_*")))
  quantized = train.quantized_kernels(param_shapes(model, (32, 32, 3)))
  assert len(quantized) == 13 and not any(k.startswith("stage3") for k in quantized)
  everything = models.resnet20(policy=sj.LayerPolicy(sj.S3(3)))
  assert len(train.quantized_kernels(param_shapes(everything, (32, 32, 3)))) == 22
  with pytest.raises(ValueError, match="tuple of patterns"):
    layers.LayerPolicy(sj.S3(3), full_precision="stem")


def test_width_multiplier_and_bad_depth():
  params = param_shapes(models.resnet8(width_multiplier=2.0), (28, 28, 1))
  assert params["stem"]["kernel"].shape == (3, 3, 1, 32)
  assert params["head"]["kernel"].shape == (128, 10)
  with pytest.raises(ValueError, match="6n\\+2.*got 21"):
    models.CifarResNet(depth=21)
  with pytest.raises(ValueError, match="unknown model 'resnet19'"):
    models.get("resnet19")


@pytest.mark.parametrize("quantizer", [None, sj.DenseShift(3), sj.S3(2), sj.DeepShiftQ(5)],
                         ids=repr)
@pytest.mark.parametrize("strides, kernel_size", [((1, 1), (3, 3)), ((2, 2), (1, 1))])
def test_shift_conv_is_a_conv_with_the_quantized_kernel(quantizer, strides, kernel_size):
  conv = layers.ShiftConv(8, kernel_size, strides, quantizer=quantizer)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
  variables = conv.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  weight = quantizer.weight(kernel) if quantizer else kernel
  if quantizer:
    assert set(np.unique(np.asarray(weight))) <= set(quantizer.values().tolist())
  expected = jax.lax.conv_general_dilated(x, weight, strides, "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-6, atol=1e-6)


def test_shift_dense():
  dense = layers.ShiftDense(3, quantizer=sj.DenseShift(2))
  x = jax.random.normal(jax.random.key(1), (4, 6))
  variables = dense.init(jax.random.key(0), x)
  w = sj.DenseShift(2).weight(variables["params"]["kernel"])
  np.testing.assert_allclose(dense.apply(variables, x), x @ w + variables["params"]["bias"],
                             rtol=1e-6)


def test_shift_resnet_trains_its_latents():
  model = models.resnet8(quantizer=sj.DenseShift(3), width_multiplier=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2)

  grads = jax.grad(loss)(variables["params"])
  latent_grads = train.quantized_kernels(grads)["stage1_block0/conv1"]
  assert float(jnp.abs(latent_grads["sign"]).sum()) > 0
  assert float(jnp.abs(latent_grads["exponent"]).sum()) > 0
