"""Power-of-two weight quantizers: DeepShift-Q, DeepShift-PS, S3 and DenseShift.

Each quantizer is a frozen dataclass *spec* (hashable, so it can be a static argument of
``jax.jit``) with pure methods:

  ``init(key, shape, dtype)`` -> dict of latent arrays,
  ``weight(latents)``         -> float weight of ``shape`` with straight-through gradients,
  ``codes(latents)``          -> uint8 codes in the shared format of ``shiftjax.codes``,
  ``values()``                -> every representable value, sorted,
  ``code_format``             -> the ``CodeFormat`` that ``codes.decode`` needs.

``decode(codes(latents), code_format, dtype)`` reproduces ``weight(latents)`` bit for bit.

Shapes are those of the weight: ``(in, out)`` for dense layers, HWIO for convolutions;
fan-out is ``prod(shape) / shape[-2]``. Latents that encode one exponent bit each are
stacked along a new leading axis. The method definitions follow ../shared/docs/PAPERS.md;
the notation is ``1(x) = [x > 0]`` and ``B(x) = +1 if x >= 0 else -1``, both with
identity (straight-through) derivatives.

Gradients come from ``jax.custom_jvp`` rules on the small building blocks below (each one
is linear in its tangents, so reverse mode gets the same straight-through cotangents a
``custom_vjp`` would give, and forward mode works too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib

Latents = Mapping[str, jax.Array]
LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------
# Straight-through building blocks.


@jax.custom_jvp
def step_ste(x: jax.Array) -> jax.Array:
  """``1(x)``: 1 where x > 0, else 0 (0 maps to 0); derivative 1."""
  return (x > 0).astype(x.dtype)


@step_ste.defjvp
def _step_ste_jvp(primals, tangents):
  return step_ste(primals[0]), tangents[0]


@jax.custom_jvp
def sign_ste(x: jax.Array) -> jax.Array:
  """``B(x)``: +1 where x >= 0, else -1; derivative 1."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@sign_ste.defjvp
def _sign_ste_jvp(primals, tangents):
  return sign_ste(primals[0]), tangents[0]


@jax.custom_jvp
def round_ste(x: jax.Array) -> jax.Array:
  """Round half to even (as ``torch.round``); derivative 1."""
  return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
  return round_ste(primals[0]), tangents[0]


@jax.custom_jvp
def pow2(p: jax.Array) -> jax.Array:
  """Exact ``2**p`` for integer-valued float ``p``; derivative ``2**p * ln 2``.

  ``exp2`` is not guaranteed to be exact on every backend; ``ldexp`` builds the
  power of two from its exponent, so quantized weights are exact powers of two.
  """
  return jnp.ldexp(jnp.ones_like(p), p.astype(jnp.int32))


@pow2.defjvp
def _pow2_jvp(primals, tangents):
  out = pow2(primals[0])
  return out, tangents[0] * out * jnp.asarray(LN2, out.dtype)


@jax.custom_jvp
def forward_with_grad_of(value: jax.Array, surrogate: jax.Array) -> jax.Array:
  """Returns ``value`` exactly; derivatives are those of ``surrogate``.

  ``surrogate + stop_gradient(value - surrogate)`` would do the same but is not exact in
  floating point (``4 - sqrt(3) + sqrt(3)`` need not be 4), and weights must be exact.
  """
  del surrogate
  return value


@forward_with_grad_of.defjvp
def _forward_with_grad_of_jvp(primals, tangents):
  return primals[0], tangents[1]


def positive_zero(w: jax.Array) -> jax.Array:
  """Maps -0.0 to +0.0 (the zero code decodes to +0.0), keeping ``w``'s derivatives.

  A pruned weight is ``-1 * 0 * 2**P = -0.0``; masking it with a plain ``where`` would
  also cut the gradient that lets S3 revive pruned weights.
  """
  return forward_with_grad_of(jnp.where(w == 0, jnp.zeros_like(w), w), w)


def chain_exponent(bits: jax.Array) -> jax.Array:
  """Reference recursion ``S_0 = 0, S_k = (S_{k-1} + 1) * b_k``; ``bits`` is [K, ...].

  ``S_K`` is the run length of trailing ones of ``b_1 .. b_K``, in 0..K. Autodiff through
  the recursion is the paper's gradient (product rule on every ``b_k``).
  """
  s = jnp.zeros_like(bits[0])
  for k in range(bits.shape[0]):
    s = (s + 1) * bits[k]
  return s


