"""Data: offline Fashion-MNIST for tfds, resumable training batches, exact evaluation."""

import collections
import dataclasses
import io
import itertools
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from shiftjax import data as sjd
from shiftjax.data import datasets
from shiftjax.data import fashion_mnist
from shiftjax.data import imagenet
from shiftjax.data import pipeline
from shiftjax.data import readers

SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
requires_debian_files = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SOURCE_DIR, "t10k-labels-idx1-ubyte.gz")),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
  """A tfds data_dir holding the real Fashion-MNIST, prepared once per session."""
  data_dir = tmp_path_factory.mktemp("tfds")
  sjd.prepare_fashion_mnist(data_dir)
  return data_dir


def synthetic(n=103, shape=(6, 5, 3), seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  return sjd.ArraySource(images, np.arange(n) % 10)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Offline Fashion-MNIST.


@requires_debian_files
def test_prepared_fashion_mnist_is_the_tfds_dataset(fashion_dir):
  version_dir = fashion_dir / "fashion_mnist" / "3.0.1"
  info = json.loads((version_dir / "dataset_info.json").read_text())
  assert info["name"] == "fashion_mnist" and info["fileFormat"] == "array_record"
  assert info["moduleName"] == "tensorflow_datasets.image_classification.mnist"
  assert (version_dir / "fashion_mnist-train.array_record-00000-of-00001").is_file()

  # The ordinary tfds reader serves it, with the official builder's features.
  ds = tfds.data_source("fashion_mnist", data_dir=fashion_dir, download=False)
  assert len(ds["train"]) == 60_000 and len(ds["test"]) == 10_000
  first = ds["train"][0]
  assert first["image"].shape == (28, 28, 1) and first["image"].dtype == np.uint8
  # tfds stores examples in the order of its key hash, as it would the official copy.
  train_images = sjd.read_idx(os.path.join(SOURCE_DIR, "train-images-idx3-ubyte.gz"))
  train_labels = sjd.read_idx(os.path.join(SOURCE_DIR, "train-labels-idx1-ubyte.gz"))
  matches = np.flatnonzero((train_images == first["image"][..., 0]).all(axis=(1, 2)))
  assert len(matches) and (train_labels[matches] == first["label"]).any()
  assert ds["train"].dataset_info.features["label"].names[0] == "T-shirt/top"

  # The whole test split holds exactly the idx file's (image, label) pairs.
  test = sjd.load_split("fashion_mnist", "test", data_dir=fashion_dir)
  assert test.images.shape == (10_000, 28, 28, 1) and test.labels.dtype == np.int32
  assert set(np.unique(test.labels)) == set(range(10))
  idx_images = sjd.read_idx(os.path.join(SOURCE_DIR, "t10k-images-idx3-ubyte.gz"))
  idx_labels = sjd.read_idx(os.path.join(SOURCE_DIR, "t10k-labels-idx1-ubyte.gz"))
  assert (collections.Counter(zip(map(bytes, test.images), test.labels.tolist()))
          == collections.Counter(zip(map(bytes, idx_images), idx_labels.tolist())))
  assert "tensorflow" not in sys.modules


@requires_debian_files
def test_prepare_is_idempotent(fashion_dir):
  files = sorted((fashion_dir / "fashion_mnist").rglob("*"))
  mtimes = [f.stat().st_mtime_ns for f in files]
  # Already prepared: the sources are not even looked at.
  out = sjd.prepare_fashion_mnist(fashion_dir, source_dir="/nonexistent")
  assert out == os.fspath(fashion_dir / "fashion_mnist" / "3.0.1")
  assert sorted((fashion_dir / "fashion_mnist").rglob("*")) == files
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_prepare_without_sources_says_what_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    sjd.prepare_fashion_mnist(tmp_path / "tfds", source_dir=tmp_path / "missing")
  assert not (tmp_path / "tfds" / "fashion_mnist" / "3.0.1").exists()


def test_png_encoder_round_trips():
  import PIL.Image  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (7, 5), dtype=np.uint8)
  decoded = PIL.Image.open(io.BytesIO(fashion_mnist.encode_png_gray(image)))
  assert decoded.mode == "L"
  np.testing.assert_array_equal(np.asarray(decoded), image)


