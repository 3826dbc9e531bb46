"""The paper recipes (experiments/configs/cifar10.py, imagenet.py): full settings stated,
command-line parsing, and every recipe run end to end at its ``runlocal`` settings.

Runs use ``tfds.testing.mock_data`` and, to fit the CPU budget (compiling is most of a
3-step run), ResNets cut to one block per stage (the architectures themselves are tested
in tests/models/test_resnets.py). After that cut, ResNet-20 and ResNet-56 recipes with the same method
are the same computation, so each such pair runs once (the test id names both); ResNet-18
and ResNet-50 (basic and bottleneck blocks) run apart, the ImageNet recipes whose method
runs on CIFAR only with SHIFTJAX_ALL_RECIPES=1 (see IMAGENET_REPRESENTATIVES).
"""

import functools
import json
import math
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from experiments.configs import cifar10
from experiments.configs import imagenet as imagenet_configs
from experiments.configs import recipes
from shiftjax import metrics as metrics_lib
from shiftjax import models
from shiftjax import train

CONFIGS = {"cifar10": cifar10, "imagenet": imagenet_configs}
ALL = [(kind, r) for kind, module in CONFIGS.items() for r in module.RECIPES]


def config_of(kind, recipe):
  return CONFIGS[kind].get_config(recipe)


# ------------------------------------------------------------------- full settings


@pytest.mark.parametrize("kind, recipe", ALL, ids=[f"{k}:{r}" for k, r in ALL])
def test_full_recipe_states_the_papers_settings(kind, recipe):
  c = config_of(kind, recipe)
  parsed = recipes.parse(recipe, models=CONFIGS[kind].MODELS, allow_finetune=True)
  assert c.model == parsed.model and c.recipe == recipe
  assert c.quantizer == recipes.METHODS[parsed.method][0]
  if parsed.bits:
    assert c.bits == parsed.bits
  assert (c.momentum, c.weight_decay, c.weight_decay_on, c.lr_schedule, c.warmup_epochs) == (
      0.9, 1e-4, "all", "cosine", 0.0)
  assert c.full_precision_layers == ("stem", "head")
  assert c.s3_regularizer == (1e-5 if parsed.method == "s3" else 0.0)
  assert (c.optimizer, c.learning_rate) == (
      ("radam", 0.01) if parsed.method == "deepshift_ps" else ("sgd", 0.1)
  ) or parsed.finetune
  if kind == "cifar10":
    assert (c.dataset, c.num_epochs, c.batch_size, c.width_multiplier) == (
        "cifar10", 200.0, 128, 1.0)
  elif parsed.finetune:
    assert (c.num_epochs, c.learning_rate, c.init_from_required) == (15.0, 0.01, True)
  else:
    assert (c.dataset, c.num_epochs, c.batch_size, c.image_size) == (
        "imagenet2012", 200.0, 256, 224)
  assert c.num_train_steps == -1 and c.init_from == ""
  train.validate_config(c)


def test_every_method_and_bit_width_of_the_papers_is_covered():
  got = {(k, r.split(",")[0], ",".join(r.split(",")[1:])) for k, r in ALL}
  for model in ("resnet20", "resnet56"):
    for method in ("float", "deepshift_q,5", "deepshift_ps,5", "s3,2", "s3,3", "s3,4",
                   "denseshift,2", "denseshift,3", "denseshift,4"):
      assert ("cifar10", model, method) in got
  for model in ("resnet18", "resnet50"):
    for method in ("float", "s3,3", "denseshift,2", "denseshift,3", "denseshift,4",
                   "denseshift,3,finetune"):
      assert ("imagenet", model, method) in got


@pytest.mark.parametrize("string, message", [
    ("resnet19,s3", "unknown model 'resnet19'"),
    ("resnet20,ternary", "unknown method 'ternary'"),
    ("resnet20,float,3", "float takes no bit-width"),
    ("resnet20,s3,3,fast", "unknown option 'fast'"),
    ("resnet20,denseshift,3,finetune", "unknown option 'finetune'"),
    ("resnet20", "expected MODEL,METHOD"),
])
def test_bad_config_strings_are_named(string, message):
  with pytest.raises(ValueError, match=message):
    cifar10.get_config(string)


def test_bad_bit_widths_fail_validation():
  with pytest.raises(ValueError, match="DenseShift supports bits in 2..5, got 6"):
    train.validate_config(cifar10.get_config("resnet20,denseshift,6"))
  with pytest.raises(ValueError, match="finetune converts a float model"):
    imagenet_configs.get_config("resnet18,float,finetune")


