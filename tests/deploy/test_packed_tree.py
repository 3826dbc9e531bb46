"""Format version 4: any packed model saved by module path and run by its own code."""

import os

from flax import nnx
import jax
import numpy as np
import pytest

import shiftjax as sj
from shiftjax.deploy import packed_layers
from shiftjax.deploy.spec_json import PackedModelError
from shiftjax.deploy.packed_tree import PackedTree
from shiftjax.policy import LayerPolicy
from tiny_models import IMAGES, TOKENS, LinenTinyViT, NnxMLP, NnxTinyTransformer

POLICY = LayerPolicy(sj.DenseShift(3), activation=sj.PACT(4),
                     layer_quantizers=(("out", sj.S3(3)),))
VIT_POLICY = LayerPolicy(sj.DenseShift(3), activation=sj.PACT(4),
                         layer_quantizers=(("mix", sj.S3(3)), ("head", sj.DenseShift(5))))


@pytest.fixture(scope="module")
def nnx_file(tmp_path_factory):
  model = sj.quantize_model(NnxTinyTransformer(nnx.Rngs(0)), POLICY)
  packed = sj.deploy.pack_model(model)
  path = str(tmp_path_factory.mktemp("v4") / "lm.shiftjax")
  packed_layers.save_model(path, packed, metadata={"corpus": "test"})
  return path, packed


def test_nnx_model_round_trips_through_its_file_exactly(nnx_file):
  path, packed = nnx_file
  loaded = packed_layers.load_model(path, NnxTinyTransformer(nnx.Rngs(7)))  # other values
  np.testing.assert_array_equal(loaded(TOKENS), packed(TOKENS))
  tree = sj.deploy.load(path)
  assert isinstance(tree, PackedTree) and tree.framework == "nnx"
  assert tree.model.endswith("NnxTinyTransformer") and tree.metadata == {"corpus": "test"}
  assert sorted(tree.layers) == ["conv", "head", "out", "qkv"]
  # Exactly N bits per weight: the 3-bit head's 8 x 11 codes in 3 planes of 3 words.
  assert tree.arrays["codes/head"].shape == (3, 3)
  assert "variables/embed/embedding" in tree.arrays


def test_linen_model_round_trips_through_its_file_exactly(tmp_path):
  model = sj.quantize_model(LinenTinyViT(), VIT_POLICY)
  variables = model.init(jax.random.key(0), IMAGES)
  packed, packed_variables = sj.deploy.pack_model(model, variables, IMAGES)
  path = packed_layers.save_model(tmp_path / "vit.shiftjax", packed, packed_variables)
  loaded, loaded_variables = packed_layers.load_model(path, LinenTinyViT())
  np.testing.assert_array_equal(loaded.apply(loaded_variables, IMAGES),
                                model.apply(variables, IMAGES))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    packed_layers.save_model(path, packed, packed_variables)


def test_damaged_files_are_refused_by_byte_offset(nnx_file, tmp_path):
  path, _ = nnx_file
  data = open(path, "rb").read()
  cut = tmp_path / "cut.shiftjax"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(PackedModelError, match=f"truncated at byte {len(data) // 2}"):
    sj.deploy.load(cut)
  for offset, message in ((30, "header corrupted"), (len(data) - 100, "corrupted")):
    bad = bytearray(data)
    bad[offset] ^= 0xFF
    (tmp_path / "bad.shiftjax").write_bytes(bytes(bad))
    with pytest.raises(PackedModelError, match=message):
      sj.deploy.load(tmp_path / "bad.shiftjax")


def test_a_file_is_refused_by_another_model(nnx_file):
  path, _ = nnx_file
  with pytest.raises(ValueError, match="holds a .*NnxTinyTransformer, got a .*NnxMLP"):
    packed_layers.load_model(path, NnxMLP(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="holds a nnx model, got a linen one"):
    packed_layers.load_model(path, LinenTinyViT())
  with pytest.raises(ValueError, match=r"layer 'conv' has kernel shape \[3, 8, 8\] in the "
                     r"file, \[3, 16, 16\] in the model"):
    packed_layers.load_model(path, NnxTinyTransformer(nnx.Rngs(0), d=16))


def test_old_resnet_files_still_load_as_packed_models():
  data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
  for name in sorted(os.listdir(data)):
    if name.endswith(".shiftjax"):
      assert isinstance(sj.deploy.load(os.path.join(data, name)), sj.deploy.PackedModel)


def test_jax_export_artifact_runs_without_the_models_code(nnx_file, tmp_path):
  _, packed = nnx_file
  path = packed_layers.save_artifact(
      tmp_path / "lm.jax", packed,
      jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 4"), np.int32))
  exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
  np.testing.assert_allclose(exported.call(TOKENS), packed(TOKENS), rtol=1e-5, atol=1e-4)
  assert exported.call(TOKENS[:1]).shape == (1, 4, 11)  # a symbolic batch