def test_read_idx_rejects_other_files(tmp_path):
  bad = tmp_path / "bad-idx1-ubyte"
  bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
  with pytest.raises(ValueError, match="5 bytes"):
    sjd.read_idx(bad)
  bad.write_bytes(b"PK\x03\x04")
  with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
    sjd.read_idx(bad)


@requires_debian_files
def test_fashion_mnist_pipeline_on_real_data(fashion_dir):
  train = sjd.make_dataset("fashion_mnist", "train[:1024]", batch_size=128, train=True,
                           seed=0, data_dir=fashion_dir)
  batch = next(iter(train))
  assert batch["image"].shape == (128, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["label"].max() < 10


# Training batches.


def test_batch_is_a_function_of_seed_and_step():
  source = synthetic()
  pipe = sjd.TrainPipeline(source, batch_size=16, seed=7, augment=sjd.CropFlip(1, True))
  from_zero = list(itertools.islice(pipe.iterator(0), 20))
  for k in (0, 5, 6, 13):
    # A fresh pipeline (a resumed run) started at step k, with and without prefetch.
    resumed = sjd.TrainPipeline(source, batch_size=16, seed=7,
                                augment=sjd.CropFlip(1, True))
    for prefetch in (0, 3):
      it = resumed.iterator(start_step=k, prefetch=prefetch)
      for step in range(k, 20):
        assert_batches_equal(next(it), from_zero[step])
      it.close()
  assert len(list(pipe.iterator(3, num_steps=4))) == 4
  other = sjd.TrainPipeline(source, batch_size=16, seed=8, augment=sjd.CropFlip(1, True))
  assert not np.array_equal(other.batch(0)["image"], from_zero[0]["image"])


def test_epochs_reshuffle_and_drop_the_remainder():
  pipe = sjd.TrainPipeline(synthetic(103), batch_size=16, seed=0)
  assert pipe.steps_per_epoch == 6
  epochs = [np.concatenate([pipe.indices(e * 6 + i) for i in range(6)]) for e in range(3)]
  for idx in epochs:
    assert len(idx) == 96 and len(np.unique(idx)) == 96
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  np.testing.assert_array_equal(pipe.batch(7)["label"],
                                pipe.source.labels[pipe.indices(7)])


def test_hosts_split_the_global_batch():
  source = synthetic()
  aug = sjd.CropFlip(2, True)
  whole = sjd.TrainPipeline(source, batch_size=16, seed=1, augment=aug,
                            process_index=0, process_count=1)
  for step in (0, 9):
    parts = [sjd.TrainPipeline(source, batch_size=16, seed=1, augment=aug,
                               process_index=p, process_count=4).batch(step)
             for p in range(4)]
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([b[k] for b in parts]),
                                    whole.batch(step)[k])


def test_batch_size_errors():
  with pytest.raises(ValueError, match="batch_size 10 must be divisible by the number "
                                       "of processes 4"):
    sjd.TrainPipeline(synthetic(), batch_size=10, seed=0, process_index=1,
                      process_count=4)
  with pytest.raises(ValueError, match="batch_size 6 must be divisible"):
    sjd.make_dataset("mnist", batch_size=6, train=False, process_count=4,
                     process_index=0)
  with pytest.raises(ValueError, match="larger than the split"):
    sjd.TrainPipeline(synthetic(10), batch_size=16, seed=0)
  with pytest.raises(ValueError, match="seed"):
    sjd.TrainPipeline(synthetic(), batch_size=16, seed=-1)


def test_prefetcher_reraises_and_stops():
  def produce():
    yield 1
    yield 2
    raise RuntimeError("boom")

  it = sjd.Prefetcher(produce(), 1)
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(RuntimeError, match="boom"):
    next(it)
  for stop in ("close", "drop"):
    endless = sjd.Prefetcher(itertools.count(), 2)
    thread = endless._thread  # pylint: disable=protected-access
    assert next(endless) == 0
    if stop == "close":
      endless.close()
    del endless
    thread.join(timeout=5)
    assert not thread.is_alive()


