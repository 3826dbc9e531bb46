"""Float -> shift initialization: exact powers of two, exact BatchNorm compensation, and a
converted Fashion-MNIST model that classifies before any shift training."""

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

import shiftjax as sj
from experiments.configs import default
from shiftjax import codes as codes_lib
from shiftjax import data as data_lib
from shiftjax import models
from shiftjax import train
from shiftjax import transfer

# rbg, as shiftjax.train: threefry makes XLA:CPU compile model inits 5-10x slower.
KEY = functools.partial(jax.random.key, impl="rbg")
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
QUANTIZERS = [
    sj.DenseShift(2), sj.DenseShift(3), sj.DenseShift(4), sj.DenseShift(3, encoding="binary"),
    sj.DenseShift(3, e0=-4), sj.S3(2), sj.S3(3), sj.S3(4), sj.DeepShiftQ(5), sj.DeepShiftPS(5),
]
IDS = [f"{q.name}{q.bits}{'_' + q.encoding if isinstance(q, sj.DenseShift) else ''}"
       f"{'_e0' + str(q.e0) if q.e0 else ''}" for q in QUANTIZERS]


def float_kernel(shape=(3, 3, 8, 16), seed=0):
  rng = np.random.default_rng(seed)
  # Channels of very different scales, a few exact zeros and exact powers of two.
  w = rng.normal(0, 1, shape) * np.exp2(rng.integers(-8, 0, shape[-1]))
  w.reshape(-1)[:5] = 0.0
  w.reshape(-1)[5:9] = [0.25, -0.5, 2.0 ** -7, 1.5 * 2.0 ** -6]
  return w.astype(np.float32)


def as_jnp(tree):
  return jax.tree.map(jnp.asarray, tree)


def at(tree, path):
  for name in path:
    tree = tree[name]
  return tree


# ------------------------------------------------------------------------ one kernel


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=IDS)
@pytest.mark.parametrize("granularity", ["channel", "layer", "none"])
def test_latents_give_the_nearest_powers_of_two(quantizer, granularity):
  w = float_kernel()
  k = transfer.choose_scale_exponents(w, quantizer, granularity=granularity)
  assert k.shape == ((w.shape[-1],) if granularity == "channel" else ())
  latents = transfer.shift_latents_from_float(w, quantizer, scale_exponent=k, margin=0.01)
  reference = quantizer.init(KEY(0), w.shape)
  assert {n: (v.shape, v.dtype) for n, v in latents.items()} == {
      n: (v.shape, v.dtype) for n, v in reference.items()}

  weight = np.asarray(quantizer.weight(as_jnp(latents)))
  target = transfer.target_weights(w, quantizer, scale_exponent=k)
  np.testing.assert_array_equal(weight.view(np.uint32), target.view(np.uint32))
  decoded = codes_lib.decode(quantizer.codes(as_jnp(latents)), quantizer.code_format)
  np.testing.assert_array_equal(np.asarray(decoded), weight)

  x = w.astype(np.float64) * np.exp2(-k.astype(np.float64))
  values = quantizer.values().astype(np.float64)
  if isinstance(quantizer, (sj.S3, sj.DenseShift)):
    # Nearest representable value; the sign is the float weight's (B(0) = +1).
    assert np.all(np.abs(weight - x) <= np.min(np.abs(values - x[..., None]), -1) + 1e-12)
    assert np.all((weight == 0) | ((weight > 0) == (x >= 0)))
    for name, latent in latents.items():  # every binarized latent at the margin
      np.testing.assert_array_equal(np.abs(latent), np.float32(0.01), err_msg=name)
  elif isinstance(quantizer, sj.DeepShiftQ):
    np.testing.assert_array_equal(latents["weight"], x.astype(np.float32))
  else:
    p = np.clip(np.round(np.log2(np.abs(np.where(x == 0, 1, x)))), quantizer.p_min, 0)
    np.testing.assert_array_equal(weight, np.sign(x) * np.exp2(p))
  if isinstance(quantizer, sj.S3):
    # Weights rounding to zero keep the float's sign and the smallest power, for revival.
    pruned = weight == 0
    assert pruned.any() and np.all(latents["sparse"][pruned] < 0)
    revived = dict(latents, sparse=np.abs(latents["sparse"]))
    np.testing.assert_array_equal(np.asarray(quantizer.weight(as_jnp(revived)))[pruned],
                                  np.where(x[pruned] >= 0, 1.0, -1.0) * 2.0 ** quantizer.e0)