def test_command_line_selects_a_recipe_and_overrides_fields():
  argv = ["prog", "--config=experiments/configs/imagenet.py:resnet50,denseshift,2,finetune",
          "--config.init_from=/runs/float", "--config.num_epochs=5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  c = flag_values.config
  assert (c.model, c.quantizer, c.bits, c.init_from, c.num_epochs) == (
      "resnet50", "DenseShift", 2, "/runs/float", 5.0)
  assert c.init_from_required and c.learning_rate == 0.01


def test_runlocal_shrinks_every_recipe():
  for kind, recipe in ALL:
    c = config_of(kind, recipe + ",runlocal")
    assert c.num_train_steps == 3 and c.batch_size == 8 and c.eval_batch_size == 16
    assert c.width_multiplier == 0.25 if kind == "cifar10" else c.image_size == 64
    full = config_of(kind, recipe)
    # Everything else is the recipe's own.
    for field in ("model", "quantizer", "bits", "optimizer", "learning_rate", "weight_decay",
                  "s3_regularizer", "init_method", "encoding", "surrogate", "lr_schedule"):
      assert c[field] == full[field], (recipe, field)


# ------------------------------------------------------------- runlocal, end to end


def _cifar_resnet_one_block(num_classes=10, quantizer=None, *, policy=None, **kwargs):
  return models.resnet8(num_classes, quantizer, policy=policy, **kwargs)


def _imagenet_resnet_one_block(block, num_classes=1000, quantizer=None, *, policy=None,
                               **kwargs):
  return models.shift_model(models.ImageNetResNet(
      stage_sizes=(1, 1, 1, 1), block=block, num_classes=num_classes, **kwargs),
      quantizer, policy)


SMALL_MODELS = {
    **{name: _cifar_resnet_one_block for name in cifar10.MODELS},
    "resnet18": functools.partial(_imagenet_resnet_one_block, "basic"),
    "resnet34": functools.partial(_imagenet_resnet_one_block, "basic"),
    "resnet50": functools.partial(_imagenet_resnet_one_block, "bottleneck"),
}
ARCHITECTURE = {**{name: "cifar_resnet" for name in cifar10.MODELS},
                "resnet18": "basic", "resnet34": "basic", "resnet50": "bottleneck"}


def _groups():
  """Recipes whose runlocal configs are the same computation once models are cut."""
  groups: dict[str, list] = {}
  for kind, recipe in ALL:
    c = config_of(kind, recipe + ",runlocal")
    key = c.to_dict()
    key.update(model=ARCHITECTURE[c.model], recipe=None)
    groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append((kind, recipe))
  return list(groups.values())


GROUPS = _groups()


@pytest.fixture
def small_models(monkeypatch):
  for name, factory in SMALL_MODELS.items():
    monkeypatch.setitem(models.MODELS, name, factory)
  # Drawing the curves (matplotlib, 1-3 s a run) is not what these runs check.
  monkeypatch.setattr(metrics_lib, "plot_curves", lambda workdir: None)


def mocked():
  return tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE)


_float_runs: dict[tuple[str, str], str] = {}


def run_runlocal(kind, recipe, workdir, **overrides):
  c = config_of(kind, recipe + ",runlocal")
  for k, v in overrides.items():
    c[k] = v
  with mocked():
    summary = train.train_and_evaluate(c, str(workdir))
  return c, summary


def float_run(kind, model, tmp_path_factory):
  """Workdir of the runlocal float run of this architecture (made on first use)."""
  key = (kind, ARCHITECTURE[model])
  if key not in _float_runs:
    workdir = tmp_path_factory.mktemp("float")
    run_runlocal(kind, f"{model},float", workdir)
    _float_runs[key] = str(workdir)
  return _float_runs[key]


# ImageNet recipes whose method already runs in a CIFAR group differ from it only in the
# model and data, which these cover: each block type's float run and the 3-bit
# DenseShift fine-tuning from it. SHIFTJAX_ALL_RECIPES=1 runs the other ImageNet recipes
# too (about 20 s of CPU each).
IMAGENET_REPRESENTATIVES = {"resnet18,float", "resnet18,denseshift,3,finetune",
                            "resnet50,float", "resnet50,denseshift,3,finetune"}
ALL_RECIPES = os.environ.get("SHIFTJAX_ALL_RECIPES", "") not in ("", "0")


# The bottleneck ResNet-50's float run (12 s) is the slow set's; ResNet-18 stands for the
# ImageNet recipes in the default suite, and the bottleneck block is packed and checked in
# tests/deploy/test_export.py.
SLOW_RECIPES = {"resnet50,float"}


def _marks(group):
  # Fine-tuning runs a float training first, then converts it: the slow set has them.
  marks = ([pytest.mark.slow] if any(r.endswith(",finetune") or r in SLOW_RECIPES
                                     for _, r in group) else [])
  if not ALL_RECIPES and all(k == "imagenet" and r not in IMAGENET_REPRESENTATIVES
                             for k, r in group):
    marks.append(pytest.mark.skip(reason="same method runs in a CIFAR group and ImageNet "
                                         "in the representatives; SHIFTJAX_ALL_RECIPES=1"))
  return marks


@pytest.mark.parametrize("group", [pytest.param(g, marks=_marks(g)) for g in GROUPS],
                         ids=["|".join(f"{k}:{r}" for k, r in g) for g in GROUPS])