def binary_exponent(bits: jax.Array) -> jax.Array:
  """``P = sum_i 2**i * b_i``; ``bits`` is [K, ...]; P in 0..2**K - 1."""
  weights = (2.0 ** np.arange(bits.shape[0])).astype(bits.dtype)
  return jnp.tensordot(weights, bits, axes=1)


# ---------------------------------------------------------------------------------------
# Initializers.


def fan_out(shape: tuple[int, ...]) -> int:
  """Fan-out of a dense ``(in, out)`` or HWIO conv weight (``k*k*C_out``)."""
  if len(shape) < 2:
    raise ValueError(f"weight shape must have at least 2 dims (.., in, out), got {shape}")
  return math.prod(shape) // shape[-2]


def fan_in(shape: tuple[int, ...]) -> int:
  """Inputs per output unit of a kernel ``[..., in, out]`` (``kh * kw * in`` for HWIO)."""
  if len(shape) < 2:
    raise ValueError(f"weight shape must have at least 2 dims (.., in, out), got {shape}")
  return math.prod(shape) // shape[-1]


def he_fan_out_std(weight_shape: tuple[int, ...]) -> float:
  """sqrt(2 / fan_out): the reference code's init scale for S3 latents."""
  return math.sqrt(2.0 / fan_out(weight_shape))


def scaled_normal(key, shape, dtype, std: float) -> jax.Array:
  """``N(0, std**2)`` samples of ``shape`` and ``dtype``."""
  return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)


# ---------------------------------------------------------------------------------------
# Specs.