# Evaluation.


@pytest.mark.parametrize("process_count", [1, 4])
def test_eval_sees_every_example_once_in_order(process_count):
  source = synthetic(103)
  hosts = [sjd.EvalPipeline(source, batch_size=32, process_index=p,
                            process_count=process_count, prefetch=p % 2)
           for p in range(process_count)]
  per_host = [list(h) for h in hosts]
  assert all(len(batches) == 4 == len(h) for batches, h in zip(per_host, hosts))
  images, labels, masks = [], [], []
  for i in range(4):
    for batches in per_host:
      b = batches[i]
      assert b["image"].shape == (32 // process_count, 6, 5, 3)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      images.append(b["image"]), labels.append(b["label"]), masks.append(b["mask"])
  images, labels, mask = map(np.concatenate, (images, labels, masks))
  assert mask.sum() == 103 and mask[:103].all()
  np.testing.assert_array_equal(images[:103], source.images)
  np.testing.assert_array_equal(labels[:103], source.labels)
  assert not images[103:].any() and not labels[103:].any()


# Augmentation.


def test_crop_is_a_shifted_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (9, 7, 5, 2), dtype=np.uint8)
  pad = 2
  params = sjd.CropFlip(pad, True).sample(rng, 9)
  out = sjd.CropFlip(pad, True).apply(images, params)
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  for b in range(9):
    dy, dx = params["dy"][b], params["dx"][b]
    window = padded[b, dy:dy + 7, dx:dx + 5]
    expected = window[:, ::-1] if params["flip"][b] else window
    np.testing.assert_array_equal(out[b], expected)
  centre = sjd.crop_and_flip(images, np.full(9, pad), np.full(9, pad), np.zeros(9, bool),
                             pad)
  np.testing.assert_array_equal(centre, images)
  assert params["flip"].any()
  assert not sjd.CropFlip(pad, False).sample(rng, 50)["flip"].any()


def test_standard_augmentations():
  assert sjd.get_spec("fashion_mnist").augment == sjd.CropFlip(pad=2, flip=True)
  assert sjd.get_spec("mnist").augment == sjd.CropFlip(pad=2, flip=False)
  assert sjd.get_spec("cifar10").augment == sjd.CropFlip(pad=4, flip=True)


