"""The log-mel frontend against librosa on real speech, and SpecAugment masking."""

import glob
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax import audio

# Debian's pocketsphinx-testdata: real read speech, 16 kHz mono 16-bit.
SPEECH_FILES = sorted(glob.glob("/usr/share/pocketsphinx/test/data/cards/002.wav")
                      + glob.glob("/usr/share/pocketsphinx/test/data/librivox/*-0870.wav"))
SECONDS = 1.9  # every file cut to this length: one compilation per frontend
requires_speech = pytest.mark.skipif(
    len(SPEECH_FILES) < 2,
    reason="needs Debian's pocketsphinx-testdata (apt-get install pocketsphinx-testdata)")


def read_speech(path):
  with wave.open(path) as w:
    assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
    x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
  assert len(x) >= SECONDS * 16000
  return x[:int(SECONDS * 16000)]


@pytest.fixture(scope="module")
def librosa():
  return pytest.importorskip("librosa", reason="librosa is a test extra: pip install librosa")


def librosa_log_mel(librosa, x, p: audio.LogMel):
  mel = librosa.feature.melspectrogram(
      y=x.astype(np.float64), sr=p.sample_rate, n_fft=p.fft_size, hop_length=p.hop_length,
      win_length=p.win_length, n_mels=p.n_mels, fmin=p.f_min, fmax=p.fmax,
      htk=p.mel_scale == "htk", norm=p.norm, dtype=np.float64)
  return mel.T  # [T, n_mels]


FRONTENDS = {
    "slaney40": audio.LogMel(n_mels=40),
    "htk80_band_peak1": audio.LogMel(n_mels=80, mel_scale="htk", f_min=20.0, f_max=7600.0,
                                     norm=None, window_ms=32.0, hop_ms=12.5),
}


@requires_speech
@pytest.mark.parametrize("name", list(FRONTENDS))
def test_log_mel_matches_librosa_on_real_speech(librosa, name):
  p = FRONTENDS[name]
  for path in SPEECH_FILES:
    x = read_speech(path)
    ref = librosa_log_mel(librosa, x, p)
    above = ref > p.floor
    log_ref = np.log(ref[above])
    # float64 (jax x64): the same numbers as librosa, relative error <= 1e-4 on the log.
    with jax.enable_x64(True):
      ours64 = np.asarray(audio.log_mel(x.astype(np.float64), p))
    assert ours64.shape == ref.shape == (1 + len(x) // p.hop_length, p.n_mels)
    np.testing.assert_array_less(np.abs(ours64[above] - log_ref), 1e-4 * np.abs(log_ref))
    # float32 (the default): a float32 FFT rounds at about 1e-7 of the frame's energy, so
    # the relative error of a mel power (= the error of its log) grows far below the
    # frame's peak: <= 1e-4 within 60 dB of it, <= 3e-3 down to the floor.
    ours = np.asarray(audio.log_mel(x, p))
    assert ours.dtype == np.float32
    err = np.abs(ours[above] - log_ref)
    near_peak = (np.log(ref) > np.log(ref.max(axis=1, keepdims=True)) - 6 * np.log(10))[above]
    assert err[near_peak].max() <= 1e-4, (path, err[near_peak].max())
    assert err.max() <= 3e-3, (path, err.max())


def test_filterbank_and_window_match_librosa(librosa):
  for p in FRONTENDS.values():
    ref = librosa.filters.mel(sr=p.sample_rate, n_fft=p.fft_size, n_mels=p.n_mels,
                              fmin=p.f_min, fmax=p.fmax, htk=p.mel_scale == "htk",
                              norm=p.norm, dtype=np.float64)
    np.testing.assert_allclose(audio.mel_filterbank(p), ref, rtol=1e-12, atol=1e-15)
    window = librosa.filters.get_window("hann", p.win_length, fftbins=True)
    np.testing.assert_allclose(audio.hann_window(p),
                               librosa.util.pad_center(window, size=p.fft_size), atol=1e-15)


def test_log_mel_is_batched_jitted_and_floored():
  p = audio.LogMel(n_mels=40)
  assert (p.win_length, p.hop_length, p.fft_size) == (400, 160, 512)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 1600)).astype(np.float32) * 0.1
  x[1, 2] = 0.0  # digital silence -> the floor
  batched = np.asarray(audio.log_mel(jnp.asarray(x), p))
  assert batched.shape == (2, 3, 11, 40)
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(batched[i, j], np.asarray(audio.log_mel(x[i, j], p)),
                                 rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batched[1, 2], np.float32(np.log(p.floor)))
  with pytest.raises(ValueError, match="floating point"):
    audio.log_mel(jnp.zeros((1600,), jnp.int16), p)


def test_log_mel_parameters_are_checked():
  assert audio.LogMel(window_ms=25, sample_rate=8000).fft_size == 256
  assert audio.LogMel(n_fft=1024).fft_size == 1024
  assert audio.LogMel().num_frames(16000) == 101
  for bad, match in (({"mel_scale": "bark"}, "mel_scale"), ({"f_max": 9000.0}, "f_max"),
                     ({"n_fft": 256}, "shorter than the window"), ({"n_mels": 0}, "n_mels"),
                     ({"hop_ms": 0.01}, "at least one sample")):
    with pytest.raises(ValueError, match=match):
      audio.LogMel(**bad)


def test_mel_scales_round_trip():
  hz = np.array([0.0, 200.0, 999.0, 1000.0, 4000.0, 8000.0])
  for scale in audio.MEL_SCALES:
    np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(hz, scale), scale), hz,
                               atol=1e-9)
  np.testing.assert_allclose(audio.hz_to_mel(1000.0), 15.0)  # Slaney: the log break
  np.testing.assert_allclose(audio.hz_to_mel(1000.0, "htk"), 999.98, atol=0.01)


# SpecAugment.


def _bands(mask_1d):
  """Lengths of the runs of True in a 1-D bool array."""
  edges = np.diff(np.concatenate([[0], mask_1d.astype(int), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_spec_augment_masks_bands_of_bounded_width():
  feats = jnp.ones((16, 100, 40)) * 5.0
  out = np.asarray(audio.spec_augment(jax.random.key(0), feats, time_masks=2, max_time=10,
                                      freq_masks=1, max_freq=7, fill_value=-1.0))
  assert out.shape == feats.shape and set(np.unique(out)) <= {-1.0, 5.0}
  masked = out == -1.0
  some_time = some_freq = False
  for example in masked:
    time_rows = example.all(axis=1)       # frames masked across every bin
    freq_cols = example.all(axis=0)       # bins masked across every frame
    # Every masked cell lies in a masked frame or a masked bin.
    np.testing.assert_array_equal(example, time_rows[:, None] | freq_cols[None, :])
    assert time_rows.sum() <= 20 and all(b <= 20 for b in _bands(time_rows))
    assert freq_cols.sum() <= 7
    some_time |= time_rows.any()
    some_freq |= freq_cols.any()
  assert some_time and some_freq


def test_spec_augment_is_a_function_of_the_key():
  feats = jax.random.normal(jax.random.key(1), (4, 50, 20))
  a = audio.spec_augment(jax.random.key(3), feats)
  b = audio.spec_augment(jax.random.key(3), feats)
  c = audio.spec_augment(jax.random.key(4), feats)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  same = audio.spec_augment(jax.random.key(3), feats, time_masks=0, freq_masks=0)
  np.testing.assert_array_equal(same, feats)
