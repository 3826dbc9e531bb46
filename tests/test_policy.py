"""Per-layer specs (``shiftjax.policy``): mixed weight widths and activation quantizers,
in the flax models and their packed files, and the errors of bad rules."""

import jax
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import activations as act_lib
from shiftjax import export as ex
from shiftjax import models
from shiftjax import train
from shiftjax import interception
from shiftjax.policy import LayerPolicy, PolicyError, parse_rules, spec_of

DS2, DS3, DS4 = (sj.DenseShift(bits=b) for b in (2, 3, 4))
MIXED = (("stage1_*/*", DS4), ("stage3_*/*", DS2))


def test_weight_spec_of_each_layer():
  policy = LayerPolicy(DS3, ("stem", "head"), MIXED)
  assert policy.quantizer_for("stage1_block0/conv1") == DS4
  assert policy.quantizer_for(("stage2_block0", "shortcut")) == DS3
  assert policy.quantizer_for("stage3_block0/conv2") == DS2
  assert policy.quantizer_for("stem") is None and policy.quantizer_for("head") is None
  assert policy.is_mixed and not LayerPolicy(DS3).is_mixed
  # A rule may also quantize a layer of a float model, or keep one float.
  only_stage1 = LayerPolicy(None, (), (("stage1_*/*", DS4), ("stage2_*/*", None)))
  assert only_stage1.quantizer_for("stage1_block0/conv2") == DS4
  assert only_stage1.quantizer_for("stage2_block0/conv2") is None
  assert only_stage1.quantizer_for("stage3_block0/conv2") is None
  # Two rules agreeing on a layer are fine.
  assert LayerPolicy(DS3, (), (("stage1_*", DS4), ("*/conv1", DS4))).quantizer_for(
      "stage1_block0/conv1") == DS4


def test_activation_spec_of_each_layer():
  pact4, pact8 = act_lib.PACT(4), act_lib.PACT(8, signed=True)
  policy = LayerPolicy(DS3, ("stem", "head"), (), pact4, (("stem", pact8),
                                                          ("stage3_*/*", None)))
  assert policy.activation_for("stem") == pact8          # a rule: the images too
  assert policy.activation_for("stage1_block0/conv1") == pact4  # quantized layer: default
  assert policy.activation_for("stage3_block0/conv1") is None   # a rule keeps it float
  assert policy.activation_for("head") is None           # float weights, no rule


@pytest.mark.parametrize("rules, message", [
    ((("stage1_*/*", DS4), ("*/conv1", DS2)),
     "layer 'stage1_block0/conv1' gets two weight specs: pattern 'stage1_*/*' gives "
     "DenseShift(bits=4"),
    ((("head", DS4),), "layer 'head' gets two weight specs: pattern 'head' gives float "
                       "and pattern 'head' gives DenseShift(bits=4"),
])
def test_two_specs_for_one_layer_is_an_error_naming_both_patterns(rules, message):
  policy = LayerPolicy(DS3, ("stem", "head"), rules)
  layer = "head" if rules[0][0] == "head" else "stage1_block0/conv1"
  with pytest.raises(PolicyError) as info:
    policy.quantizer_for(layer)
  assert message in str(info.value)
  assert "*/conv1" in str(info.value) or rules[0][0] == "head"


def test_rule_matching_no_layer_is_an_error_naming_it():
  model = models.resnet8(width_multiplier=0.5, quantizer=DS3)
  with interception.record_calls() as record:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
  names = list(record.layers)
  LayerPolicy(DS3, ("stem", "head"), MIXED).check_patterns(names)
  for field, policy in (
      ("layer_quantizers", LayerPolicy(DS3, ("stem",), (("stage4_*/*", DS2),))),
      ("layer_activations", LayerPolicy(DS3, ("stem",), (), None,
                                        (("classifier", act_lib.PACT(8)),))),
      ("full_precision", LayerPolicy(DS3, ("stem", "fc")))):
    with pytest.raises(PolicyError, match=f"{field} pattern '.*' matches no layer of the "
                                          "model \\(layers: stem, stage1_block0/conv1"):
      policy.check_patterns(names)


