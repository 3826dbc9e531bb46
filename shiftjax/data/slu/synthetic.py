"""An offline, synthesized stand-in for Fluent Speech Commands: the tfds ``synthetic_slu``.

No real speech corpus can be installed here, so this module speaks FSC's 31 intents
(``intents.PHRASINGS``, several phrasings each) with Debian's speech synthesizers and
writes them as the tfds dataset ``synthetic_slu``: same features and splits as
``fluent_speech_commands`` (``fsc.slu_features``), array_record, no TensorFlow.

Voices. A *speaker* is one synthesizer voice with its own base pitch and speed:

* espeak-ng: an English accent (``ESPEAK_ACCENTS``: US, British, Scottish, Lancaster,
  RP, West Midlands, Caribbean, New York City) combined with a voice variant
  (``ESPEAK_VARIANTS``: m1..m8, f1..f5, croak, whisper, klatt, ... 98 in all);
* flite (optional, when installed): the voices awb, kal16, rms and slt, each with 8
  pitch/speed presets.

Variants are grouped in *families* (``variant_family``: ``klatt2..5`` belong with
``klatt``, ``iven2`` with ``iven``; each flite voice is a family). Families, not
speakers, are split between train / valid / test (70 / 10 / 20 % of them, shuffled by
the seed), so no variant, and no flite voice, of the test split is ever heard in
training: the test set measures generalization to unseen voices. Accents are shared.

Each utterance draws an intent (classes are balanced), a phrasing, its speaker (round
robin over the split's speakers), a speed and pitch jitter around the speaker's, random
leading / trailing silence, a level (-25..-1 dBFS peak) and light noise (white, pink or
brown at 15-40 dB SNR). Audio is resampled to 16 kHz (``scipy.signal.resample_poly``).

Everything is a function of the seed: the plan (``plan_split``) uses numpy generators
seeded by ``(seed, split, stream)``, and each utterance's noise by ``(seed, split,
index)``, so the same seed, synthesizer versions and numpy give identical audio.

Build it with ``python -m experiments.make_synthetic_slu --data_dir=DIR``: the default
12,000 / 1,200 / 2,400 utterances took 5 minutes of CPU (15 minutes of wall time on a
busy 2-core machine) and take 583 MB.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import wave
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.signal
import tensorflow_datasets as tfds

from shiftjax.data.slu import fsc
from shiftjax.data.slu import intents

SAMPLE_RATE = fsc.SAMPLE_RATE
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}
DEFAULT_SIZES = {"train": 12000, "valid": 1200, "test": 2400}

ESPEAK_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
                  "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# espeak-ng 1.51's voice variants (espeak-ng-data/voices/!v), less `caleb` and `klatt6`,
# which sound exactly like `klatt`, and `Mr serious` (a space in its name).
ESPEAK_VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael",
    "Mike", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky",
    "UniRobot", "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda",
    "benjamin", "boris", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3",
    "f4", "f5", "fast", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4",
    "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "linda", "m1",
    "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel",
    "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "robosoft",
    "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
    "robosoft8", "sandro", "shelby", "steph", "steph2", "steph3", "travis", "victor",
    "whisper", "whisperf", "zac")
# flite voices (Debian's flite): three male, one female (kal16 is kal at 16 kHz).
FLITE_VOICES = ("awb", "kal16", "rms", "slt")
_FLITE_FEMALE = ("slt",)
FLITE_PRESETS = 8

# Ranges of the random draws.
_ESPEAK_PITCH = (25, 75)          # espeak -p (0-99), per speaker
_ESPEAK_WPM = (140, 200)          # espeak -s words per minute, per speaker
_FLITE_F0 = {"male": (85, 145), "female": (160, 240)}  # Hz, per speaker
_FLITE_STRETCH = (0.85, 1.2)      # flite duration_stretch, per speaker
_JITTER_SPEED = 0.08              # per utterance, relative
_JITTER_PITCH = 8                 # per utterance, espeak pitch units (flite: x 1.5 Hz)
_PAD_SECONDS = (0.05, 0.3)        # leading and trailing silence
_PEAK_DBFS = (-25.0, -1.0)
_SNR_DB = (15.0, 40.0)
_NOISES = ("white", "pink", "brown")


def variant_family(variant: str) -> str:
  """The family of an espeak-ng variant: numbered versions of one voice share it.

  ``klatt3`` -> ``klatt``, ``anikaRobot`` -> ``anika``; ``m1``..``m8`` and
  ``f1``..``f5`` are distinct voices and their own families.
  """
  if re.fullmatch(r"[mf]\d+", variant):
    return variant
  if variant == "anikaRobot":
    return "anika"
  return re.sub(r"\d+$", "", variant)


@dataclasses.dataclass(frozen=True)
class Speaker:
  """A synthesizer voice with its base pitch and speed.

  ``engine`` is ``'espeak-ng'`` (``voice`` = ``'<accent>+<variant>'``, pitch in espeak
  units 0-99, speed in words per minute) or ``'flite'`` (``voice`` = a flite voice,
  pitch = f0 mean in Hz, speed = 100 / duration stretch).
  """
  engine: str
  voice: str
  family: str
  pitch: float
  speed: float
  preset: int = 0

  @property
  def speaker_id(self) -> str:
    """A stable name of this voice: ``engine/voice`` (flite: ``#preset`` appended)."""
    suffix = f"#{self.preset}" if self.engine == "flite" else ""
    return f"{self.engine}/{self.voice}{suffix}"


@dataclasses.dataclass(frozen=True)
class Utterance:
  """Everything that determines one synthesized example."""
  key: str
  split: str
  index: int
  label: int
  text: str
  speaker: Speaker
  pitch: float
  speed: float
  lead_seconds: float
  trail_seconds: float
  peak_dbfs: float
  snr_db: float
  noise: str
  noise_seed: tuple[int, ...]


# --------------------------------------------------------------------------------- plan


def available_engines() -> dict[str, bool]:
  """Which speech synthesizers are installed: ``{"espeak-ng": bool, "flite": bool}``."""
  return {"espeak-ng": shutil.which("espeak-ng") is not None,
          "flite": shutil.which("flite") is not None}


def families(use_flite: bool) -> list[str]:
  """Sorted voice families: espeak-ng variant families, then ``flite/<voice>``."""
  fams = sorted({variant_family(v) for v in ESPEAK_VARIANTS})
  if use_flite:
    fams += [f"flite/{v}" for v in FLITE_VOICES]
  return fams


def split_families(seed: int, use_flite: bool) -> dict[str, list[str]]:
  """Disjoint families per split (test and valid first; the rest is train)."""
  fams = families(use_flite)
  order = np.random.default_rng([seed, 0]).permutation(len(fams))
  n_test = round(SPLIT_FRACTIONS["test"] * len(fams))
  n_valid = round(SPLIT_FRACTIONS["valid"] * len(fams))
  shuffled = [fams[i] for i in order]
  out = {"test": shuffled[:n_test], "valid": shuffled[n_test:n_test + n_valid],
         "train": shuffled[n_test + n_valid:]}
  return {k: sorted(v) for k, v in out.items()}


def _uniform(rng: np.random.Generator, bounds) -> float:
  return float(rng.uniform(*bounds))


def speakers(seed: int, split: str, use_flite: bool) -> list[Speaker]:
  """The speakers of ``split``: every accent x variant of its espeak families, and 8
  presets of each of its flite voices, with base pitch and speed drawn from the seed."""
  split_index = SPLITS.index(split)
  fams = set(split_families(seed, use_flite)[split])
  rng = np.random.default_rng([seed, 1, split_index])
  out = []
  for variant in ESPEAK_VARIANTS:
    if variant_family(variant) not in fams:
      continue
    for accent in ESPEAK_ACCENTS:
      out.append(Speaker("espeak-ng", f"{accent}+{variant}", variant_family(variant),
                         pitch=round(_uniform(rng, _ESPEAK_PITCH)),
                         speed=round(_uniform(rng, _ESPEAK_WPM))))
  for voice in FLITE_VOICES:
    if f"flite/{voice}" not in fams:
      continue
    f0 = _FLITE_F0["female" if voice in _FLITE_FEMALE else "male"]
    for preset in range(FLITE_PRESETS):
      out.append(Speaker("flite", voice, f"flite/{voice}", pitch=round(_uniform(rng, f0)),
                         speed=round(100 / _uniform(rng, _FLITE_STRETCH), 1),
                         preset=preset))
  return out


def plan_split(seed: int, split: str, num: int, use_flite: bool) -> list[Utterance]:
  """The ``num`` utterances of ``split``: a pure function of its arguments."""
  split_index = SPLITS.index(split)
  spk = speakers(seed, split, use_flite)
  if not spk:
    raise ValueError(f"split {split!r} has no speakers")
  rng = np.random.default_rng([seed, 2, split_index])
  labels = rng.permutation(np.resize(np.arange(intents.NUM_INTENTS), num))
  speaker_order = rng.permutation(len(spk))
  plan = []
  for i in range(num):
    label = int(labels[i])
    texts = intents.PHRASINGS[intents.INTENT_NAMES[label]]
    s = spk[speaker_order[i % len(spk)]]
    pitch_step = 1.5 if s.engine == "flite" else 1.0
    pitch = s.pitch + pitch_step * rng.integers(-_JITTER_PITCH, _JITTER_PITCH + 1)
    if s.engine == "espeak-ng":
      pitch = float(np.clip(pitch, 0, 99))
    plan.append(Utterance(
        key=f"{split}-{i:06d}", split=split, index=i, label=label,
        text=texts[rng.integers(len(texts))], speaker=s, pitch=float(pitch),
        speed=round(s.speed * (1 + _uniform(rng, (-_JITTER_SPEED, _JITTER_SPEED))), 1),
        lead_seconds=_uniform(rng, _PAD_SECONDS), trail_seconds=_uniform(rng, _PAD_SECONDS),
        peak_dbfs=_uniform(rng, _PEAK_DBFS), snr_db=_uniform(rng, _SNR_DB),
        noise=_NOISES[rng.integers(len(_NOISES))],
        noise_seed=(seed, 3, split_index, i)))
  return plan


# ---------------------------------------------------------------------------- synthesis


def _read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
  # espeak-ng --stdout writes a streaming header (sizes unknown): read what is there.
  with wave.open(io.BytesIO(data), "rb") as w:
    rate = w.getframerate()
    if w.getnchannels() != 1 or w.getsampwidth() != 2:
      raise ValueError("synthesizer output is not mono 16-bit PCM")
    frames = w.readframes(1 << 30)
  return np.frombuffer(frames[:len(frames) // 2 * 2], "<i2"), rate


def _run(cmd: Sequence[str]) -> bytes:
  result = subprocess.run(cmd, capture_output=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): "
                       f"{result.stderr.decode(errors='replace')[:500]}")
  return result.stdout


def speak(utt: Utterance) -> tuple[np.ndarray, int]:
  """The raw synthesizer output of ``utt``: int16 samples and their sample rate."""
  s = utt.speaker
  if s.engine == "espeak-ng":
    data = _run(["espeak-ng", "-v", s.voice, "-p", str(int(round(utt.pitch))),
                 "-s", str(int(round(utt.speed))), "--stdout", utt.text])
    return _read_wav_bytes(data)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "out.wav")
    _run(["flite", "-voice", s.voice, "--setf", f"duration_stretch={100 / utt.speed:.4f}",
          "--setf", f"int_f0_target_mean={utt.pitch:.1f}", "-t", utt.text, "-o", path])
    with open(path, "rb") as f:
      return _read_wav_bytes(f.read())


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling of float ``x`` from ``rate`` to ``target`` Hz."""
  if rate == target:
    return x
  g = np.gcd(rate, target)
  return scipy.signal.resample_poly(x, target // g, rate // g)


def colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
  """Unit-RMS noise of ``n`` samples: white, pink (1/f power) or brown (1/f^2)."""
  white = rng.standard_normal(n)
  if kind == "white":
    noise = white
  else:
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    spectrum *= f ** (-0.5 if kind == "pink" else -1.0)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n)
  return noise / max(np.sqrt(np.mean(noise ** 2)), 1e-12)


def _trim(x: np.ndarray, rel: float = 0.01) -> np.ndarray:
  """Drops leading and trailing samples below ``rel`` of the peak (keeps 10 ms margins)."""
  loud = np.flatnonzero(np.abs(x) > rel * np.max(np.abs(x)))
  if loud.size == 0:
    return x
  margin = SAMPLE_RATE // 100
  return x[max(0, loud[0] - margin):loud[-1] + margin]


def synthesize(utt: Utterance) -> np.ndarray:
  """The finished int16 16 kHz waveform of ``utt`` (deterministic)."""
  raw, rate = speak(utt)
  if raw.size == 0 or not np.any(raw):
    raise RuntimeError(f"{utt.speaker.speaker_id} produced no sound for {utt.text!r}")
  x = _trim(resample(raw.astype(np.float64) / 32768, rate))
  x = np.concatenate([np.zeros(int(utt.lead_seconds * SAMPLE_RATE)), x,
                      np.zeros(int(utt.trail_seconds * SAMPLE_RATE))])
  rng = np.random.default_rng(list(utt.noise_seed))
  speech_rms = np.sqrt(np.mean(x[np.abs(x) > 0.01 * np.max(np.abs(x))] ** 2))
  x = x + colored_noise(rng, len(x), utt.noise) * speech_rms * 10 ** (-utt.snr_db / 20)
  x *= 10 ** (utt.peak_dbfs / 20) / np.max(np.abs(x))
  return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def example(utt: Utterance) -> dict[str, Any]:
  """The tfds example (FSC features, int16 audio) of one synthesized utterance."""
  action, obj, location = intents.INTENTS[utt.label]
  return fsc.slu_example(synthesize(utt), action, obj, location, utt.speaker.speaker_id,
                         utt.text)


# ------------------------------------------------------------------------------ builder


class SyntheticSlu(tfds.core.GeneratorBasedBuilder):
  """FSC's intents spoken by espeak-ng and flite voices, disjoint between splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "espeak-ng 1.51 variants x 8 accents, flite voices."}
  # Nothing is downloaded (and looking up checksums would need `importlib_resources`).
  url_infos = None

  def __init__(self, *, seed: int = 0, sizes: dict[str, int] | None = None,
               use_flite: bool | None = None, workers: int | None = None, **kwargs):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    self._seed = int(seed)
    self._sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    if set(self._sizes) != set(SPLITS) or min(self._sizes.values()) < 1:
      raise ValueError(f"sizes must give a positive count for each of {SPLITS}, "
                       f"got {self._sizes}")
    self._use_flite = available_engines()["flite"] if use_flite is None else use_flite
    self._workers = workers or os.cpu_count() or 1
    super().__init__(**kwargs)

  def recipe(self) -> dict[str, Any]:
    """What determines the data (written to ``metadata.json``)."""
    return {"sample_rate": SAMPLE_RATE, "seed": self._seed, "sizes": self._sizes,
            "use_flite": self._use_flite,
            "families": split_families(self._seed, self._use_flite)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fluent Speech Commands' 31 intents synthesized offline by espeak-ng "
                     "and flite voices; voice families disjoint between splits."),
        features=fsc.slu_features(),
        supervised_keys=("audio", "label"),
        metadata=tfds.core.MetadataDict(self.recipe()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    engines = available_engines()
    missing = [e for e, ok in engines.items() if not ok and (e != "flite" or self._use_flite)]
    if missing:
      raise FileNotFoundError(f"{' and '.join(missing)} not found: install with "
                              f"`apt-get install {' '.join(missing)}`")
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split) -> Iterator[tuple[str, dict[str, Any]]]:
    plan = plan_split(self._seed, split, self._sizes[split], self._use_flite)
    # Threads suffice: the synthesizers are subprocesses and numpy releases the GIL.
    with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
      for utt, ex in zip(plan, pool.map(example, plan)):
        yield utt.key, ex


def prepare_synthetic_slu(data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                          sizes: dict[str, int] | None = None, use_flite: bool | None = None,
                          workers: int | None = None) -> str:
  """Synthesizes and writes ``synthetic_slu`` (array_record) into ``data_dir``.

  Idempotent for the same recipe; raises ValueError if ``data_dir`` already holds the
  dataset made with another seed, sizes or voice set (use another ``data_dir``).
  ``use_flite=None`` uses flite when it is installed. Returns the dataset's directory.
  """
  builder = SyntheticSlu(seed=seed, sizes=sizes, use_flite=use_flite, workers=workers,
                         data_dir=None if data_dir is None else os.fspath(data_dir),
                         file_format="array_record")
  if builder.is_prepared():
    with open(os.path.join(os.fspath(builder.data_dir), "metadata.json")) as f:
      found = json.load(f)
    wanted = json.loads(json.dumps(builder.recipe()))
    if found != wanted:
      raise ValueError(
          f"{builder.data_dir} already holds synthetic_slu made with "
          f"{ {k: found.get(k) for k in ('seed', 'sizes', 'use_flite')} }, not "
          f"{ {k: wanted[k] for k in ('seed', 'sizes', 'use_flite')} }; pass another "
          "data_dir")
    return os.fspath(builder.data_dir)
  with fsc.in_memory_shuffle():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(builder.data_dir)