def _check_choice(cls_name: str, field: str, value: Any, allowed: tuple[str, ...]):
  if value not in allowed:
    raise ValueError(f"{cls_name} {field} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """Base spec: ``bits`` and an integer exponent offset ``e0`` (weights scale by 2**e0)."""
  bits: int = 3
  e0: int = 0

  MIN_BITS: ClassVar[int] = 2
  MAX_BITS: ClassVar[int] = 5

  def __post_init__(self):
    name = type(self).__name__
    if (not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool)
        or not self.MIN_BITS <= self.bits <= self.MAX_BITS):
      raise ValueError(
          f"{name} supports bits in {self.MIN_BITS}..{self.MAX_BITS}, got {self.bits!r}")
    if not isinstance(self.e0, (int, np.integer)) or isinstance(self.e0, bool):
      raise ValueError(f"{name} e0 must be an integer exponent offset, got {self.e0!r}")
    self._check_options()
    fmt = self.code_format
    layout = codes_lib.float_layout(jnp.float32)
    if fmt.e0 < layout.min_normal_exponent or fmt.max_exponent > layout.max_exponent:
      raise ValueError(
          f"{name}(bits={self.bits}, e0={self.e0}) spans exponents {fmt.e0}.."
          f"{fmt.max_exponent}, outside float32's normal range "
          f"{layout.min_normal_exponent}..{layout.max_exponent}; choose another e0")

  def _check_options(self):
    pass

  @property
  def name(self) -> str:
    """The method's name, e.g. ``'DenseShift'``."""
    return type(self).__name__

  @property
  def code_format(self) -> codes_lib.CodeFormat:
    """The N-bit code format of ``codes`` (``shiftjax.codes.CodeFormat``)."""
    raise NotImplementedError

  def values(self) -> np.ndarray:
    """Sorted float32 array of every value a weight can take."""
    return self.code_format.values().astype(np.float32)

  def init(self, key: jax.Array, shape, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Latents of one weight tensor of ``shape`` (HWIO or [in, out]).

    A dict of ``dtype`` arrays: per-weight latents have ``shape``; stacked latents
    (S3's ``'shift'``, DenseShift's ``'exponent'``) have ``[K, *shape]``.
    """
    raise NotImplementedError

  def weight(self, latents: Latents) -> jax.Array:
    """The quantized weight, latents' shape and dtype, exactly ``±2**p`` (or 0).

    Differentiable: the method's straight-through gradients reach every latent.
    """
    raise NotImplementedError

  def codes(self, latents: Latents) -> jax.Array:
    """uint8 N-bit codes of ``weight(latents)`` in ``code_format`` (no gradient)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _DeepShift(Quantizer):
  """What DeepShift's two modes share: a shift range ending at 0 and the rounding."""
  bits: int = 5
  rounding: str = "deterministic"

  MAX_BITS: ClassVar[int] = 8
  HAS_ZERO: ClassVar[bool] = False

  def _check_options(self):
    _check_choice(self.name, "rounding", self.rounding, ("deterministic", "stochastic"))

  @property
  def p_min(self) -> int:
    """Smallest shift; a format with a zero gives up one exponent for the zero code."""
    return -((1 << (self.bits - 1)) - 1 - int(self.HAS_ZERO))

  @property
  def code_format(self):
    return codes_lib.CodeFormat(self.bits, self.e0 + self.p_min, has_zero=self.HAS_ZERO)

  def _round(self, x: jax.Array, rng=None) -> jax.Array:
    """Round to nearest, or stochastically (up with probability frac(x)) given ``rng``."""
    if rng is not None and self.rounding == "stochastic":
      return jnp.floor(x + jax.random.uniform(rng, x.shape, x.dtype))
    return jnp.round(x)


@dataclasses.dataclass(frozen=True)
class DeepShiftQ(_DeepShift):
  """DeepShift-Q: ``W_q = B(W) * 2**round(clamp(log2|W|, p_min, 0))``, STE backward.

  ``p`` runs over ``-(2**(bits-1) - 1) .. 0`` (5 bits: -15..0): one sign bit and
  ``bits - 1`` shift bits, all ``2**bits`` codes used, so there is no zero (a latent of
  exactly 0 maps to ``+2**p_min``). With ``e0`` the range becomes ``p_min+e0 .. e0``.
  ``rounding='stochastic'`` rounds ``log2|W|`` up with probability equal to its
  fractional part when ``weight`` gets an ``rng``; without one it rounds to nearest
  (evaluation, export).
  """

  def init(self, key, shape, dtype=jnp.float32):
    return {"weight": scaled_normal(key, shape, dtype, math.sqrt(2.0 / fan_in(shape)))}

  def _exponent(self, w: jax.Array, rng=None) -> jax.Array:
    """Integer-valued exponent in ``p_min+e0 .. e0`` (no gradient needed)."""
    fmt = self.code_format
    tiny = jnp.asarray(2.0 ** fmt.e0, w.dtype)  # keeps log2 finite for w == 0
    log2 = jnp.log2(jnp.maximum(jnp.abs(w), tiny))
    return jnp.clip(self._round(log2, rng), fmt.e0, fmt.max_exponent)

  def weight(self, latents, rng=None):
    w = latents["weight"]
    return _identity_ste(w, sign_ste(jax.lax.stop_gradient(w)) *
                         pow2(self._exponent(jax.lax.stop_gradient(w), rng)))

  def codes(self, latents):
    w = latents["weight"]
    index = self._exponent(w) - self.code_format.e0
    return codes_lib.encode(w < 0, index, self.code_format)


@jax.custom_jvp
def _identity_ste(latent: jax.Array, quantized: jax.Array) -> jax.Array:
  """Returns ``quantized``; derivative is that of the identity on ``latent``."""
  del latent
  return quantized


@_identity_ste.defjvp
def _identity_ste_jvp(primals, tangents):
  return primals[1], tangents[0]


@dataclasses.dataclass(frozen=True)
class DeepShiftPS(_DeepShift):
  """DeepShift-PS: trains a shift ``P`` and a sign ``S`` directly.

  ``W = round(clamp(S, -1, 1)) * 2**round(clamp(P, p_min, 0))``, sign in {-1, 0, +1},
  ``p_min = -(2**(bits-1) - 2)`` (5 bits: -14..0; one code is reserved for zero).
  Gradients: ``dL/dP = dL/dW * W * ln 2`` (vanishes for pruned or very small weights),
  ``dL/dS = dL/dW``. Init: ``P ~ U(max(-10, p_min), -1)``, ``S ~ U(-1, 1)``.
  """
  HAS_ZERO: ClassVar[bool] = True

  def init(self, key, shape, dtype=jnp.float32):
    k_shift, k_sign = jax.random.split(key)
    low = max(-10, self.p_min)
    high = max(low, -1)  # 2 bits: p_min = 0, every shift starts at 0
    return {
        "shift": jax.random.uniform(k_shift, shape, dtype, low, high),
        "sign": jax.random.uniform(k_sign, shape, dtype, -1.0, 1.0),
    }

  def _shift_and_sign(self, latents, rng=None):
    p = self._round(jnp.clip(latents["shift"], self.p_min, 0), rng)
    s = jnp.round(jnp.clip(latents["sign"], -1, 1))
    return p, jnp.where(s == 0, jnp.zeros_like(s), s)  # +0, never -0

  def weight(self, latents, rng=None):
    p, s = self._shift_and_sign(jax.lax.stop_gradient(latents), rng)
    return _deepshift_ps(latents["shift"], latents["sign"], s * pow2(p + self.e0))

  def codes(self, latents):
    p, s = self._shift_and_sign(latents)
    return codes_lib.encode(s < 0, p - self.p_min, self.code_format, is_zero=s == 0)


@jax.custom_jvp
def _deepshift_ps(shift, sign, w):
  """Returns ``w``; derivatives ``dW/dP = W ln 2`` and ``dW/dS = 1`` (DeepShift-PS)."""
  del shift, sign
  return w


@_deepshift_ps.defjvp
def _deepshift_ps_jvp(primals, tangents):
  w = primals[2]
  return w, tangents[0] * w * jnp.asarray(LN2, w.dtype) + tangents[1]


@dataclasses.dataclass(frozen=True)
class S3(Quantizer):
  """S3 sign-sparse-shift reparametrization.

  ``ternary = B(W_sign) * 1(W_sparse)``, ``P = chain(1(W_shift))`` in 0..2**(bits-1)-2,
  ``W = ternary * 2**(P + e0)``. 3 bits: two shift latents and ``P = 1(W_s1) *
  (1(W_s2) + 1)`` exactly as the reference code, values {0, +-1, +-2, +-4}; the
  reference's ``W_s1`` is ``shift[-1]`` and ``W_s2`` is ``shift[0]`` (the chain runs
  from index 0). 2 bits is ternary (no shift latents); 4 and 5 bits extend the chain
  (UNVERIFIED extension, see PAPERS.md). Straight-through binarizers, ordinary autodiff
  through the product and ``2**P``: pruned weights (``1(W_sparse) = 0``) give zero
  gradient to their sign and shift latents.

  init: ``'low_variance'`` (default; every latent ~ N(0, 1e-3**2), DenseShift's init, not
  in the S3 paper), ``'he'`` (every latent ~ N(0, 2/fan_out), the final reference code)
  or ``'dense'`` (every weight starts at +-1: ``W_sparse = |N|``, shift latents ``-|N|``).
  Why low variance by default: the latents' gradients scale like those of weights of
  magnitude 1..4, so He-sized latents (std ~0.06 in a 3x3x64 conv) take many steps to
  cross a threshold, while latents next to their thresholds flip from the first steps
  on. On the main job (ResNet-8, 6 epochs) it gave 3-bit S3 +2.3 points over ``'he'``,
  0.1 points from float (README, 3 seeds). The paper recipes keep ``'he'``.
  """
  init_method: str = "low_variance"

  def _check_options(self):
    _check_choice(self.name, "init_method", self.init_method, ("he", "dense", "low_variance"))

  @property
  def num_shift_latents(self) -> int:
    return (1 << (self.bits - 1)) - 2

  @property
  def code_format(self):
    return codes_lib.CodeFormat(self.bits, self.e0, has_zero=True)

  def init(self, key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    keys = jax.random.split(key, 3)
    std = (DenseShift.LOW_VARIANCE_STD if self.init_method == "low_variance"
           else he_fan_out_std(shape))
    latents = {
        "sign": scaled_normal(keys[0], shape, dtype, std),
        "sparse": scaled_normal(keys[1], shape, dtype, std),
    }
    # Ternary S3 (2 bits) has no shift latents; orbax cannot checkpoint a [0, ...] array,
    # so the entry is left out rather than stored empty.
    if self.num_shift_latents:
      latents["shift"] = scaled_normal(keys[2], (self.num_shift_latents,) + shape, dtype,
                                       std)
    if self.init_method == "dense":
      latents["sparse"] = jnp.abs(latents["sparse"])
      if "shift" in latents:
        latents["shift"] = -jnp.abs(latents["shift"])
    return latents

  def weight(self, latents):
    sign = latents["sign"]
    ternary = sign_ste(sign) * step_ste(latents["sparse"])
    p = chain_exponent(step_ste(latents["shift"])) if self.num_shift_latents else (
        jnp.zeros_like(sign))
    return positive_zero(ternary * pow2(p + self.e0))

  def codes(self, latents):
    index = chain_exponent((latents["shift"] > 0).astype(jnp.int32)) if self.num_shift_latents else (
        jnp.zeros(latents["sign"].shape, jnp.int32))
    return codes_lib.encode(latents["sign"] < 0, index, self.code_format,
                            is_zero=latents["sparse"] <= 0)


def s3_regularizer(latents: Any) -> jax.Array:
  """S3's dense-weight regularizer: sum of ``max(-W_sparse, 0)`` over all layers.

  Accepts one layer's latents or any pytree of parameters; every leaf stored under the
  key ``'sparse'`` counts. The training loss adds ``alpha * s3_regularizer(params)``
  (alpha = 1e-5 in the reference code); it pushes weights away from zero.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(latents)[0]:
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.DictKey) and last.key == "sparse":
      total = total + jnp.sum(jnp.maximum(-leaf, 0)).astype(jnp.float32)
  return total


@dataclasses.dataclass(frozen=True)
class DenseShift(Quantizer):
  """DenseShift: zero-free ``W = B(W_sign) * 2**(S + e0)``, S in 0..2**(bits-1)-1.

  encoding: ``'chain'`` (the reference sign-scale decomposition: ``2**(bits-1) - 1``
  exponent latents, ``S_k = (S_{k-1} + 1) * 1(W_k)``) or ``'binary'`` (``bits - 1``
  latents, ``S = sum_i 2**i 1(W_i)``). Exponent latents are stacked in ``'exponent'``.
  surrogate: ``'sqrt'`` (reference: gradients taken through
  ``B(W_sign) * sqrt(S + 1) * 2**e0``) or ``'exact'`` (autodiff through ``2**S``).
  init_method: ``'low_variance'`` (every latent ~ N(0, 1e-3**2), the reference) or
  ``'he'`` (N(0, 2/fan_out)).
  """
  encoding: str = "chain"
  surrogate: str = "sqrt"
  init_method: str = "low_variance"

  LOW_VARIANCE_STD: ClassVar[float] = 1e-3

  def _check_options(self):
    _check_choice(self.name, "encoding", self.encoding, ("chain", "binary"))
    _check_choice(self.name, "surrogate", self.surrogate, ("sqrt", "exact"))
    _check_choice(self.name, "init_method", self.init_method, ("low_variance", "he"))

  @property
  def num_exponent_latents(self) -> int:
    if self.encoding == "chain":
      return (1 << (self.bits - 1)) - 1
    return self.bits - 1

  @property
  def code_format(self):
    return codes_lib.CodeFormat(self.bits, self.e0, has_zero=False)

  def init(self, key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    k_sign, k_exp = jax.random.split(key)
    exp_shape = (self.num_exponent_latents,) + shape
    std = (self.LOW_VARIANCE_STD if self.init_method == "low_variance"
           else he_fan_out_std(shape))
    return {"sign": scaled_normal(k_sign, shape, dtype, std),
            "exponent": scaled_normal(k_exp, exp_shape, dtype, std)}

  def _exponent(self, bits: jax.Array) -> jax.Array:
    return chain_exponent(bits) if self.encoding == "chain" else binary_exponent(bits)

  def weight(self, latents):
    sign = sign_ste(latents["sign"])
    s = self._exponent(step_ste(latents["exponent"]))
    w = sign * pow2(s + self.e0)
    if self.surrogate == "exact":
      return w
    scale = jnp.asarray(2.0 ** self.e0, w.dtype)
    return forward_with_grad_of(w, sign * jnp.sqrt(s + 1) * scale)

  def codes(self, latents):
    index = self._exponent((latents["exponent"] > 0).astype(jnp.int32))
    return codes_lib.encode(latents["sign"] < 0, index, self.code_format)


QUANTIZERS = {cls.__name__: cls for cls in (DeepShiftQ, DeepShiftPS, S3, DenseShift)}


def get(name: str, **kwargs) -> Quantizer | None:
  """Builds a spec by name (``'float'`` or ``'none'`` gives None: a float layer)."""
  if name.lower() in ("float", "none", ""):
    return None
  by_lower = {k.lower(): v for k, v in QUANTIZERS.items()}
  if name.lower() not in by_lower:
    allowed = ["float"] + list(QUANTIZERS)
    raise ValueError(f"unknown quantizer {name!r}; allowed: {allowed}")
  return by_lower[name.lower()](**kwargs)