def test_malformed_policies_are_refused():
  with pytest.raises(PolicyError, match="layer_quantizers must be a tuple of"):
    LayerPolicy(DS3, ("stem",), ("stage1_*/*", DS4))
  with pytest.raises(PolicyError, match="'stage1_\\*/\\*': 4 is not a weight quantizer"):
    LayerPolicy(DS3, ("stem",), (("stage1_*/*", 4),))
  with pytest.raises(PolicyError, match="entry 'stage1' is not 'pattern=value'"):
    parse_rules("config.layer_quantizers", "stage1, head=8")
  assert parse_rules("f", " stage1_*/*=4 ,head=DenseShift:8,, ") == [
      ("stage1_*/*", "4"), ("head", "DenseShift:8")]
  assert spec_of({"a": DS2}, "a") == DS2 and spec_of(DS3, "anything") == DS3
  with pytest.raises(KeyError, match="no spec for layer 'b'"):
    spec_of({"a": DS2}, "b")


def test_mixed_width_model_has_each_layers_latents_and_packs_each_at_its_width(tmp_path):
  model = models.resnet8(width_multiplier=0.5, policy=sj.LayerPolicy(
      DS3, ("stem", "head"), layer_quantizers=(("stage1_*/*", DS4), ("stage3_*/*", sj.S3(bits=2))),
      activation=act_lib.PACT(4), layer_activations=(("stem", act_lib.PACT(8, signed=True)),)))
  images = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  params = variables["params"]
  # DenseShift's chain: 2**(bits-1) - 1 exponent latents; S3 2-bit: sign and sparse only.
  assert params["stage1_block0"]["conv1"]["kernel"]["exponent"].shape[0] == 7
  assert params["stage2_block0"]["conv1"]["kernel"]["exponent"].shape[0] == 3
  assert set(params["stage3_block0"]["conv1"]["kernel"]) == {"sign", "sparse"}
  assert float(params["stem"]["activation"]["clip"]) == 6.0
  assert "activation" not in params["head"]
  packed = ex.export(variables, model)
  for path, entry in packed.quantized_layers.items():
    bits = {"stage1": 4, "stage2": 3, "stage3": 2}[path[:6]]
    assert entry.weight_spec.bits == bits
    assert packed.arrays[f"codes/{path}"].shape == (np.prod(entry.kernel_shape) // 32, bits)
  assert packed.layers["stem"].input_spec == act_lib.PACT(8, signed=True)
  sizes = {p: int(np.prod(e.kernel_shape)) for p, e in packed.quantized_layers.items()}
  exact = sum(packed.layers[p].weight_spec.bits * n for p, n in sizes.items()) / sum(
      sizes.values())
  assert packed.size_report()["bits_per_quantized_weight"] == exact
  packed_model, packed_variables = ex.load(packed)
  got = np.asarray(packed_model.apply(packed_variables, images, train=False))
  np.testing.assert_allclose(got, np.asarray(model.apply(variables, images, train=False)),
                             rtol=0, atol=1e-4)
  reloaded = sj.deploy.load(packed.save(tmp_path / "mixed.shiftjax"))
  assert reloaded.layers == packed.layers
  assert ex.flax_module(reloaded) == model
  packed_model, packed_variables = ex.load(reloaded)
  np.testing.assert_array_equal(
      np.asarray(packed_model.apply(packed_variables, images, train=False)), got)


def test_config_rules_become_the_models_policy():
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model, c.dataset, c.width_multiplier = "resnet8", "fashion_mnist", 0.5
  c.layer_quantizers = "stage1_*/*=4, stage3_*/*=S3:3"
  c.activation_bits = 4
  c.layer_activations = "stem=8:signed,head=8"
  policy = train.create_policy(c)
  assert policy.layer_quantizers == (("stage1_*/*", DS4), ("stage3_*/*", sj.S3(bits=3)))
  assert policy.activation == act_lib.PACT(4, init_clip=6.0)
  assert policy.layer_activations == (("stem", act_lib.PACT(8, signed=True)),
                                      ("head", act_lib.PACT(8)))
  plan = train.layer_plan(c)
  specs = train.layer_quantizers(plan)
  assert specs["stage1_block0/conv1"] == DS4 and specs["stage2_block0/conv2"] == DS3
  assert specs["stage3_block0/shortcut"] == sj.S3(bits=3) and "head" not in specs
  c.activation_quantizer, c.activation_bits, c.activation_integer_bits = "FixedPoint", 8, 3
  c.layer_activations = ""
  assert train.create_policy(c).activation == act_lib.FixedPoint(3, 5)
