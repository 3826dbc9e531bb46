"""Byte-level text corpora for language models: reading, a split, batch iterators.

A corpus is a 1-D ``uint8`` numpy array of bytes; a token is a byte (vocabulary 256), so
any file is a corpus and nothing needs a tokenizer.

Default corpus: the King James Bible (1611; the text is public domain, its copyright
long expired), from Debian's ``bible-kjv-text`` package (version 4.38, itself "for
unrestricted use"; its reader ``bible-kjv`` is GPL-2+). The package does not hold plain
text: ``/usr/lib/bible.data`` (1,740,565 bytes) is the Bible Retrieval System's own
compressed, randomly accessible format (magic ``EC02``), which only its reader, the
``bible`` program of package ``bible-kjv`` (installed with it as a recommended
package), decodes. ``kjv_text`` runs ``bible -f -p /usr/lib Gen1:1-Rev22:21`` (about
0.1 s), which prints one verse a line after its reference (``Ge1:1 In the beginning God
created ...``), and drops the references: the result is the 31,102 verses in order, one
a line, 4,137,850 bytes of printable ASCII (``KJV_NUM_BYTES``). With the default 5 %
validation split, training gets the first 3,930,958 bytes (Genesis to Colossians 1:11,
mid-verse) and validation the last 206,892 (from there to the end of Revelation).

Batches are dicts of ``int32`` arrays: ``{'inputs': [B, T], 'targets': [B, T]}`` with
``targets[:, t] == inputs[:, t + 1]`` inside the corpus, i.e. each row is one window of
``T + 1`` consecutive bytes, ``inputs = window[:-1]`` and ``targets = window[1:]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterator

import numpy as np

KJV_DATA_DIR = "/usr/lib"
KJV_DATA = os.path.join(KJV_DATA_DIR, "bible.data")
KJV_NUM_BYTES = 4_137_850
KJV_INSTALL = "apt-get install -y bible-kjv-text bible-kjv"
# The whole book from the first verse to the last; -f turns pretty-printing off, so each
# verse is one line after its reference.
_KJV_COMMAND = ("bible", "-f", "-p", KJV_DATA_DIR, "Gen1:1-Rev22:21")

Batch = dict[str, np.ndarray]


def kjv_text() -> bytes:
  """The King James Bible as plain text: verses in order, one a line, no references.

  Raises:
    FileNotFoundError: the data file or the ``bible`` program is missing (the message
      names the path and the apt command that installs it).
  """
  if not os.path.exists(KJV_DATA):
    raise FileNotFoundError(
        f"King James Bible corpus not found at {KJV_DATA}; install it with `{KJV_INSTALL}`")
  if shutil.which(_KJV_COMMAND[0]) is None:
    raise FileNotFoundError(
        f"the `bible` program that decodes {KJV_DATA} is not on PATH; install it with "
        f"`{KJV_INSTALL}`")
  out = subprocess.run(_KJV_COMMAND, check=True, capture_output=True).stdout
  # Each line is "<Book><chapter>:<verse> <text>"; the text starts after the first space.
  return b"".join(line.split(b" ", 1)[1] + b"\n" for line in out.splitlines())


def read_bytes(path: str) -> np.ndarray:
  """The bytes of the file at ``path`` as a 1-D ``uint8`` array (a corpus)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"text corpus not found: {path}")
  with open(path, "rb") as f:
    return np.frombuffer(f.read(), dtype=np.uint8)


def load_corpus(path: str | None = None) -> np.ndarray:
  """A corpus as ``uint8`` bytes: the file at ``path``, or the King James Bible if None."""
  if path is None:
    return np.frombuffer(kjv_text(), dtype=np.uint8)
  return read_bytes(path)


def split(data: np.ndarray, validation_fraction: float = 0.05
          ) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic contiguous split: ``(train, validation)``, validation the last part.

  A contiguous tail (not random windows) keeps validation text unseen in training, even
  as the overlapping context of a training window.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  num_val = int(round(len(data) * validation_fraction))
  if num_val < 2 or len(data) - num_val < 2:
    raise ValueError(f"a corpus of {len(data)} bytes is too small to split with "
                     f"validation_fraction={validation_fraction}")
  return data[:-num_val], data[-num_val:]


def _check_windows(data: np.ndarray, batch_size: int, seq_len: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if len(data) < seq_len + 1:
    raise ValueError(f"a window of seq_len + 1 = {seq_len + 1} bytes does not fit in a "
                     f"corpus of {len(data)} bytes")


def _batch(windows: np.ndarray) -> Batch:
  windows = windows.astype(np.int32)
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def random_windows(data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
                   ) -> Iterator[Batch]:
  """Endless training batches of windows at uniformly random offsets.

  Yields ``{'inputs': [batch_size, seq_len], 'targets': [batch_size, seq_len]}`` (int32);
  the same seed gives the same sequence of batches.
  """
  _check_windows(data, batch_size, seq_len)
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    yield _batch(data[starts[:, None] + offsets])


def num_sequential_windows(data: np.ndarray, seq_len: int) -> int:
  """How many windows ``sequential_windows`` yields in all (over all its batches)."""
  return (len(data) - 1) // seq_len


def sequential_windows(data: np.ndarray, batch_size: int, seq_len: int
                       ) -> Iterator[Batch]:
  """One pass of non-overlapping windows in order, for evaluation.

  Window ``i`` predicts bytes ``i * seq_len + 1 .. (i + 1) * seq_len``, so every byte but
  the first is a target exactly once, except a tail of fewer than ``seq_len`` bytes that
  no whole window covers (dropped). The last batch has fewer rows when the windows do
  not fill it (a second compiled shape under ``jit``, once).
  """
  _check_windows(data, batch_size, seq_len)
  num = num_sequential_windows(data, seq_len)
  offsets = np.arange(seq_len + 1)
  for first in range(0, num, batch_size):
    starts = np.arange(first, min(first + batch_size, num)) * seq_len
    yield _batch(data[starts[:, None] + offsets])


def bigram_bits_per_byte(train: np.ndarray, validation: np.ndarray, seq_len: int,
                         smoothing: float = 0.1) -> float:
  """Bits per byte of a byte bigram table on the bytes ``sequential_windows(validation,
  ., seq_len)`` predicts: the score of a model that sees only the previous byte (the
  table is the training split's pair counts plus ``smoothing``), a reference for a
  language model that learned no more than that."""
  counts = np.zeros((256, 256))
  np.add.at(counts, (train[:-1], train[1:]), 1.0)
  probs = (counts + smoothing) / (counts + smoothing).sum(axis=1, keepdims=True)
  n = num_sequential_windows(validation, seq_len) * seq_len
  return float(-np.log2(probs[validation[:n], validation[1:n + 1]]).mean())
