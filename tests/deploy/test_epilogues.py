"""deploy.fuse_conv_epilogues: a packed ResNet's residual adds and relus run inside the
native convs before them, with identical results; what else reads a conv's output
keeps it unfused."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import kernels
from shiftjax import models
from shiftjax.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="fuses the native CPU conv (g++, CPU backend)")


def _fused_convs(fn, *args):
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return (jaxpr.count("shiftjax_fused_conv"), jaxpr.count("('relu', True)"),
          jaxpr.count("custom_jvp_call"))


def test_a_packed_resnet_runs_its_adds_and_relus_in_the_convs():
  model = models.resnet8(num_classes=10, quantizer=sj.DenseShift(bits=3))
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  variables = jax.device_get(jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), x))
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda a: np.asarray(rng.uniform(0.5, 2.0, a.shape), np.float32),
      variables["batch_stats"])
  packed, packed_variables = ex.load(ex.export(variables, model))
  apply = lambda x: packed.apply(packed_variables, x, train=False)
  fused = deploy.fuse_conv_epilogues(apply)
  # 8 quantized convs (2 shortcuts among them), each with its folded BatchNorm; the 6 of
  # the blocks' bodies take their relu (and the second of each block its residual add),
  # the shortcuts feed an add that another conv takes. The stem is float and unfused.
  assert _fused_convs(apply, x) == (8, 0, 7)
  assert _fused_convs(fused, x) == (8, 6, 1)
  # The native call's epilogue in registers against XLA's passes: float rounding apart
  # (the made-up statistics make logits of 1e6, 1.4e-5 of them seen), the same top-1.
  got, unfused = np.asarray(jax.jit(fused)(x)), np.asarray(jax.jit(apply)(x))
  expected = np.asarray(model.apply(variables, x, train=False))
  for other in (unfused, expected):
    assert np.max(np.abs(got - other)) <= 1e-4 * np.max(np.abs(other))
    np.testing.assert_array_equal(got.argmax(-1), other.argmax(-1))


def test_a_conv_output_read_twice_is_not_fused():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  scale, bias = jnp.full((16,), 0.5), jnp.ones((16,))

  def block(x, r):
    y = kernels.fused_conv(x, w, scale=scale, bias=bias)
    z = kernels.fused_conv(x, w, scale=scale, bias=bias)
    return jax.nn.relu(y + r), jax.nn.relu(z), z  # z is read twice: left alone
  fused = deploy.fuse_conv_epilogues(block)
  assert _fused_convs(fused, x, x) == (2, 1, 1)
  for a, b in zip(jax.jit(fused)(x, x), jax.jit(block)(x, x)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Inside a nested jit too.
  nested = deploy.fuse_conv_epilogues(lambda x, r: jax.jit(block)(x, r))
  assert _fused_convs(nested, x, x) == (2, 1, 1)


class NnxConvNet(nnx.Module):
  """conv -> BatchNorm -> relu, twice, then a mean and a dense head."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 16, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean((1, 2)))


def test_an_nnx_models_folded_convs_run_fused_too():
  model = sj.quantize_model(NnxConvNet(nnx.Rngs(0)), sj.LayerPolicy(sj.DenseShift(3),
                                                                    ("head",)))
  rng = np.random.default_rng(0)
  for norm in (model.bn1, model.bn2):
    norm.mean[...] = rng.standard_normal(16).astype(np.float32)
    norm.var[...] = rng.uniform(0.5, 2.0, 16).astype(np.float32)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  expected = np.asarray(model(x))
  packed = sj.deploy.pack_model(model, example_inputs=(x,))
  graphdef, state = nnx.split(packed)
  apply = lambda state, x: nnx.merge(graphdef, state)(x)
  fused = deploy.fuse_conv_epilogues(apply)
  assert _fused_convs(apply, state, x) == (2, 0, 2)  # scale and bias in the native conv
  assert _fused_convs(fused, state, x) == (2, 2, 0)  # and the relu
  got = np.asarray(jax.jit(fused)(state, x))
  assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
