"""Speech data (FSC builder, synthetic set, pipelines) and the speech ResNet."""

import csv
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import shiftjax as sj
from shiftjax.data import pipeline
from shiftjax.data import speech
from shiftjax.data.slu import fsc
from shiftjax.data.slu import intents
from shiftjax.data.slu import synthetic

requires_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="needs Debian's espeak-ng (apt-get install espeak-ng)")


def _has_tensorflow() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    return False
  return True


# ------------------------------------------------------------------------ vocabulary


def test_intents_are_the_31_fsc_intents():
  assert intents.NUM_INTENTS == 31 and list(intents.INTENT_NAMES) == sorted(
      intents.INTENT_NAMES)
  for action, obj, location in intents.INTENTS:
    assert (action, obj, location) == intents.INTENTS[
        intents.intent_index(action, obj, location)]
    assert action in intents.ACTIONS and obj in intents.OBJECTS
    assert location in intents.LOCATIONS
  assert intents.INTENT_NAMES[10] == "change language_Chinese_none"
  assert {o for _, o, _ in intents.INTENTS} == set(intents.OBJECTS)
  assert {l for _, _, l in intents.INTENTS} == set(intents.LOCATIONS)
  with pytest.raises(ValueError, match="not one of the 31"):
    intents.intent_index("bring", "lamp", "kitchen")
  assert all(len(p) >= 6 for p in intents.PHRASINGS.values())


# --------------------------------------------------------------------- FSC builder

# (split, speaker, intent index) of a tiny tree in FSC's layout.
FSC_ROWS = [("train", "spkA", 0), ("train", "spkA", 14), ("train", "spkB", 30),
            ("train", "spkB", 10), ("valid", "spkC", 3), ("test", "spkD", 21),
            ("test", "spkE", 5)]


def write_fsc_tree(root, rows=FSC_ROWS, bad_slot=False):
  """FSC's layout: data/{split}_data.csv and wavs/speakers/<speaker>/<id>.wav."""
  os.makedirs(root / "data", exist_ok=True)
  written = {}
  for split in fsc.FSC_SPLITS:
    with open(root / "data" / f"{split}_data.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["", "path", "speakerId", "transcription", "action", "object", "location"])
      for i, (s, speaker, label) in enumerate(rows):
        if s != split:
          continue
        action, obj, location = intents.INTENTS[label]
        if bad_slot:
          location = "garage"
        path = f"wavs/speakers/{speaker}/{split}-{i}.wav"
        os.makedirs(os.path.dirname(root / path), exist_ok=True)
        audio = (np.sin(np.arange(800 + 160 * i) * 0.05 * (i + 1)) * 3000).astype(np.int16)
        fsc.write_wav(root / path, audio)
        written[path] = (audio, label, speaker)
        w.writerow([i, path, speaker, intents.PHRASINGS[intents.INTENT_NAMES[label]][0],
                    action, obj, location])
  return written


def test_fsc_builder_reads_the_standard_layout(tmp_path):
  manual = tmp_path / "download" / "fluent_speech_commands_dataset"
  written = write_fsc_tree(manual)
  # The folder above the dataset's is accepted too.
  fsc.prepare_fluent_speech_commands(tmp_path / "tfds", tmp_path / "download")
  ds = tfds.data_source("fluent_speech_commands", data_dir=tmp_path / "tfds")
  assert set(ds) == set(fsc.FSC_SPLITS)
  info = tfds.builder("fluent_speech_commands", data_dir=tmp_path / "tfds").info
  assert info.features["label"].names == list(intents.INTENT_NAMES)
  assert info.metadata["sample_rate"] == 16000
  for split in fsc.FSC_SPLITS:
    expected = {p: v for p, v in written.items() if f"/{split}-" in p}
    examples = [ds[split][i] for i in range(len(ds[split]))]
    assert len(examples) == len(expected)
    seen = set()
    for ex in examples:
      label = int(ex["label"])
      _, want_label, speaker = next(v for v in expected.values()
                                    if np.array_equal(v[0], ex["audio"]))
      assert label == want_label and ex["speaker_id"].decode() == speaker
      action, obj, location = intents.INTENTS[label]
      assert info.features["action"].names[ex["action"]] == action
      assert info.features["object"].names[ex["object"]] == obj
      assert info.features["location"].names[ex["location"]] == location
      assert ex["audio"].dtype == np.int16
      seen.add(speaker)
    assert seen == {v[2] for v in expected.values()}


def test_fsc_builder_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="train_data.csv"):
    fsc.prepare_fluent_speech_commands(tmp_path / "tfds", tmp_path / "nothing")
  write_fsc_tree(tmp_path / "bad", bad_slot=True)
  with pytest.raises(ValueError, match="garage"):
    fsc.prepare_fluent_speech_commands(tmp_path / "tfds", tmp_path / "bad")