def test_pipeline_augments_with_windows_of_the_originals():
  source = synthetic(40, shape=(8, 8, 1))
  pipe = sjd.TrainPipeline(source, batch_size=8, seed=3, augment=sjd.CropFlip(2, True))
  plain = sjd.TrainPipeline(source, batch_size=8, seed=3)
  for step in (0, 6):
    aug, orig = pipe.batch(step)["image"], plain.batch(step)["image"]
    assert aug.shape == orig.shape and aug.dtype == np.uint8
    padded = np.pad(orig, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for b in range(8):
      windows = [w[:, ::f] for dy in range(5) for dx in range(5) for f in (1, -1)
                 for w in [padded[b, dy:dy + 8, dx:dx + 8]]]
      assert any(np.array_equal(aug[b], w) for w in windows)


def test_normalize():
  images = np.full((2, 4, 4, 3), 255, np.uint8)
  out = np.asarray(sjd.normalize(images, "cifar10"))
  expected = (1 - np.array(sjd.CIFAR10_MEAN)) / np.array(sjd.CIFAR10_STD)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  assert out.dtype == np.float32


# tfds datasets through mock_data (no files, no TensorFlow).


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_mocked_tfds_datasets(name, shape):
  with tfds.testing.mock_data(num_examples=37, policy=tfds.testing.MockPolicy.USE_CODE):
    train = sjd.make_dataset(name, batch_size=8, train=True, seed=0)
    evaluation = sjd.make_dataset(name, batch_size=8, train=False)
  assert train.steps_per_epoch == 4
  for batch in itertools.islice(train.iterator(2), 3):
    assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
  assert [int(b["mask"].sum()) for b in evaluation] == [8, 8, 8, 8, 5]


def test_unknown_and_unprepared_datasets(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10, "
                                       "fashion_mnist, fluent_speech_commands, "
                                       "imagenet2012, mnist, speech_commands, "
                                       "synthetic_slu"):
    sjd.make_dataset("imagenet", batch_size=8, train=True)
  with pytest.raises(FileNotFoundError, match="mnist is not prepared"):
    sjd.make_dataset("mnist", batch_size=8, train=True, data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="prepare_fashion_mnist"):
    sjd.make_dataset("fashion_mnist", batch_size=8, train=False, data_dir=tmp_path)


# Readers chosen by the spec (tests/test_layout.py checks the package has no import cycle).


def test_every_reader_has_a_factory():
  assert set(readers.FACTORIES) == set(datasets.READERS)
  for name, spec in sjd.SPECS.items():
    expected = (imagenet.make_dataset if name == imagenet.NAME
                else pipeline.make_in_memory_dataset)
    assert readers.factory(spec) is expected, name
  assert sjd.get_spec(imagenet.NAME).reader == "streaming"


def test_the_reader_field_chooses_the_reader(monkeypatch):
  calls = []
  for reader in datasets.READERS:
    monkeypatch.setitem(readers.FACTORIES, reader,
                        lambda name, split, reader=reader, **kw: calls.append((reader, name,
                                                                               kw)))
  # Swapping the field swaps the reader, whatever the dataset or its max_bytes.
  cifar = sjd.get_spec("cifar10")
  monkeypatch.setitem(sjd.SPECS, "cifar10", dataclasses.replace(cifar, reader="streaming"))
  in_memory_imagenet = dataclasses.replace(imagenet.SPEC, reader="in_memory", max_bytes=0)
  monkeypatch.setitem(sjd.SPECS, imagenet.NAME, in_memory_imagenet)
  sjd.make_dataset("cifar10", batch_size=8, train=True)
  sjd.make_dataset(imagenet.NAME, batch_size=8, train=False, prefetch=0)
  assert [c[:2] for c in calls] == [("streaming", "cifar10"), ("in_memory", imagenet.NAME)]
  # prefetch reaches the reader only when given: each keeps its own default otherwise.
  assert "prefetch" not in calls[0][2] and calls[1][2]["prefetch"] == 0


def test_imagenet_refuses_an_augmentation_in_place_of_its_crop(tmp_path):
  # Refused before any file is opened (tmp_path holds none).
  with pytest.raises(ValueError, match="augment must be True or False"):
    imagenet.make_dataset(batch_size=8, train=True, data_dir=tmp_path,
                          augment=sjd.CropFlip(pad=4, flip=True))


def test_max_bytes_limits_memory_but_does_not_choose_the_reader(monkeypatch):
  spec = dataclasses.replace(sjd.get_spec("cifar10"), max_bytes=0)
  monkeypatch.setitem(sjd.SPECS, "cifar10", spec)
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="over the 0 MiB read into memory"):
      sjd.make_dataset("cifar10", batch_size=4, train=False)


def test_imagenet_is_streamed_by_its_reader():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    evaluation = sjd.make_dataset(imagenet.NAME, batch_size=4, train=False, image_size=16)
    unfetched = sjd.make_dataset(imagenet.NAME, batch_size=4, train=False, image_size=16,
                                 prefetch=0)
  try:
    assert isinstance(evaluation.source, imagenet.ImageSource)
    assert evaluation.prefetch == 4 and unfetched.prefetch == 0
    batch = evaluation.batch(1)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].tolist() == [
        True, True, False, False]
  finally:
    evaluation.source.close()
    unfetched.source.close()


def test_bad_reader_is_rejected_by_name():
  with pytest.raises(ValueError, match="dataset 'x': unknown reader 'streamed'; allowed: "
                                       "in_memory, streaming"):
    sjd.DatasetSpec("x", (2, 2, 1), 2, (0.5,), (0.5,), reader="streamed")
  with pytest.raises(ValueError, match="unknown reader 'disk'"):
    dataclasses.replace(sjd.get_spec("synthetic_slu"), reader="disk")
