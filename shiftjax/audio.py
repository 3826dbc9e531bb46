"""Log-mel filterbank features and SpecAugment in jax.numpy.

``log_mel(waveforms, LogMel(...))`` turns float waveforms ``[..., N]`` into log-mel
features ``[..., T, n_mels]``; it is jit-able, batched over any leading axes, and matches
``librosa.feature.melspectrogram`` with librosa's defaults (``center=True`` with zero
padding, periodic Hann window of ``win_length`` centred in ``n_fft``, power 2, Slaney mel
scale and Slaney area normalization) before the log. The filterbank is built in numpy
float64 once per ``LogMel`` (it is static) and applied as one matmul.

Frames: ``T = 1 + N // hop`` (``center=True``: the signal is padded with ``n_fft // 2``
zeros on both sides, so frame ``t`` is centred on sample ``t * hop``).

``spec_augment(key, features, ...)`` masks random time and frequency bands (Park et al.
2019, without time warping).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MEL_SCALES = ("slaney", "htk")
MEL_NORMS = ("slaney", None)


@dataclasses.dataclass(frozen=True)
class LogMel:
  """Parameters of the log-mel frontend (hashable: a static argument of ``jax.jit``).

  Attributes:
    sample_rate: Hz of the input waveforms.
    window_ms: analysis window length (Hann), e.g. 25.
    hop_ms: frame step, e.g. 10.
    n_mels: mel bands.
    f_min, f_max: band edges in Hz; ``f_max=None`` means ``sample_rate / 2``.
    mel_scale: ``'slaney'`` (librosa's default) or ``'htk'``.
    norm: ``'slaney'`` (each filter divided by its width in Hz / 2, librosa's default)
      or None (peak 1).
    floor: power floor before the log (``log(max(power, floor))``).
    n_fft: FFT size; None means the next power of two >= the window length.
  """
  sample_rate: int = 16000
  window_ms: float = 25.0
  hop_ms: float = 10.0
  n_mels: int = 40
  f_min: float = 0.0
  f_max: float | None = None
  mel_scale: str = "slaney"
  norm: str | None = "slaney"
  floor: float = 1e-10
  n_fft: int | None = None

  def __post_init__(self):
    if self.sample_rate <= 0:
      raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
    if self.hop_length <= 0 or self.win_length <= 0:
      raise ValueError(f"window_ms={self.window_ms} and hop_ms={self.hop_ms} must each be "
                       f"at least one sample at {self.sample_rate} Hz")
    if self.n_fft is not None and self.n_fft < self.win_length:
      raise ValueError(f"n_fft={self.n_fft} is shorter than the window "
                       f"({self.win_length} samples)")
    if self.mel_scale not in MEL_SCALES:
      raise ValueError(f"mel_scale must be one of {MEL_SCALES}, got {self.mel_scale!r}")
    if self.norm not in MEL_NORMS:
      raise ValueError(f"norm must be one of {MEL_NORMS}, got {self.norm!r}")
    if not 0 <= self.f_min < self.fmax <= self.sample_rate / 2:
      raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, "
                       f"f_max={self.fmax}, sample_rate={self.sample_rate}")
    if self.n_mels <= 0 or self.floor <= 0:
      raise ValueError(f"n_mels and floor must be positive, got {self.n_mels}, {self.floor}")

  @property
  def win_length(self) -> int:
    """Window length in samples."""
    return int(round(self.sample_rate * self.window_ms / 1000))

  @property
  def hop_length(self) -> int:
    """Hop between frames in samples."""
    return int(round(self.sample_rate * self.hop_ms / 1000))

  @property
  def fft_size(self) -> int:
    """FFT size: ``n_fft`` if set, else the window length rounded up to a power of two."""
    if self.n_fft is not None:
      return self.n_fft
    return 1 << max(0, math.ceil(math.log2(self.win_length)))

  @property
  def fmax(self) -> float:
    """Upper edge of the mel filterbank in Hz (``f_max`` or Nyquist)."""
    return self.sample_rate / 2 if self.f_max is None else float(self.f_max)

  def num_frames(self, num_samples: int) -> int:
    """Frames of a waveform of ``num_samples`` samples (``center=True``)."""
    return 1 + num_samples // self.hop_length


# ----------------------------------------------------------------------- mel filterbank


def hz_to_mel(hz, scale: str = "slaney"):
  """Hz -> mel (numpy, float64). Slaney: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  if scale == "htk":
    return 2595.0 * np.log10(1.0 + hz / 700.0)
  f_sp = 200.0 / 3
  min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0
  min_log_mel = min_log_hz / f_sp
  return np.where(hz >= min_log_hz,
                  min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                  hz / f_sp)


def mel_to_hz(mel, scale: str = "slaney"):
  """mel -> Hz (numpy, float64), the inverse of ``hz_to_mel``."""
  mel = np.asarray(mel, np.float64)
  if scale == "htk":
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
  f_sp = 200.0 / 3
  min_log_hz, logstep = 1000.0, math.log(6.4) / 27.0
  min_log_mel = min_log_hz / f_sp
  return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)),
                  mel * f_sp)