@pytest.mark.parametrize("quantizer", [sj.DenseShift(4), sj.S3(4)], ids=["DenseShift", "S3"])
def test_one_latent_flip_moves_the_exponent_by_one(quantizer):
  """Chain latents: S trailing ones after zeros, so each neighbour is one flip away."""
  lat_key = "exponent" if isinstance(quantizer, sj.DenseShift) else "shift"
  values = np.exp2(np.arange(quantizer.code_format.num_exponents) + quantizer.e0)
  w = values.reshape(-1, 1).astype(np.float32)
  latents = transfer.shift_latents_from_float(w, quantizer)
  bits = latents[lat_key]
  num = bits.shape[0]
  for s in range(len(values)):
    for flip, expected in ((num - s - 1, s + 1), (num - s, s - 1)):
      if not 0 <= flip < num:
        continue
      flipped = {**latents, lat_key: bits.copy()}
      flipped[lat_key][flip, s] *= -1
      got = np.asarray(quantizer.weight(as_jnp(flipped)))[s, 0]
      assert got == 2.0 ** (quantizer.e0 + expected)


def test_scale_exponents_follow_the_float_scale():
  w = float_kernel(seed=1)
  q = sj.DenseShift(3)
  k = transfer.choose_scale_exponents(w, q, granularity="channel")
  shifts = np.arange(w.shape[-1]) % 5 - 2
  np.testing.assert_array_equal(
      transfer.choose_scale_exponents(w * np.exp2(shifts), q, granularity="channel"),
      k + shifts)
  # Per-layer: one exponent; the per-channel choice is never a worse fit.
  k_layer = transfer.choose_scale_exponents(w, q, granularity="layer")
  def cosine(kk):
    t = transfer.target_weights(w, q, scale_exponent=kk) * np.exp2(kk)
    return np.sum(t * w) / np.linalg.norm(t) / np.linalg.norm(w)
  assert k_layer.shape == () and cosine(k) >= cosine(k_layer)
  # DeepShift keeps weights that fit as they are, shifts only weights above the range.
  dsq = sj.DeepShiftQ(5)
  assert np.all(transfer.choose_scale_exponents(w / 4, dsq, granularity="channel") == 0)
  np.testing.assert_array_equal(
      transfer.choose_scale_exponents(np.full((4, 2), [[3.0, 0.1]]), dsq,
                                      granularity="channel"), [2, 0])


def test_bad_arguments_are_named():
  w = float_kernel()
  with pytest.raises(ValueError, match="margin must be a positive number"):
    transfer.shift_latents_from_float(w, sj.DenseShift(3), margin=0.0)
  with pytest.raises(ValueError, match="one integer per output channel"):
    transfer.shift_latents_from_float(w, sj.DenseShift(3), scale_exponent=np.zeros(3))
  with pytest.raises(ValueError, match="granularity must be one of"):
    transfer.choose_scale_exponents(w, sj.S3(3), granularity="row")


# ------------------------------------------------------------------------ whole models


X = np.asarray(jax.random.normal(KEY(1), (4, 8, 8, 3)))


def shift_shapes(quantizer, width=0.5, num_classes=10):
  model = models.resnet8(num_classes=num_classes, width_multiplier=width,
                         quantizer=quantizer)
  return model, jax.eval_shape(lambda: model.init(KEY(0), X))


@pytest.fixture(scope="module")
def float_resnet8():
  """A float ResNet-8 with kernels far from unit scale and non-trivial BN statistics."""
  model = models.resnet8(width_multiplier=0.5)
  variables = jax.jit(model.init)(KEY(0), X)
  params = jax.tree.map(lambda a: a * 7.0 if a.ndim == 4 else a, variables["params"])
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": variables["batch_stats"]}, X)
  return model, jax.jit(model.apply), {"params": params,
                                       "batch_stats": updates["batch_stats"]}


@pytest.mark.parametrize("quantizer", [sj.DenseShift(3), sj.S3(2), sj.DeepShiftPS(5)],
                         ids=["DenseShift3", "S3_2", "DeepShiftPS5"])
