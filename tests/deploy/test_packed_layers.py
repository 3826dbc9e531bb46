"""pack_model: any quantized model runs packed through its own code."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shiftjax as sj
from shiftjax.deploy import packed_layers
from shiftjax.kernels.cpu import layout
from shiftjax.kernels.cpu import native
from shiftjax.policy import LayerPolicy
from tiny_models import (IMAGES, TOKENS, X, LinenMLP, LinenTinyViT, NnxMLP,
                               NnxTinyTransformer)

DS3 = sj.DenseShift(3)
MIXED = LayerPolicy(DS3, full_precision=("head",), activation=sj.PACT(4),
                    layer_quantizers=(("mix", sj.S3(3)), ("patch_embed", sj.DenseShift(5))))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_kernel_words_round_trip_every_width(bits):
  spec = sj.DenseShift(bits, e0=-3)
  latents = spec.init(jax.random.key(bits), (3, 3, 7, 5), )
  latents = jax.tree.map(lambda a: a * 1e3, latents)
  words = packed_layers.kernel_words(spec.codes(latents), bits)
  assert words.dtype == jnp.uint32 and words.shape == (-(-63 // (32 // bits)), 5)
  np.testing.assert_array_equal(packed_layers.decode_words(words, spec, (3, 3, 7, 5)),
                                spec.weight(latents))


def test_linen_model_packed_gives_the_trained_models_outputs():
  model = sj.quantize_model(LinenTinyViT(), MIXED)
  variables = model.init(jax.random.key(0), IMAGES)
  packed, packed_variables = sj.deploy.pack_model(model, variables, IMAGES)
  codes = packed_variables[packed_layers.CODES_COLLECTION]
  assert set(codes) == {"attention", "mix", "patch_embed"}
  assert "kernel" not in packed_variables["params"]["mix"]  # no latents left
  assert codes["patch_embed"]["kernel"].shape == (2, 8)  # 12 rows of 5-bit codes, 6 a word
  # Convs, DenseGeneral and Einsum decode their words and run flax's own forward: exact.
  np.testing.assert_array_equal(packed.apply(packed_variables, IMAGES),
                                model.apply(variables, IMAGES))
  assert "kernel" in variables["params"]["mix"]  # the trained variables are untouched


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_dense_layers_multiply_on_the_kernels(framework, monkeypatch):
  calls = []
  real = sj.kernels.pow2_matmul
  monkeypatch.setattr(packed_layers.kernels, "pow2_matmul",
                      lambda *a, **k: calls.append(k["bits"]) or real(*a, **k))
  policy = LayerPolicy(DS3, activation=sj.PACT(4))
  if framework == "linen":
    model = sj.quantize_model(LinenMLP(), policy)
    variables = model.init(jax.random.key(0), X)
    packed, packed_variables = sj.deploy.pack_model(model, variables, X)
    expected, got = model.apply(variables, X), packed.apply(packed_variables, X)
  else:
    model = sj.quantize_model(NnxMLP(nnx.Rngs(0)), policy)
    packed = sj.deploy.pack_model(model)
    expected, got = model(X), packed(X)
    assert isinstance(packed.fc1.kernel, packed_layers.PackedKernel)
    assert not isinstance(packed.fc1.kernel, nnx.Param)  # nothing left to train
  assert calls == [3, 3]
  # The kernels sum in their own order: float32 rounding apart, the same outputs.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_nnx_transformer_packed_under_jit():
  model = sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)), LayerPolicy(
      DS3, layer_quantizers=(("out", sj.S3(3)),)))
  packed = sj.deploy.pack_model(model)
  expected = model(TOKENS)
  got = jax.jit(lambda m, t: m(t))(packed, TOKENS)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(expected, -1))


def test_bad_calls_are_refused():
  with pytest.raises(ValueError, match="no quantized layer to pack"):
    sj.deploy.pack_model(NnxMLP(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="needs its variables and example inputs"):
    sj.deploy.pack_model(sj.quantize_model(LinenMLP(), LayerPolicy(DS3)))
  with pytest.raises(ValueError, match="takes the quantized model"):
    sj.deploy.pack_model(LinenMLP(), {"params": {}}, X)


@pytest.mark.skipif(not native.available(), reason="the tiled layout is the native kernel's")
def test_dense_words_are_tiled_once_for_the_native_kernel(tmp_path):
  # pack_model and load_model convert a kernel-run Dense layer's words to the native
  # CPU kernel's tiled layout once; the file keeps bit planes, decoding is unchanged.
  model = sj.quantize_model(NnxMLP(nnx.Rngs(0)), LayerPolicy(DS3))
  packed = sj.deploy.pack_model(model)
  value = packed.fc1.kernel.get_value()
  assert isinstance(value, sj.kernels.TiledWords) and value.n == 16
  words = packed_layers.kernel_words(DS3.codes(model.fc1.kernel.get_value()), 3)
  np.testing.assert_array_equal(layout.untile(value), words)
  np.testing.assert_array_equal(packed.fc1.kernel[...], model.fc1.kernel[...])
  path = packed_layers.save_model(tmp_path / "mlp.shiftjax", packed)
  loaded = packed_layers.load_model(path, NnxMLP(nnx.Rngs(1)))
  assert isinstance(loaded.head.kernel.get_value(), sj.kernels.TiledWords)
  np.testing.assert_array_equal(loaded(X), packed(X))
  run = jax.jit(lambda m, x: m(x))  # TiledWords in an NNX state, through jit
  np.testing.assert_array_equal(run(loaded, X), run(packed, X))
  with native.disabled():  # no native kernel: the words as they are
    plain = sj.deploy.pack_model(model)
    assert not isinstance(plain.fc1.kernel.get_value(), sj.kernels.TiledWords)
    np.testing.assert_allclose(loaded(X), plain(X), rtol=1e-5, atol=1e-5)