# ------------------------------------------------------------------ synthetic set

TINY = {"train": 8, "valid": 2, "test": 4}


def test_voice_families_are_disjoint_and_the_plan_is_deterministic():
  for seed in (0, 1):
    fams = synthetic.split_families(seed, use_flite=True)
    assert sorted(sum(fams.values(), [])) == sorted(synthetic.families(True))
    assert not set(fams["train"]) & set(fams["test"])
    assert not set(fams["train"]) & set(fams["valid"])
    assert not set(fams["valid"]) & set(fams["test"])
    ids = {}
    for split in synthetic.SPLITS:
      spk = synthetic.speakers(seed, split, use_flite=True)
      assert {s.family for s in spk} == set(fams[split])
      ids[split] = {s.speaker_id for s in spk}
      assert len(ids[split]) == len(spk)
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["valid"]
  assert synthetic.variant_family("klatt3") == "klatt"
  assert synthetic.variant_family("m3") == "m3"
  a = synthetic.plan_split(0, "train", 62, use_flite=True)
  assert a == synthetic.plan_split(0, "train", 62, use_flite=True)
  assert a != synthetic.plan_split(1, "train", 62, use_flite=True)
  assert np.bincount([u.label for u in a]).tolist() == [2] * 31  # balanced intents
  for u in a:
    assert u.text in intents.PHRASINGS[intents.INTENT_NAMES[u.label]]


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
  """A tfds data_dir holding a tiny synthetic_slu (14 utterances)."""
  if shutil.which("espeak-ng") is None:
    pytest.skip("needs Debian's espeak-ng (apt-get install espeak-ng)")
  data_dir = tmp_path_factory.mktemp("tfds")
  synthetic.prepare_synthetic_slu(data_dir, seed=3, sizes=TINY)
  return data_dir


@requires_espeak
def test_synthetic_audio_is_deterministic():
  plan = synthetic.plan_split(5, "test", 3, use_flite=shutil.which("flite") is not None)
  first = [synthetic.synthesize(u) for u in plan]
  second = [synthetic.synthesize(u) for u in plan]
  for u, a, b in zip(plan, first, second):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int16 and 0.5 * 16000 < len(a) < 4 * 16000
    peak_dbfs = 20 * np.log10(np.abs(a).max() / 32767)
    assert abs(peak_dbfs - u.peak_dbfs) < 0.1


def test_tiny_synthetic_dataset(tiny_synthetic):
  ds = tfds.data_source("synthetic_slu", data_dir=tiny_synthetic)
  speakers = {}
  for split, n in TINY.items():
    assert len(ds[split]) == n
    examples = [ds[split][i] for i in range(n)]
    speakers[split] = {ex["speaker_id"].decode() for ex in examples}
    for ex in examples:
      label = int(ex["label"])
      assert ex["transcription"].decode() in intents.PHRASINGS[intents.INTENT_NAMES[label]]
      assert ex["audio"].dtype == np.int16 and ex["audio"].size > 8000
  assert not speakers["train"] & speakers["test"]
  assert not speakers["train"] & speakers["valid"]
  # Same recipe: nothing to do; another recipe in the same place: a clear error.
  synthetic.prepare_synthetic_slu(tiny_synthetic, seed=3, sizes=TINY)
  with pytest.raises(ValueError, match="another data_dir"):
    synthetic.prepare_synthetic_slu(tiny_synthetic, seed=4, sizes=TINY)