def test_converted_model_computes_the_dequantized_float_model_exactly(quantizer,
                                                                      float_resnet8):
  _, float_apply, float_vars = float_resnet8
  shift_model, shift_vars = shift_shapes(quantizer)
  converted = transfer.variables_from_float(shift_vars, float_vars, quantizer)
  exponents = transfer.scale_exponents(shift_vars["params"], float_vars["params"], quantizer)
  assert set(exponents) == {tuple(name.split("/"))
                            for name in train.quantized_kernels(converted["params"])}
  assert ("stem",) not in exponents and ("head",) not in exponents
  if not isinstance(quantizer, sj.DeepShiftPS):
    assert any(np.any(k != 0) for k in exponents.values())  # compensation is exercised

  # The float model with every quantized kernel replaced by 2**k * Q(w * 2**-k).
  dequantized = copy.deepcopy(jax.tree.map(np.asarray, float_vars["params"]))
  for layer, k in exponents.items():
    node = dequantized
    for name in layer:
      node = node[name]
    latents = at(converted["params"], layer + ("kernel",))
    node["kernel"] = np.asarray(quantizer.weight(as_jnp(latents))) * np.exp2(k)
  expected = float_apply({"params": dequantized, "batch_stats": float_vars["batch_stats"]}, X)
  got = jax.jit(shift_model.apply)(converted, X)
  # Float rounding only: the logits are large (kernels x7), compare on their scale.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.max(np.abs(expected)))
  # Stem, head and BatchNorm parameters are copied bit for bit.
  for path in [("stem", "kernel"), ("head", "kernel"), ("head", "bias"),
               ("stage1_block0", "bn1", "scale"), ("stage2_block0", "shortcut_bn", "bias")]:
    np.testing.assert_array_equal(at(converted["params"], path), at(float_vars["params"], path))


def test_mismatched_models_are_named(float_resnet8):
  _, _, float_vars = float_resnet8
  q = sj.DenseShift(3)
  with pytest.raises(ValueError, match="kernel.*has shape"):
    transfer.init_from_float(shift_shapes(q, width=1.0)[1]["params"], float_vars["params"], q)
  with pytest.raises(ValueError, match="head/(kernel|bias).*has shape"):
    transfer.init_from_float(shift_shapes(q, num_classes=7)[1]["params"],
                             float_vars["params"], q)
  shift_params = shift_shapes(q)[1]["params"]
  with pytest.raises(ValueError, match="float kernel"):
    transfer.init_from_float(shift_params, shift_params, q)
  pruned = copy.deepcopy(jax.tree.map(np.asarray, float_vars["params"]))
  del pruned["stage1_block0"]["bn1"]
  with pytest.raises(ValueError, match="missing.*stage1_block0/bn1/bias"):
    transfer.init_from_float(shift_params, pruned, q)


# ------------------------------------------------------------ Fashion-MNIST, real data


def fashion_config(data_dir, **overrides):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = 0.5
  c.dataset = "fashion_mnist"
  c.data_dir = str(data_dir)
  c.prepare_offline_data = True
  c.quantizer = "float"
  c.batch_size = 128
  c.eval_batch_size = 500
  c.learning_rate = 0.1
  c.warmup_epochs = 0.0
  c.num_train_steps = 150
  c.log_every_steps = 75
  c.checkpoint_every_steps = 150
  c.progress_bar = False
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def float_fashion_run(tmp_path_factory):
  """A narrow float ResNet-8 trained 150 steps on the real Fashion-MNIST (about 20 s)."""
  if not os.path.isfile(FASHION_SOURCE):
    pytest.skip("needs Debian's dataset-fashion-mnist")
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = str(tmp_path_factory.mktemp("float_run"))
  summary = train.train_and_evaluate(fashion_config(data_dir), workdir)
  return data_dir, workdir, summary


def accuracy(model, variables, source, n=2000):
  images = data_lib.normalize(source.images[:n], "fashion_mnist")
  logits = jax.jit(model.apply)(variables, images)
  return float(jnp.mean(jnp.argmax(logits, -1) == source.labels[:n]))


@pytest.mark.slow
def test_float_fashion_mnist_converts_to_a_working_3bit_denseshift(float_fashion_run):
  data_dir, workdir, summary = float_fashion_run
  assert summary["test_accuracy"] > 0.6, summary
  loaded = transfer.load_float_params(workdir)
  assert loaded["step"] == 150
  # The checkpoints dir and a step dir name the same checkpoint.
  again = transfer.load_float_params(os.path.join(workdir, "checkpoints", "150"))
  for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(again["params"])):
    np.testing.assert_array_equal(a, b)

  test = data_lib.load_split("fashion_mnist", "test", data_dir=data_dir)
  float_model = models.resnet8(width_multiplier=0.5)
  float_acc = accuracy(float_model, {"params": loaded["params"],
                                     "batch_stats": loaded["batch_stats"]}, test)
  q = sj.DenseShift(3)
  shift_model = models.resnet8(width_multiplier=0.5, quantizer=q)
  shape = jax.eval_shape(lambda: shift_model.init(KEY(0), test.images[:1] * 1.0))
  converted = transfer.variables_from_float(shape, loaded, q)
  direct = accuracy(shift_model, converted, test)
  # BatchNorm statistics re-estimated on 30 training batches; no weight changes.
  images = data_lib.load_split("fashion_mnist", "train[:3840]", data_dir=data_dir).images
  batches = [data_lib.normalize(images[i:i + 128], "fashion_mnist")
             for i in range(0, len(images), 128)]
  recalibrated = transfer.recalibrate_batch_stats(shift_model.apply, converted, batches)
  for a, b in zip(jax.tree.leaves(recalibrated["params"]),
                  jax.tree.leaves(converted["params"])):
    np.testing.assert_array_equal(a, b)
  recalibrated_acc = accuracy(shift_model, recalibrated, test)
  print(f"float {float_acc:.3f}; DenseShift-3 converted {direct:.3f}, "
        f"BN recalibrated {recalibrated_acc:.3f}")
  assert direct > 0.2  # chance is 0.1; converting the float model alone is fragile
  assert recalibrated_acc > 0.5 and recalibrated_acc > float_acc - 0.1