def test_recipe_runs_end_to_end(group, small_models, tmp_path, tmp_path_factory):
  del small_models
  kind, recipe = group[0]
  overrides = {}
  if recipe.endswith("finetune"):
    overrides["init_from"] = float_run(kind, recipe.split(",")[0], tmp_path_factory)
  c, summary = run_runlocal(kind, recipe, tmp_path / "run", **overrides)
  assert summary["steps"] == 3 and math.isfinite(summary["test_loss"]), summary
  assert summary["test_examples"] == 16
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [l["train_loss"] for l in lines if "train_loss" in l]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  if recipe.endswith(",float") and (kind, ARCHITECTURE[c.model]) not in _float_runs:
    _float_runs[(kind, ARCHITECTURE[c.model])] = str(tmp_path / "run")
  if c.quantizer != "float":
    assert summary["packed_weight_bytes"] < summary["float32_weight_bytes"]


# ----------------------------------------------------------- ImageNet input pipeline


def test_imagenet_pipeline_on_mock_data():
  from shiftjax.data import imagenet  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    make = functools.partial(imagenet.make_dataset, image_size=32, num_threads=3)
    train_ds = make(batch_size=8, train=True, seed=3)
    again = make(batch_size=8, train=True, seed=3)
    other_seed = make(batch_size=8, train=True, seed=4)
    halves = [make(batch_size=8, train=True, seed=3, process_index=i, process_count=2)
              for i in range(2)]
    eval_ds = make(batch_size=8, train=False)
    eval_halves = [make(batch_size=8, train=False, process_index=i, process_count=2)
                   for i in range(2)]
    assert train_ds.steps_per_epoch == 2
    batches = list(train_ds.iterator(0, 3))
    for step, batch in enumerate(batches):
      assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min()
      assert batch["label"].max() < 1000
      # A pure function of (seed, step), whichever pipeline object or host computes it.
      np.testing.assert_array_equal(again.batch(step)["image"], batch["image"])
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([h.batch(step)[key] for h in halves]), batch[key])
    assert not np.array_equal(batches[0]["image"], batches[2]["image"])
    assert not np.array_equal(other_seed.batch(0)["image"], batches[0]["image"])
    evaluated = list(eval_ds)
    assert [int(b["mask"].sum()) for b in evaluated] == [8, 8, 4]
    assert evaluated[0]["image"].shape == (8, 32, 32, 3)
    for i, batch in enumerate(evaluated):
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(
            np.concatenate([h.batch(i)[key] for h in eval_halves]), batch[key])
  assert "tensorflow" not in sys.modules


def test_random_resized_crop_boxes():
  from shiftjax.data import imagenet  # pylint: disable=g-import-not-at-top
  crop = imagenet.RandomResizedCrop(224)
  params = crop.sample(np.random.default_rng(0), 500)
  areas, ratios = [], []
  for uniform in params["uniform"]:
    left, top, right, bottom = crop.box(500, 375, uniform)
    assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
    areas.append((right - left) * (bottom - top) / (500 * 375))
    ratios.append((right - left) / (bottom - top))
  assert 0.07 < min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.3
  assert 3 / 4 - 0.02 < min(ratios) and max(ratios) < 4 / 3 + 0.02
  assert 0.4 < params["flip"].mean() < 0.6
  # A strip too thin for any 3/4..4/3 crop falls back to the centred, clamped box.
  never = np.full((10, 4), 0.999)
  assert crop.box(1000, 20, never) == (486, 0, 513, 20)  # 27 = 20 * 4/3


def test_imagenet_transforms_decode_arrays_and_jpeg_bytes():
  import io  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from shiftjax.data import imagenet  # pylint: disable=g-import-not-at-top
  # 300x200 image: red left third, green middle, blue right third.
  image = np.zeros((200, 300, 3), np.uint8)
  image[:, :100, 0] = image[:, 100:200, 1] = image[:, 200:, 2] = 255
  out = imagenet.resize_center_crop(image, 224, 256)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # Shorter side 200 -> 256, centre 224 keeps x in 62.5..237.5 of the original: green in
  # the middle, red and blue only at the borders.
  assert tuple(out[112, 112]) == (0, 255, 0)
  assert out[112, 0, 0] > 200 and out[112, -1, 2] > 200
  encoded = io.BytesIO()
  PIL.Image.fromarray(image).save(encoded, format="JPEG", quality=95)
  from_jpeg = imagenet.resize_center_crop(encoded.getvalue(), 224, 256)
  assert np.abs(from_jpeg.astype(int) - out).mean() < 3
  gray = imagenet.resize_center_crop(image[..., :1], 32, 36)
  assert gray.shape == (32, 32, 3) and np.all(gray[..., 0] == gray[..., 1])
  crop = imagenet.RandomResizedCrop(16)
  params = crop.sample(np.random.default_rng(1), 2)
  flipped = crop.apply([image, image], {"uniform": params["uniform"],
                                         "flip": np.array([False, True])})
  same_box = crop.transform(image, params["uniform"][1], True)
  np.testing.assert_array_equal(flipped[1], same_box)
  assert flipped.shape == (2, 16, 16, 3)
