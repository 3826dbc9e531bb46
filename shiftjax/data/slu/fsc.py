"""Fluent Speech Commands as a tfds dataset, prepared from a manually downloaded copy.

FSC cannot be downloaded by a script (it needs a sign-up), so
``prepare_fluent_speech_commands(data_dir, manual_dir)`` reads a copy in its standard
layout::

    <manual_dir>/data/{train,valid,test}_data.csv   columns: (index), path, speakerId,
                                                    transcription, action, object, location
    <manual_dir>/wavs/speakers/<speakerId>/<uuid>.wav   16 kHz mono 16-bit PCM

(``manual_dir`` may also be the folder above, holding ``fluent_speech_commands_dataset``)
and writes the tfds dataset ``fluent_speech_commands`` (array_record) with splits
``train``, ``valid``, ``test`` (23,132 / 3,118 / 3,793 utterances in FSC v1) and features

    audio          int16 [num_samples]   16 kHz waveform
    label          ClassLabel(31)        the intent, ``intents.INTENTS[label]``
    action, object, location  ClassLabel  the three slots (``intents.ACTIONS`` ...)
    speaker_id     Text
    transcription  Text

TensorFlow is not needed. tfds's ``Audio`` feature imports TensorFlow even to encode a
waveform, so audio is an int16 ``Tensor`` feature (the same values ``Audio`` would decode
to; the sample rate is in the dataset's metadata); wav files are read with the standard
library ``wave`` module. ``tfds.data_source('fluent_speech_commands', data_dir=...)``
then serves it (the builder need not be imported to read).
"""

from __future__ import annotations

import contextlib
import csv
import os
import wave
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from shiftjax.data.slu import intents

SAMPLE_RATE = 16000
FSC_SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")
_FOLDER = "fluent_speech_commands_dataset"