# ------------------------------------------------------------------------ pipelines


def test_speech_pipeline_serves_uint8_log_mel(tiny_synthetic):
  spec = speech.SPECS["synthetic_slu"]
  assert spec.image_shape == (281, 40, 1)
  source = speech.load_split("synthetic_slu", "train", data_dir=tiny_synthetic)
  assert source.images.shape == (8, 281, 40, 1) and source.images.dtype == np.uint8
  # dB below each utterance's peak: its loudest bin is 255; trailing padding is silence.
  assert (source.images.reshape(8, -1).max(axis=1) == 255).all()
  assert (source.images[:, -5:] == 0).all()
  train = sj.data.make_dataset("synthetic_slu", batch_size=4, train=True, seed=0,
                               data_dir=tiny_synthetic, prefetch=0)
  batch = train.batch(0)
  assert batch["image"].shape == (4, 281, 40, 1) and batch["label"].shape == (4,)
  np.testing.assert_array_equal(batch["image"], train.batch(0)["image"])  # resumable
  evaluation = sj.data.make_dataset("synthetic_slu", batch_size=3, train=False,
                                    data_dir=tiny_synthetic, prefetch=0)
  assert len(evaluation) == 2 and evaluation.batch(1)["mask"].tolist() == [True, False, False]
  with pytest.raises(FileNotFoundError, match="make_synthetic_slu"):
    speech.load_split("synthetic_slu", "train", data_dir=tiny_synthetic / "missing")


def test_numpy_spec_augment_masks_within_bounds():
  aug = speech.SpecAugment(time_masks=2, max_time=10, freq_masks=2, max_freq=5, fill=77)
  images = np.full((32, 60, 40, 1), 200, np.uint8)
  params = aug.sample(np.random.default_rng(0), 32)
  out = aug.apply(images, params)
  assert out.dtype == np.uint8 and set(np.unique(out)) <= {77, 200}
  masked = out[..., 0] == 77
  assert masked.any()
  for example in masked:
    rows, cols = example.all(axis=1), example.all(axis=0)
    np.testing.assert_array_equal(example, rows[:, None] | cols[None, :])
    assert rows.sum() <= 20 and cols.sum() <= 10
  # A host's slice of the global batch gets exactly its part of the augmentation.
  half = aug.apply(images[16:], {k: v[16:] for k, v in params.items()})
  np.testing.assert_array_equal(half, out[16:])


def test_pipeline_takes_an_augmentation_in_place_of_the_spec_one(tiny_synthetic):
  stronger = speech.SpecAugment(4, 60, 2, 12, fill=9)
  plain = sj.data.make_dataset("synthetic_slu", batch_size=4, train=True, seed=3,
                               data_dir=tiny_synthetic, augment=False, prefetch=0)
  custom = sj.data.make_dataset("synthetic_slu", batch_size=4, train=True, seed=3,
                                data_dir=tiny_synthetic, augment=stronger, prefetch=0)
  standard = sj.data.make_dataset("synthetic_slu", batch_size=4, train=True, seed=3,
                                  data_dir=tiny_synthetic, prefetch=0)
  assert custom.augment is stronger
  assert standard.augment == speech.SPECS["synthetic_slu"].augment
  # The same batch, masked with the random widths the pipeline draws for step 1.
  params = stronger.sample(np.random.default_rng([pipeline._AUGMENT_STREAM, 3, 1]), 4)
  np.testing.assert_array_equal(custom.batch(1)["image"],
                                stronger.apply(plain.batch(1)["image"], params))
  with pytest.raises(TypeError, match="augment must be a bool or an augmentation"):
    sj.data.make_dataset("synthetic_slu", batch_size=4, train=True,
                         data_dir=tiny_synthetic, augment="strong")


