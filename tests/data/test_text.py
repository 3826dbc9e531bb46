"""Byte-level text corpus: reading, the split, the training and evaluation iterators."""

import itertools
import os

import numpy as np
import pytest

from shiftjax.data import text


@pytest.fixture
def corpus_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(bytes(range(256)) * 4)  # 1024 bytes, every byte value
  return str(path)


def test_read_bytes_returns_the_file_as_uint8(corpus_file):
  data = text.read_bytes(corpus_file)
  assert data.dtype == np.uint8 and data.shape == (1024,)
  assert data.tobytes() == bytes(range(256)) * 4
  np.testing.assert_array_equal(text.load_corpus(corpus_file), data)


def test_missing_file_error_names_the_path(tmp_path):
  path = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    text.read_bytes(path)


def test_missing_kjv_corpus_error_names_path_and_apt_command(monkeypatch, tmp_path):
  monkeypatch.setattr(text, "KJV_DATA", str(tmp_path / "bible.data"))
  with pytest.raises(FileNotFoundError, match="bible.data.*apt-get install -y bible-kjv-text"):
    text.load_corpus()


def test_missing_bible_program_error_names_the_apt_command(monkeypatch, tmp_path):
  data = tmp_path / "bible.data"
  data.write_bytes(b"")
  monkeypatch.setattr(text, "KJV_DATA", str(data))
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="`bible` program.*apt-get install"):
    text.kjv_text()


@pytest.mark.skipif(not os.path.exists(text.KJV_DATA), reason="bible-kjv-text not installed")
def test_kjv_corpus_is_the_verses_in_order():
  data = text.load_corpus()
  assert data.shape == (text.KJV_NUM_BYTES,)
  lines = data.tobytes().split(b"\n")
  assert lines[0] == b"In the beginning God created the heaven and the earth."
  assert lines[-2] == b"The grace of our Lord Jesus Christ be with you all. Amen."
  assert len(lines) - 1 == 31102  # verses; the text ends with a newline
  assert data.max() < 128


def test_split_is_contiguous_with_validation_last():
  data = np.arange(100, dtype=np.uint8)
  train, val = text.split(data, 0.05)
  np.testing.assert_array_equal(train, data[:95])
  np.testing.assert_array_equal(val, data[95:])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_fraction_outside_zero_one(fraction):
  with pytest.raises(ValueError, match=f"got {fraction}"):
    text.split(np.zeros(100, np.uint8), fraction)


def test_split_rejects_a_corpus_too_small():
  with pytest.raises(ValueError, match="10 bytes is too small"):
    text.split(np.zeros(10, np.uint8), 0.05)


def test_random_windows_are_shifted_corpus_windows_and_seeded(corpus_file):
  data = text.read_bytes(corpus_file)
  batches = list(itertools.islice(text.random_windows(data, 8, 16, seed=3), 5))
  for batch in batches:
    assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
    assert batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # The corpus counts up mod 256, so each window does too: a window of the corpus.
    np.testing.assert_array_equal(
        batch["targets"], (batch["inputs"] + 1) % 256)
  again = list(itertools.islice(text.random_windows(data, 8, 16, seed=3), 5))
  other = next(text.random_windows(data, 8, 16, seed=4))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(batches[0]["inputs"], other["inputs"])


def test_random_windows_reach_both_ends_of_the_corpus():
  data = np.arange(10, dtype=np.uint8)
  batch = next(text.random_windows(data, 2000, 4, seed=0))
  assert batch["inputs"][:, 0].min() == 0
  assert batch["targets"][:, -1].max() == 9


def test_sequential_windows_cover_every_target_once():
  data = np.arange(103, dtype=np.uint8)
  batches = list(text.sequential_windows(data, batch_size=4, seq_len=10))
  assert text.num_sequential_windows(data, 10) == 10
  assert [b["inputs"].shape[0] for b in batches] == [4, 4, 2]
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  np.testing.assert_array_equal(targets, np.arange(1, 101))
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  np.testing.assert_array_equal(inputs, np.arange(0, 100))


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0, seq_len=4), "batch_size must be >= 1, got 0"),
    (dict(batch_size=2, seq_len=0), "seq_len must be >= 1, got 0"),
    (dict(batch_size=2, seq_len=10), "11 bytes does not fit in a corpus of 10 bytes"),
])
def test_iterators_reject_bad_sizes(kwargs, message):
  data = np.zeros(10, np.uint8)
  with pytest.raises(ValueError, match=message):
    next(text.random_windows(data, **kwargs))
  with pytest.raises(ValueError, match=message):
    next(text.sequential_windows(data, **kwargs))


def test_bigram_bits_per_byte_scores_the_windows_targets_by_pair_counts():
  train = np.array([0, 1, 0, 1, 0], np.uint8)  # pairs: 0->1 twice, 1->0 twice
  validation = np.array([0, 1, 0, 1, 0, 7], np.uint8)  # 2 windows of 2: targets 1, 0, 1, 0
  assert text.bigram_bits_per_byte(train, validation, 2, smoothing=0.0) == 0.0
  expected = -np.log2(3 / 258)  # (2 + 1) / (2 + 256 * 1), every target pair alike
  np.testing.assert_allclose(text.bigram_bits_per_byte(train, validation, 2, smoothing=1.0),
                             expected, rtol=1e-12)