@functools.lru_cache(maxsize=16)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float,
                    scale: str, norm: str | None) -> np.ndarray:
  freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
  mel_f = mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale),
                                n_mels + 2), scale)
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  if norm == "slaney":
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
  weights.setflags(write=False)
  return weights


def mel_filterbank(params: LogMel) -> np.ndarray:
  """Triangular filters, float64 ``[n_mels, n_fft // 2 + 1]`` (= ``librosa.filters.mel``)."""
  return _mel_filterbank(params.sample_rate, params.fft_size, params.n_mels,
                         float(params.f_min), params.fmax, params.mel_scale, params.norm)


def hann_window(params: LogMel) -> np.ndarray:
  """Periodic Hann window of ``win_length`` zero-padded (centred) to ``n_fft``, float64."""
  n = params.win_length
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
  left = (params.fft_size - n) // 2
  return np.pad(window, (left, params.fft_size - n - left))


# ----------------------------------------------------------------------------- features


def frames(waveforms: jax.Array, params: LogMel) -> jax.Array:
  """``[..., N]`` -> windowed frames ``[..., 1 + N // hop, n_fft]`` (``center=True``)."""
  n_fft, hop = params.fft_size, params.hop_length
  num_samples = waveforms.shape[-1]
  padded = jnp.pad(waveforms, [(0, 0)] * (waveforms.ndim - 1) + [(n_fft // 2, n_fft // 2)])
  starts = hop * np.arange(params.num_frames(num_samples))
  index = starts[:, None] + np.arange(n_fft)[None, :]
  return padded[..., index] * jnp.asarray(hann_window(params), waveforms.dtype)


def mel_power(waveforms: jax.Array, params: LogMel) -> jax.Array:
  """Mel power spectrogram ``[..., T, n_mels]`` (librosa's ``melspectrogram``, transposed)."""
  waveforms = jnp.asarray(waveforms)
  if not jnp.issubdtype(waveforms.dtype, jnp.floating):
    raise ValueError(f"waveforms must be floating point, got {waveforms.dtype}; scale int16 "
                     "audio by 1 / 32768 first")
  spectrum = jnp.fft.rfft(frames(waveforms, params), axis=-1)
  power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
  filters = jnp.asarray(mel_filterbank(params).T, power.dtype)
  return jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="params")
def log_mel(waveforms: jax.Array, params: LogMel = LogMel()) -> jax.Array:
  """Log-mel features ``log(max(mel_power, floor))``: float ``[..., N]`` -> ``[..., T, n_mels]``."""
  return jnp.log(jnp.maximum(mel_power(waveforms, params), params.floor))


# --------------------------------------------------------------------------- SpecAugment


def band_mask(length: int, starts: jax.Array, widths: jax.Array) -> jax.Array:
  """True inside any band ``[start, start + width)``: ``starts, widths [..., M]`` -> ``[..., length]``."""
  pos = jnp.arange(length)
  inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
  return jnp.any(inside, axis=-2)


def _sample_bands(key, batch_shape, length: int, count: int, max_width: int):
  k_width, k_start = jax.random.split(key)
  max_width = min(max_width, length)
  widths = jax.random.randint(k_width, (*batch_shape, count), 0, max_width + 1)
  starts = jax.random.randint(k_start, (*batch_shape, count), 0, 2**30) % (
      length - widths + 1)
  return starts, widths


@functools.partial(jax.jit, static_argnames=("time_masks", "max_time", "freq_masks",
                                             "max_freq"))
def spec_augment(key: jax.Array, features: jax.Array, *, time_masks: int = 2,
                 max_time: int = 20, freq_masks: int = 2, max_freq: int = 8,
                 fill_value: float | jax.Array = 0.0) -> jax.Array:
  """SpecAugment time and frequency masking of ``features [..., T, F]``.

  Each example (every index of the leading axes) gets ``time_masks`` bands of
  ``U{0..max_time}`` frames and ``freq_masks`` bands of ``U{0..max_freq}`` mel bins,
  at uniform positions, set to ``fill_value`` (0 suits mean-normalized features).
  A trailing channel axis is not supported: squeeze it first.
  """
  *batch, t, f = features.shape
  k_time, k_freq = jax.random.split(key)
  t_start, t_width = _sample_bands(k_time, batch, t, time_masks, max_time)
  f_start, f_width = _sample_bands(k_freq, batch, f, freq_masks, max_freq)
  mask = band_mask(t, t_start, t_width)[..., :, None] | band_mask(f, f_start, f_width)[
      ..., None, :]
  return jnp.where(mask, jnp.asarray(fill_value, features.dtype), features)