@pytest.mark.skipif(not _has_tensorflow(), reason="tfds speech_commands stores wav bytes "
                    "that only TensorFlow decodes; pip install tensorflow-cpu to run this")
def test_speech_commands_pipeline_with_mock_data():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    speech._load_split_cached.cache_clear()
    train = sj.data.make_dataset("speech_commands", batch_size=3, train=True, seed=0,
                                 prefetch=0)
    batch = train.batch(0)
  speech._load_split_cached.cache_clear()
  assert batch["image"].shape == (3, 101, 40, 1) and batch["image"].dtype == np.uint8
  assert ((0 <= batch["label"]) & (batch["label"] < 12)).all()


# ----------------------------------------------------------------------------- model


def test_speech_resnet_forward_and_gradients_with_a_shift_quantizer():
  model = sj.models.speech_resnet(num_classes=31, quantizer=sj.DenseShift(bits=3),
                                  width_multiplier=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 48, 40, 1))
  # rbg keys: the init of many latent tensors compiles 10x faster than with threefry.
  variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
  params = variables["params"]
  assert not isinstance(params["stem"]["kernel"], dict)       # full precision
  assert not isinstance(params["head"]["kernel"], dict)
  assert set(params["stage1_block0"]["conv1"]["kernel"]) == set(
      sj.DenseShift(bits=3).init(jax.random.key(0), (3, 3, 8, 8)))
  assert isinstance(params["stage2_block0"]["shortcut"]["kernel"], dict)

  def loss(p):
    logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(logits ** 2), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert logits.shape == (2, 31) and logits.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(grads["stage1_block0"]["conv1"]["kernel"]["sign"]).sum()) > 0
  # Any utterance length: global pooling.
  out = jax.jit(model.apply)(variables, jnp.zeros((1, 77, 40, 1)))
  assert out.shape == (1, 31)


# --------------------------------------------------------------------- recipe and export


@pytest.mark.slow
def test_slu_recipe_trains_and_exports_a_packed_speech_resnet(tiny_synthetic, tmp_path):
  from experiments.configs import slu_denseshift3  # pylint: disable=g-import-not-at-top
  from shiftjax import export  # pylint: disable=g-import-not-at-top
  config = slu_denseshift3.get_config()
  config.data_dir = str(tiny_synthetic)
  config.num_epochs = 0.0
  config.num_train_steps = 4
  config.batch_size = 4
  config.eval_batch_size = 3
  config.progress_bar = False
  summary = sj.train.train_and_evaluate(config, str(tmp_path))
  packed = sj.deploy.load(summary["packed_file"])
  architecture = packed.metadata["architecture"]
  assert architecture["name"] == "SpeechResNet"
  assert architecture["config"]["widths"] == [16, 32, 64]
  assert architecture["config"]["pooling"] == "max"
  assert {e.weight_spec for e in packed.quantized_layers.values()} == {sj.DenseShift(bits=3)}
  # The packed network computes what the trained checkpoint's flax model does.
  spec = sj.data.get_spec("synthetic_slu")
  model = sj.train.create_model(config, spec.num_classes)
  state = sj.train.restore_for_eval(str(tmp_path), config, sj.train.create_train_state(
      jax.random.key(0), config, model, spec.image_shape, lambda step: 0.0))
  test = speech.load_split("synthetic_slu", "test", data_dir=tiny_synthetic)
  features = sj.data.normalize(test.images, "synthetic_slu")
  expected = model.apply({"params": state.params, **state.state},
                         features, train=False)
  packed_model, packed_variables = export.load(packed)
  logits = np.asarray(packed_model.apply(packed_variables, features, train=False))
  assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
  accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert accuracy == pytest.approx(summary["test_accuracy"])
