"""Activation quantizers: the activation counterpart of ``shiftjax.quantizers``.

Each quantizer is a frozen dataclass *spec* (hashable, so it can be a static argument of
``jax.jit``) with pure methods:

  ``param_shapes()``     -> learned parameters, name -> shape (``{}`` if none),
  ``init(dtype)``        -> their initial values (deterministic, no key),
  ``quantize(params, x)`` -> x's shape and dtype, straight-through gradients,
  ``levels(params)``     -> every value ``quantize`` can output, sorted float32.

Plain jax and numpy only (no flax): ``shiftjax.deploy`` imports this module so that a packed
model's forward pass calls the very ``quantize`` that training called, and its activations
match bit for bit. ``to_json`` / ``from_json`` store a spec in a packed model's header.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, jax.Array]
MAX_LEVELS = 1 << 16  # ``levels`` lists values; wider formats are described, not listed


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_int(cls_name: str, field: str, value: Any, lo: int, hi: int):
  if not _is_int(value) or not lo <= value <= hi:
    raise ValueError(f"{cls_name} supports {field} in {lo}..{hi}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
  """Base spec. Subclasses define ``bits`` (a field or a property) and ``_check``."""
  MIN_BITS: ClassVar[int]
  MAX_BITS: ClassVar[int]

  def __post_init__(self):
    self._check()

  def _check(self):
    raise NotImplementedError

  @property
  def name(self) -> str:
    """The method's name, e.g. ``'PACT'``."""
    return type(self).__name__

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    """Learned parameters, name -> shape; ``{}`` for a fixed quantizer."""
    return {}

  def init(self, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Initial values of the learned parameters, shapes ``param_shapes()``."""
    return {}

  def quantize(self, params: Params, x: jax.Array) -> jax.Array:
    """Quantized ``x`` (same shape and dtype) with straight-through gradients."""
    raise NotImplementedError

  def levels(self, params: Params) -> np.ndarray:
    """Sorted float32 array of every value ``quantize`` outputs for float32 ``x``."""
    raise NotImplementedError


def _pact_scales(alpha: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """``(alpha / n, n / alpha)``, each a correctly rounded division.

  XLA would otherwise change them: it turns a division by a constant (``alpha / 7``) into a
  multiplication by the rounded reciprocal (``alpha * 0.142857149``, an ulp off), and a
  division by a broadcast scalar (``y / step``, or ``alpha / n`` under vmap) into
  ``y * (1 / step)``, in some programs and not others (eager and jit disagreed). So ``n``
  is made from alpha's value (batched like alpha under vmap, never a broadcast constant)
  and both pass a barrier that keeps a constant alpha from being folded differently.
  """
  n = jnp.where(jnp.isnan(alpha), alpha, jnp.asarray(n, alpha.dtype))
  alpha, n = jax.lax.optimization_barrier((alpha, n))
  return alpha / n, n / alpha


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _pact(x: jax.Array, alpha: jax.Array, n: int, signed: bool) -> jax.Array:
  # ``levels`` and the deploy path rely on exactly these ops in this order. Per element
  # there are only clip, multiply and round, which IEEE arithmetic rounds one way and XLA
  # leaves alone; ``y / step`` would be rewritten (see _pact_scales). The two scalar
  # divisions are IEEE on CPU; XLA:GPU's f32 division may be an ulp off, which moves the
  # levels there, but equally in training and deployment.
  step, inv_step = _pact_scales(alpha, n)
  lo = -alpha if signed else jnp.zeros_like(alpha)
  return jnp.round(jnp.clip(x, lo, alpha) * inv_step) * step


@_pact.defjvp
def _pact_jvp(n, signed, primals, tangents):
  x, alpha = primals
  tx, talpha = tangents
  lo = -alpha if signed else jnp.zeros_like(alpha)
  in_range = ((x >= lo) & (x <= alpha)).astype(x.dtype)
  outside = (x > alpha).astype(x.dtype)
  if signed:
    outside = outside - (x < lo).astype(x.dtype)
  # Linear in (tx, talpha): reverse mode transposes the broadcast of the scalar talpha
  # into the sum over x that dq/dalpha needs.
  return _pact(x, alpha, n, signed), tx * in_range + talpha * outside


@dataclasses.dataclass(frozen=True)
class PACT(ActivationQuantizer):
  """PACT (Choi et al. 2018, arXiv:1805.06085): uniform levels on a learned clip ``alpha``.

  Unsigned (after a ReLU): ``n = 2**bits - 1``, ``y = clip(x, 0, alpha)``; signed (inputs
  that can be negative, e.g. normalized images at a stem): ``n = 2**(bits-1) - 1``,
  ``y = clip(x, -alpha, alpha)``. Then ``step = alpha / n`` and
  ``q = round(y * (n / alpha)) * step`` (half to even; the multiplication stands for
  ``y / step``, which XLA would not compute as written: see ``_pact_scales``), levels
  ``k * step`` for k in 0..n (or -n..n). The top level is
  ``n * (alpha / n)`` in floating point, which can differ from ``alpha`` by one ulp.

  Gradients (paper eqs. 3-4, straight through round): ``dq/dx = 1`` for ``lo <= x <=
  alpha``, else 0; ``dq/dalpha = 1`` where ``x > alpha`` (and -1 where ``x < -alpha`` if
  signed). Inside the range the STE treats round as the identity, so ``dq/dalpha = 0``
  there: PACT's choice, not the derivative of the rounding error.

  Why PACT and not LSQ (Esser et al. 2020): the learned parameter is the clip range itself,
  which is what a deployed model stores and a user reads; its gradient needs neither a
  data-dependent initialization nor LSQ's ``1/sqrt(N*Qp)`` gradient scale; and it is
  defined for the unsigned ReLU outputs that feed every quantized conv of a ResNet.

  ``alpha > 0`` is not checked in ``quantize`` (it is traced); with ``alpha <= 0`` the
  output is meaningless (``alpha = 0`` gives NaN).
  """
  bits: int = 4
  init_clip: float = 6.0
  signed: bool = False

  MIN_BITS: ClassVar[int] = 2
  MAX_BITS: ClassVar[int] = 8

  def _check(self):
    _check_int(self.name, "bits", self.bits, self.MIN_BITS, self.MAX_BITS)
    c = self.init_clip
    if (not isinstance(c, (int, float, np.integer, np.floating)) or isinstance(c, bool)
        or not math.isfinite(c) or c <= 0):
      raise ValueError(f"{self.name} init_clip must be a finite number > 0, got {c!r}")
    if not isinstance(self.signed, (bool, np.bool_)):
      raise ValueError(f"{self.name} signed must be True or False, got {self.signed!r}")
    # Normalized so that equal specs have equal reprs and JSON (6 and 6.0 alike).
    object.__setattr__(self, "init_clip", float(c))
    object.__setattr__(self, "signed", bool(self.signed))

  @property
  def n(self) -> int:
    """Number of steps from 0 to alpha."""
    return (1 << (self.bits - 1 if self.signed else self.bits)) - 1

  def param_shapes(self):
    return {"clip": ()}

  def init(self, dtype=jnp.float32):
    return {"clip": jnp.asarray(self.init_clip, dtype)}

  def quantize(self, params, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{self.name} quantizes floating-point activations, got {x.dtype}")
    alpha = jnp.asarray(params["clip"])
    if alpha.shape != ():
      raise ValueError(f"{self.name} clip must be a scalar, got shape {alpha.shape}")
    # The cast is outside the custom_jvp so its own derivative carries alpha's gradient.
    return _pact(x, alpha.astype(x.dtype), self.n, self.signed)

  def levels(self, params):
    alpha = np.float32(np.asarray(params["clip"]))
    if not (np.isfinite(alpha) and alpha > 0):
      raise ValueError(f"{self.name} levels need a finite clip > 0, got {alpha!r}")
    step = alpha / np.float32(self.n)
    k = np.arange(-self.n if self.signed else 0, self.n + 1).astype(np.float32)
    return k * step


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fixed_point(x: jax.Array, integer_bits: int, fraction_bits: int) -> jax.Array:
  delta = 2.0 ** -fraction_bits
  bound = 2.0 ** (integer_bits - 1)
  return jnp.clip(jnp.floor(x / delta) * delta, -bound, bound - 1)


@_fixed_point.defjvp
def _fixed_point_jvp(integer_bits, fraction_bits, primals, tangents):
  # The reference's RoundFixedPoint passes the gradient unchanged, also outside the clamp.
  return _fixed_point(primals[0], integer_bits, fraction_bits), tangents[0]


@dataclasses.dataclass(frozen=True)
class FixedPoint(ActivationQuantizer):
  """DeepShift's signed fixed-point activations (Elhoushi et al., ``round_to_fixed``).

  ``delta = 2**-fraction_bits``, ``bound = 2**(integer_bits-1)``,
  ``q = clip(floor(x / delta) * delta, -bound, bound - 1)``, identity gradient everywhere.
  This follows the reference exactly: floor, not round, and the upper clamp is
  ``bound - 1``, not ``bound - delta`` (so ``bound - 1 + delta .. bound - delta`` are never
  output). ``bits = integer_bits + fraction_bits``. integer_bits = 1 is refused: the
  reference's branch for it returns ``sign(x) - 1`` (in {-2, -1, 0}, ignoring
  fraction_bits), which is not a rounding of x. In float32, ``bound - 1`` rounds to
  ``bound`` for integer_bits > 25, as it does in the reference.
  """
  integer_bits: int = 16
  fraction_bits: int = 16

  MIN_BITS: ClassVar[int] = 2
  MAX_BITS: ClassVar[int] = 64

  def _check(self):
    _check_int(self.name, "integer_bits", self.integer_bits, 2, 32)
    _check_int(self.name, "fraction_bits", self.fraction_bits, 0, 32)

  @property
  def bits(self) -> int:
    return int(self.integer_bits + self.fraction_bits)

  def quantize(self, params, x):
    del params
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{self.name} quantizes floating-point activations, got {x.dtype}")
    return _fixed_point(x, int(self.integer_bits), int(self.fraction_bits))

  def levels(self, params=None):
    del params
    per_unit = 1 << self.fraction_bits
    k_lo = -(1 << (self.integer_bits - 1)) * per_unit
    k_hi = ((1 << (self.integer_bits - 1)) - 1) * per_unit
    count = k_hi - k_lo + 1
    if count > MAX_LEVELS:
      raise ValueError(f"{self!r} has {count} levels, more than the {MAX_LEVELS} that "
                       f"levels lists")
    return (np.arange(k_lo, k_hi + 1) / per_unit).astype(np.float32)  # exact: count small


ACTIVATION_QUANTIZERS = {"PACT": PACT, "FixedPoint": FixedPoint}


def get(name: str, **kwargs) -> ActivationQuantizer | None:
  """Builds a spec by name, case-insensitive (``'float'``, ``'none'``, ``''``: None)."""
  if name.lower() in ("float", "none", ""):
    return None
  by_lower = {k.lower(): v for k, v in ACTIVATION_QUANTIZERS.items()}
  if name.lower() not in by_lower:
    allowed = ["float"] + list(ACTIVATION_QUANTIZERS)
    raise ValueError(f"unknown activation quantizer {name!r}; allowed: {allowed}")
  return by_lower[name.lower()](**kwargs)


def _json_value(v: Any) -> Any:
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  return int(v) if _is_int(v) else float(v)


def to_json(spec: ActivationQuantizer | None) -> dict | None:
  """``{"name": ..., "fields": {...}}`` of a spec (None for float); see ``from_json``."""
  if spec is None:
    return None
  if not isinstance(spec, ActivationQuantizer):
    raise ValueError(f"not an activation quantizer spec: {spec!r}")
  return {"name": spec.name,
          "fields": {f.name: _json_value(getattr(spec, f.name))
                     for f in dataclasses.fields(spec)}}


def from_json(obj: Any) -> ActivationQuantizer | None:
  """Rebuilds a spec from ``to_json``'s output, validating it (no code run)."""
  if obj is None:
    return None
  if not isinstance(obj, Mapping):
    raise ValueError(f"activation quantizer must be null or an object with name and "
                     f"fields, got {obj!r}")
  if set(obj) != {"name", "fields"}:
    raise ValueError(f"activation quantizer object must have exactly the keys name and "
                     f"fields; missing {sorted(set(('name', 'fields')) - set(obj))}, "
                     f"extra {sorted(map(str, set(obj) - {'name', 'fields'}))}")
  name, fields = obj["name"], obj["fields"]
  cls = ACTIVATION_QUANTIZERS.get(name) if isinstance(name, str) else None
  if cls is None:
    raise ValueError(f"unknown activation quantizer {name!r}; known: "
                     f"{list(ACTIVATION_QUANTIZERS)}")
  allowed = {f.name for f in dataclasses.fields(cls)}
  if not isinstance(fields, Mapping):
    raise ValueError(f"{name} fields must be an object, got {fields!r}")
  if not set(fields) <= allowed:
    raise ValueError(f"{name} has no field(s) {sorted(map(str, set(fields) - allowed))}; "
                     f"its fields are {sorted(allowed)}")
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"invalid activation quantizer {name}{dict(fields)}: {e}") from None