def read_wav(path: str | os.PathLike, sample_rate: int | None = SAMPLE_RATE) -> np.ndarray:
  """A mono 16-bit PCM wav file -> int16 ``[num_samples]``.

  Raises ValueError naming the file when it is not mono 16-bit PCM, or not at
  ``sample_rate`` Hz (unless ``sample_rate`` is None).
  """
  with wave.open(os.fspath(path), "rb") as w:
    channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
    if channels != 1 or width != 2:
      raise ValueError(f"{path}: expected mono 16-bit PCM, got {channels} channel(s) of "
                       f"{8 * width} bits")
    if sample_rate is not None and rate != sample_rate:
      raise ValueError(f"{path}: expected {sample_rate} Hz, got {rate} Hz")
    return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int16)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE):
  """int16 ``[num_samples]`` -> a mono 16-bit PCM wav file."""
  with wave.open(os.fspath(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(np.asarray(audio, "<i2").tobytes())


def slu_features() -> tfds.features.FeaturesDict:
  """The features of FSC-style datasets (``fluent_speech_commands``, ``synthetic_slu``)."""
  return tfds.features.FeaturesDict({
      # Raw little-endian bytes: the default encoding stores each sample as a varint
      # (up to 10 bytes for a negative int16).
      "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                    encoding=tfds.features.Encoding.BYTES),
      "label": tfds.features.ClassLabel(names=intents.INTENT_NAMES),
      "action": tfds.features.ClassLabel(names=intents.ACTIONS),
      "object": tfds.features.ClassLabel(names=intents.OBJECTS),
      "location": tfds.features.ClassLabel(names=intents.LOCATIONS),
      "speaker_id": tfds.features.Text(),
      "transcription": tfds.features.Text(),
  })


def slu_example(audio: np.ndarray, action: str, obj: str, location: str, speaker_id: str,
                transcription: str) -> dict[str, Any]:
  """One example of ``slu_features``; ValueError if the slots are not an FSC intent."""
  return {"audio": np.asarray(audio, np.int16),
          "label": intents.intent_index(action, obj, location),
          "action": action, "object": obj, "location": location,
          "speaker_id": speaker_id, "transcription": transcription}


def find_fsc_root(manual_dir: str | os.PathLike) -> epath.Path:
  """The folder holding ``data/`` and ``wavs/``: ``manual_dir`` or its FSC subfolder."""
  manual_dir = epath.Path(manual_dir)
  for root in (manual_dir, manual_dir / _FOLDER):
    if (root / "data" / "train_data.csv").exists():
      return root
  raise FileNotFoundError(
      f"no Fluent Speech Commands copy in {manual_dir}: expected "
      f"{manual_dir}/data/train_data.csv (or {manual_dir}/{_FOLDER}/data/train_data.csv) "
      "and the wavs/speakers/ folder. Download FSC (fluent.ai, free sign-up), unpack it "
      "and pass that folder as manual_dir.")


def read_fsc_csv(path: str | os.PathLike) -> list[dict[str, str]]:
  """Rows of an FSC split file as dicts of ``CSV_COLUMNS``; ValueError naming what is off."""
  with open(os.fspath(path), newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
    return [{c: row[c] for c in CSV_COLUMNS} for row in reader]


@contextlib.contextmanager
def in_memory_shuffle():
  """Lets tfds write a split of any size without TensorFlow.

  tfds keeps a split's serialized examples in memory up to 1 GB and spills the rest to
  temporary files through ``tf.io.gfile``, which needs TensorFlow; FSC's train split is
  about 1.5 GB. Raising the limit keeps it in memory (the machine has the RAM).
  """
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  old = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = 1 << 62
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = old


class FluentSpeechCommands(tfds.core.GeneratorBasedBuilder):
  """Fluent Speech Commands (Lugosch et al. 2019), from a manually downloaded copy."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Audio as int16 tensors; intent = (action, object, location)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download Fluent Speech Commands from fluent.ai (free sign-up), unpack it and pass "
      "the folder holding data/ and wavs/ as manual_dir.")
  # Nothing is downloaded, so no URL checksums; looking them up would also need
  # `importlib_resources`, which tfds does not install.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("English spoken commands to a smart-home assistant: 30,043 "
                     "utterances by 97 speakers, 31 intents (action, object, location)."),
        features=slu_features(),
        supervised_keys=("audio", "label"),
        homepage="https://fluent.ai/fluent-speech-commands-a-dataset-for-spoken-language-understanding-research/",
        citation=("@inproceedings{lugosch2019speech, title={Speech Model Pre-training for "
                  "End-to-End Spoken Language Understanding}, author={Lugosch, Loren and "
                  "Ravanelli, Mirco and Ignoto, Patrick and Tomar, Vikrant Singh and "
                  "Bengio, Yoshua}, booktitle={Interspeech}, year={2019}}"),
        metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
    )

  def _split_generators(self, dl_manager):
    root = find_fsc_root(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in FSC_SPLITS}

  def _generate_examples(self, root, split) -> Iterator[tuple[str, dict[str, Any]]]:
    csv_path = root / "data" / f"{split}_data.csv"
    for row in read_fsc_csv(csv_path):
      audio = read_wav(root / row["path"])
      try:
        example = slu_example(audio, row["action"], row["object"], row["location"],
                              row["speakerId"], row["transcription"])
      except ValueError as e:
        raise ValueError(f"{csv_path}, {row['path']}: {e}") from None
      yield row["path"], example


def prepare_fluent_speech_commands(data_dir: str | os.PathLike | None,
                                   manual_dir: str | os.PathLike) -> str:
  """Prepares ``fluent_speech_commands`` (array_record) in ``data_dir`` from ``manual_dir``.

  Idempotent: nothing is read when the dataset is already prepared there. Returns the
  prepared dataset's directory. Takes a few minutes for the full 30k utterances.
  """
  builder = FluentSpeechCommands(data_dir=None if data_dir is None else os.fspath(data_dir),
                                 file_format="array_record")
  if not builder.is_prepared():
    root = find_fsc_root(manual_dir)  # A clear error before tfds starts.
    with in_memory_shuffle():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(root), try_download_gcs=False))
  return os.fspath(builder.data_dir)
