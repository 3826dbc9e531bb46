"""Speech input pipelines: waveforms -> log-mel "images" the image training loop can use.

A speech split is read once (``tfds.data_source``, no TensorFlow for the FSC-style
datasets), each waveform is turned into log-mel features on the CPU with
``shiftjax.audio.log_mel`` (jit, in chunks), expressed in dB below the utterance's
loudest bin, clipped to ``top_db`` and stored as uint8 ``[N, T, n_mels, 1]``:
``uint8 = round(255 * (1 + dB / top_db))`` (0.3 dB steps for ``top_db=80``; 0 is
silence and padding). Utterances shorter than ``max_seconds`` are padded with silence,
longer ones truncated (and counted in the log).

The result is an ordinary ``ArraySource``, so the image pipelines serve it unchanged:
``TrainPipeline`` with ``SpecAugment`` (time and frequency masks, the ``sample``/``apply``
interface of ``augment.CropFlip``) and ``EvalPipeline``; ``datasets.normalize`` maps the
uint8 features to zero mean and unit variance with the spec's statistics on device.

Why features are precomputed rather than computed in the model step: the features of
an utterance are the same every epoch, so computing them once (under a minute for the
12,000 training utterances) costs less than one epoch of recomputing them inside
the training step, and uint8 features take 1/4 of the memory of the int16 audio
(12,000 utterances: 135 MB). SpecAugment then works on the uint8 features.

Datasets (``SPECS``; each is a ``SpeechDatasetSpec``, a ``DatasetSpec`` with a frontend):

* ``synthetic_slu``: FSC's 31 intents spoken by espeak-ng/flite voices, unseen voices
  in the test split (``slu.synthetic``; build with ``experiments/make_synthetic_slu.py``).
* ``fluent_speech_commands``: the real FSC from a manually downloaded copy
  (``slu.fsc.prepare_fluent_speech_commands``).
* ``speech_commands``: tfds's Speech Commands v0.02 (12 classes, 1 s clips). Its
  preparation and its wav decoding need TensorFlow.

``shiftjax.data`` lists them beside the image datasets, so ``shiftjax.data.make_dataset``
and the training launcher serve them like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from shiftjax import audio
from shiftjax.data import datasets
from shiftjax.data import pipeline
from shiftjax.data.slu import intents

# Records read per data_source call, and utterances per feature computation.
_READ_CHUNK = 1024
_FEATURE_CHUNK = 128


# --------------------------------------------------------------------------- SpecAugment


def band_masks(length: int, starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
  """bool ``[B, length]``: inside any of the bands ``starts, widths [B, M]``."""
  pos = np.arange(length)
  inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
  return inside.any(axis=-2)


@dataclasses.dataclass(frozen=True)
class SpecAugment:
  """SpecAugment masking (no time warp) of uint8 features ``[B, T, F, C]``.

  Each example gets ``time_masks`` bands of ``U{0..max_time}`` frames and
  ``freq_masks`` bands of ``U{0..max_freq}`` mel bins, set to ``fill`` (the dataset's
  mean, so they normalize to about 0). Randomness is drawn for the global batch
  (``sample``) and applied to any slice of it (``apply``), like ``augment.CropFlip``.
  """
  time_masks: int = 2
  max_time: int = 20
  freq_masks: int = 2
  max_freq: int = 8
  fill: int = 0

  def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Unit-interval positions ``[n, masks]``; ``apply`` scales them to the features."""
    return {"t_pos": rng.random((n, self.time_masks)),
            "t_width": rng.integers(0, self.max_time + 1, size=(n, self.time_masks)),
            "f_pos": rng.random((n, self.freq_masks)),
            "f_width": rng.integers(0, self.max_freq + 1, size=(n, self.freq_masks))}

  def apply(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 features ``[B, T, F, C]`` with ``sample``'s time and frequency bands masked."""
    _, t, f, _ = images.shape
    t_width = np.minimum(params["t_width"], t)
    f_width = np.minimum(params["f_width"], f)
    t_start = np.floor(params["t_pos"] * (t - t_width + 1)).astype(np.int64)
    f_start = np.floor(params["f_pos"] * (f - f_width + 1)).astype(np.int64)
    mask = (band_masks(t, t_start, t_width)[:, :, None]
            | band_masks(f, f_start, f_width)[:, None, :])
    return np.where(mask[..., None], np.asarray(self.fill, images.dtype), images)


# --------------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class SpeechDatasetSpec(datasets.DatasetSpec):
  """A ``DatasetSpec`` whose "images" are uint8 log-mel features ``[T, n_mels, 1]``.

  Attributes (beyond ``DatasetSpec``'s):
    frontend: the log-mel parameters (``frontend.sample_rate`` is the audio's).
    max_seconds: utterances are padded or truncated to this length; with the frontend
      it fixes ``image_shape``.
    top_db: dynamic range kept below each utterance's loudest bin.
    label_key: the example field holding the class.
  """
  frontend: audio.LogMel = audio.LogMel()
  max_seconds: float = 3.0
  top_db: float = 80.0
  label_key: str = "label"

  @property
  def max_samples(self) -> int:
    """Utterance length in samples (``max_seconds`` at the frontend's rate)."""
    return int(round(self.max_seconds * self.frontend.sample_rate))

  def load(self, split: str, data_dir: str | os.PathLike | None = None
           ) -> pipeline.ArraySource:
    """The whole ``split`` as uint8 features (see ``load_split``)."""
    return load_split(self.name, split, data_dir=data_dir)


def speech_spec(name: str, *, num_classes: int, frontend: audio.LogMel, max_seconds: float,
                mean: float, std: float, eval_split: str = "test",
                augment: SpecAugment | None = None, **kwargs) -> SpeechDatasetSpec:
  """A ``SpeechDatasetSpec`` with ``image_shape`` derived from the frontend."""
  frames = frontend.num_frames(int(round(max_seconds * frontend.sample_rate)))
  return SpeechDatasetSpec(name, (frames, frontend.n_mels, 1), num_classes, (mean,), (std,),
                           eval_split=eval_split, augment=augment, frontend=frontend,
                           max_seconds=max_seconds, **kwargs)


# 25 ms Hann windows every 10 ms, 40 Slaney mel bands up to 8 kHz (PAPERS.md section 4).
FRONTEND = audio.LogMel(sample_rate=16000, window_ms=25.0, hop_ms=10.0, n_mels=40)
# Mean and std of the uint8 features / 255 of the synthetic train split (seed 0).
SYNTHETIC_SLU_MEAN, SYNTHETIC_SLU_STD = 0.242, 0.268
SPECS: dict[str, SpeechDatasetSpec] = {
    # Synthetic utterances last at most 2.8 s (0.6 s of it silence) at the slowest speed.
    "synthetic_slu": speech_spec(
        "synthetic_slu", num_classes=intents.NUM_INTENTS, frontend=FRONTEND,
        max_seconds=2.8, mean=SYNTHETIC_SLU_MEAN, std=SYNTHETIC_SLU_STD,
        augment=SpecAugment(2, 20, 2, 6, fill=round(255 * SYNTHETIC_SLU_MEAN))),
    # FSC's utterances: median about 2.3 s; 4 s keeps nearly all whole. Statistics as
    # the synthetic set's until measured on FSC's train split.
    "fluent_speech_commands": speech_spec(
        "fluent_speech_commands", num_classes=intents.NUM_INTENTS, frontend=FRONTEND,
        max_seconds=4.0, mean=SYNTHETIC_SLU_MEAN, std=SYNTHETIC_SLU_STD,
        augment=SpecAugment(2, 20, 2, 6, fill=round(255 * SYNTHETIC_SLU_MEAN))),
    # Speech Commands: 1 s clips, 12 classes; splits train / validation / test.
    "speech_commands": speech_spec(
        "speech_commands", num_classes=12, frontend=FRONTEND, max_seconds=1.0,
        mean=SYNTHETIC_SLU_MEAN, std=SYNTHETIC_SLU_STD,
        augment=SpecAugment(2, 10, 2, 6, fill=round(255 * SYNTHETIC_SLU_MEAN))),
}


def get_spec(name: str) -> SpeechDatasetSpec:
  """The speech dataset spec ``name``; ValueError listing the known ones otherwise."""
  if name not in SPECS:
    raise ValueError(f"unknown speech dataset {name!r}; allowed: {sorted(SPECS)}")
  return SPECS[name]


# ------------------------------------------------------------------------------ features


@functools.partial(jax.jit, static_argnames=("frontend", "top_db"))
def _uint8_log_mel(waveforms: jax.Array, frontend: audio.LogMel, top_db: float) -> jax.Array:
  db = (10 / np.log(10)) * audio.log_mel(waveforms.astype(jnp.float32) / 32768, frontend)
  db = db - jnp.max(db, axis=(-2, -1), keepdims=True)
  scaled = 255 * (1 + jnp.maximum(db, -top_db) / top_db)
  return jnp.round(scaled).astype(jnp.uint8)


def features(waveforms: list[np.ndarray] | np.ndarray, spec: SpeechDatasetSpec
             ) -> tuple[np.ndarray, int]:
  """int16 waveforms -> uint8 features ``[N, T, n_mels, 1]`` and how many were truncated.

  Waveforms are zero-padded (or truncated) to ``spec.max_samples`` and processed in
  chunks of fixed size, so one compilation serves the whole split.
  """
  n, length = len(waveforms), spec.max_samples
  out = np.empty((n, *spec.image_shape), np.uint8)
  truncated = 0
  for start in range(0, n, _FEATURE_CHUNK):
    chunk = np.zeros((_FEATURE_CHUNK, length), np.int16)
    for i, w in enumerate(waveforms[start:start + _FEATURE_CHUNK]):
      w = np.asarray(w).reshape(-1)
      truncated += w.shape[0] > length
      chunk[i, :min(length, w.shape[0])] = w[:length]
    feats = np.asarray(_uint8_log_mel(chunk, spec.frontend, spec.top_db))
    stop = min(n, start + _FEATURE_CHUNK)
    out[start:stop, ..., 0] = feats[:stop - start]
  return out, truncated


# --------------------------------------------------------------------------------- reading


def how_to_prepare(name: str, data_dir: str | os.PathLike | None) -> str:
  """The command that prepares speech dataset ``name`` in ``data_dir`` (for errors)."""
  where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
  flag = f" --data_dir={data_dir}" if data_dir else ""
  if name == "synthetic_slu":
    return (f"synthetic_slu is not prepared in {where}. Build it (5-15 minutes) with "
            f"`python -m experiments.make_synthetic_slu{flag}` (needs `apt-get install "
            "espeak-ng flite`).")
  if name == "fluent_speech_commands":
    return (f"fluent_speech_commands is not prepared in {where}. Download Fluent Speech "
            "Commands (fluent.ai) and run shiftjax.data.slu.fsc."
            "prepare_fluent_speech_commands(data_dir, manual_dir=<the unpacked folder>).")
  return (f"{name} is not prepared in {where}. On a machine with internet and TensorFlow "
          f"run `tfds build {name} --file_format=array_record --data_dir=DIR` and copy "
          f"DIR/{name} there.")


def read_audio(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
               label_key: str = "label") -> tuple[list[np.ndarray], np.ndarray]:
  """All waveforms (int16 arrays) and int32 labels of a tfds split, in stored order."""
  source = pipeline.data_source(name, split, data_dir, how_to_prepare)
  n = len(source)
  waves: list[np.ndarray] = []
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(n, start + _READ_CHUNK)))
    for i, ex in zip(keys, pipeline.get_items(source, keys)):
      w = np.asarray(ex["audio"])
      if w.dtype != np.int16:
        # Mock data and other writers may give other integer types.
        w = np.clip(w, -32768, 32767).astype(np.int16)
      waves.append(w.reshape(-1))
      labels[i] = ex[label_key]
  return waves, labels