@pytest.mark.slow
def test_init_from_hook_starts_training_from_the_converted_float_model(float_fashion_run,
                                                                       tmp_path):
  data_dir, workdir, float_summary = float_fashion_run
  # 30 steps at lr 1e-9: the weights stay the converted ones, BatchNorm recalibrates.
  config = fashion_config(data_dir, quantizer="DenseShift", bits=3, num_train_steps=30,
                          learning_rate=1e-9, log_every_steps=30, checkpoint_every_steps=30,
                          init_from=workdir, init_margin=1e-3, init_granularity="layer")
  summary = train.train_and_evaluate(config, str(tmp_path / "shift"))
  assert summary["test_accuracy"] > float_summary["test_accuracy"] - 0.1, summary
  q = sj.DenseShift(3)
  trained = transfer.load_float_params(tmp_path / "shift")  # reads any run's checkpoint
  assert trained["step"] == 30
  expected = transfer.init_from_float(trained["params"],
                                      transfer.load_float_params(workdir)["params"], q)
  got_codes = train.all_codes(as_jnp(trained["params"]), q)
  want_codes = train.all_codes(as_jnp(expected), q)
  assert len(want_codes) == 8  # ResNet-8: 6 convs and 2 projection shortcuts
  for name in want_codes:
    np.testing.assert_array_equal(got_codes[name], want_codes[name], err_msg=name)


def _never_called():
  raise AssertionError("the shift model's variables were asked for")


def test_a_run_with_a_checkpoint_is_not_reinitialized():
  config = ml_collections.ConfigDict({"init_from": "/nonexistent", "init_margin": 1e-3})
  assert transfer.init_from_config(config, _never_called, None, resuming=True) is None


def test_finetune_recipe_without_init_from_says_what_to_pass():
  class Cfg(dict):
    get = dict.get
  with pytest.raises(ValueError, match="--config.init_from="):
    transfer.init_from_config(Cfg(init_from="", init_from_required=True), _never_called,
                              None, resuming=True)
  assert transfer.init_from_config(Cfg(init_from=""), _never_called, None) is None


def test_mixed_widths_convert_each_layer_by_its_own_spec(float_resnet8):
  _, _, float_vars = float_resnet8
  model = models.resnet8(width_multiplier=0.5, policy=sj.LayerPolicy(
      sj.DenseShift(3), ("stem", "head"),
      layer_quantizers=(("stage1_*/*", sj.DenseShift(4)), ("stage3_*/*", sj.S3(2))),
      activation=sj.PACT(4)))
  shift_vars = jax.jit(model.init)(KEY(0), X)
  specs = models.policy_of(model).weight_specs(
      train.quantized_kernels(shift_vars["params"]))
  assert {str(q) for q in specs.values()} == {str(sj.DenseShift(4)), str(sj.DenseShift(3)),
                                              str(sj.S3(2))}
  converted = transfer.variables_from_float(shift_vars, float_vars, specs)
  exponents = transfer.scale_exponents(shift_vars["params"], float_vars["params"], specs)
  for name, spec in specs.items():
    path = tuple(name.split("/"))
    latents = at(converted["params"], path + ("kernel",))
    assert set(latents) == set(at(shift_vars["params"], path + ("kernel",)))
    want = transfer.target_weights(np.asarray(at(float_vars["params"], path + ("kernel",))),
                                   spec, scale_exponent=exponents[path])
    np.testing.assert_array_equal(np.asarray(spec.weight(as_jnp(latents))), want)
    # The activation range the float model has no counterpart of keeps its init.
    assert float(at(converted["params"], path + ("activation", "clip"))) == 6.0
  # One spec for a model whose layers differ is refused, naming a layer.
  with pytest.raises(ValueError, match="layer 'stage1_block0/conv1': latents"):
    transfer.variables_from_float(shift_vars, float_vars, sj.DenseShift(3))