@functools.lru_cache(maxsize=8)
def _load_split_cached(name: str, split: str, data_dir: str | None) -> pipeline.ArraySource:
  spec = get_spec(name)
  waves, labels = read_audio(name, split, data_dir=data_dir, label_key=spec.label_key)
  if len(waves) == 0:
    raise ValueError(f"{name}[{split}] is empty")
  feats, truncated = features(waves, spec)
  if truncated:
    logging.warning("%s[%s]: %d of %d utterances longer than %.1f s were truncated", name,
                    split, truncated, len(waves), spec.max_seconds)
  if labels.min() < 0 or labels.max() >= spec.num_classes:
    raise ValueError(f"{name}[{split}] has labels outside 0..{spec.num_classes - 1}")
  source = pipeline.ArraySource(feats, labels)
  source.images.setflags(write=False)  # Shared by the cache: batches are copies.
  return source


def load_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None
               ) -> pipeline.ArraySource:
  """A whole speech split as uint8 log-mel features ``[N, T, n_mels, 1]`` and labels.

  Cached in the process (a training run and its evaluation read a split once). Raises
  FileNotFoundError saying how to prepare the dataset when it is missing.
  """
  get_spec(name)
  return _load_split_cached(name, split, None if data_dir is None else os.fspath(data_dir))
