"""Which spec every layer of a model gets: its weight quantizer and its input quantizer.

Shared by the flax layers (``shiftjax.layers``), which create latents or float kernels
and activation ranges by it, and the packed forward pass (``shiftjax.deploy``), which
rebuilds from a file's patterns what every layer holds; it needs neither flax nor the
training stack.

Layers are named by their path below the model (``'stage1_block0/conv1'``); rules are
``fnmatch`` globs matched against the whole path. A layer's weight spec is, in order:
the spec of the one rule of ``full_precision`` (float) and ``layer_quantizers`` that
matches it, else ``quantizer``. Its input (activation) spec: the one rule of
``layer_activations`` that matches it, else ``activation`` if its weights are
quantized, else float. Two rules that give one layer two different specs are an error
(``PolicyError`` naming the layer and both patterns), never a silent precedence.

A parameter that the user's own code multiplies with (``jnp.einsum(..., w)``,
``lax.dot_general``, ``x @ w``), outside flax's layers, is named by its own path,
``'<module path>/<param name>'``, in ``parameter_quantizers``. Only the parameters a rule
names are quantized: ``quantizer`` never reaches them, as an embedding table, a
positional embedding or a norm's scale are parameters too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Iterable, Mapping, Sequence

from shiftjax import quantizers as qz

# The reference code keeps the stem conv and the classifier in full precision.
DEFAULT_FULL_PRECISION = ("stem", "head")

# A rule: (glob pattern, spec or None); a spec is a weight or an activation quantizer.
Rules = tuple[tuple[str, Any], ...]


class PolicyError(ValueError):
  """A rule matches no layer, two rules give a layer two specs, or a rule is malformed."""


def _describe(spec) -> str:
  return "float" if spec is None else repr(spec)


def _check_rules(field: str, rules: Any) -> None:
  if isinstance(rules, str) or not isinstance(rules, (tuple, list)) or not all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules):
    raise PolicyError(f"{field} must be a tuple of (glob pattern, spec) pairs, got "
                      f"{rules!r}")


def _match(name: str, rules: Iterable[tuple[str, Any]], what: str):
  """``(found, spec)``: the spec of the rules matching ``name``, if any; PolicyError when
  two matching rules disagree."""
  hits = [(pattern, spec) for pattern, spec in rules if fnmatch.fnmatchcase(name, pattern)]
  for pattern, spec in hits[1:]:
    if spec != hits[0][1]:
      raise PolicyError(
          f"layer {name!r} gets two {what} specs: pattern {hits[0][0]!r} gives "
          f"{_describe(hits[0][1])} and pattern {pattern!r} gives {_describe(spec)}; "
          "make the patterns disjoint (a full_precision layer cannot also get a "
          "quantizer)")
  return (True, hits[0][1]) if hits else (False, None)


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
  """The weight and input specs of every layer of a model (see the module docstring).

  Attributes:
    quantizer: weight spec of every layer no rule names (None: float).
    full_precision: patterns of layers whose weights stay float.
    layer_quantizers: ``(pattern, weight spec or None)`` rules, e.g. mixed widths
      ``(('stage1_*/*', DenseShift(4)), ('stage3_*/*', DenseShift(4)))``.
    activation: input spec (``shiftjax.activations``) of every quantized layer no
      activation rule names (None: float inputs).
    layer_activations: ``(pattern, activation spec or None)`` rules, e.g.
      ``(('stem', PACT(8, signed=True)),)`` to quantize the images too.
    parameter_quantizers: ``(pattern, weight spec)`` rules over the paths of parameters
      outside flax's layers (``'blocks/*/attention/qkv'``): those the user's code
      multiplies with. Their inputs stay float (the library never sees the op).
  """
  quantizer: qz.Quantizer | None = None
  full_precision: tuple[str, ...] = ()
  layer_quantizers: Rules = ()
  activation: Any = None
  layer_activations: Rules = ()
  parameter_quantizers: Rules = ()

  def __post_init__(self):
    if isinstance(self.full_precision, str) or not all(
        isinstance(p, str) for p in self.full_precision):
      raise PolicyError(f"full_precision must be a tuple of patterns, got "
                        f"{self.full_precision!r}")
    _check_rules("layer_quantizers", self.layer_quantizers)
    _check_rules("layer_activations", self.layer_activations)
    _check_rules("parameter_quantizers", self.parameter_quantizers)
    for pattern, spec in self.layer_quantizers:
      if spec is not None and not isinstance(spec, qz.Quantizer):
        raise PolicyError(f"layer_quantizers pattern {pattern!r}: {spec!r} is not a "
                          "weight quantizer spec (shiftjax.quantizers) or None")
    for pattern, spec in self.parameter_quantizers:
      if not isinstance(spec, qz.Quantizer):
        raise PolicyError(f"parameter_quantizers pattern {pattern!r}: {spec!r} is not a "
                          "weight quantizer spec (shiftjax.quantizers); a parameter no "
                          "rule names stays float")

  def _weight_rules(self) -> list[tuple[str, Any]]:
    return [(p, None) for p in self.full_precision] + [tuple(r) for r in self.layer_quantizers]

  def quantizer_for(self, path: Sequence[str] | str) -> qz.Quantizer | None:
    """The weight spec of the layer at ``path`` (None: kept full precision)."""
    name = path if isinstance(path, str) else "/".join(path)
    found, spec = _match(name, self._weight_rules(), "weight")
    return spec if found else self.quantizer

  def parameter_quantizer_for(self, path: str) -> qz.Quantizer | None:
    """The weight spec of the parameter at ``path`` (``'<module path>/<name>'``; None:
    no rule names it, it stays float)."""
    return _match(path, self.parameter_quantizers, "parameter")[1]

  def activation_for(self, path: Sequence[str] | str):
    """The spec of the layer's input (None: float inputs)."""
    name = path if isinstance(path, str) else "/".join(path)
    found, spec = _match(name, self.layer_activations, "activation")
    if found:
      return spec
    return self.activation if self.quantizer_for(name) is not None else None

  def check_patterns(self, layer_names: Sequence[str]) -> None:
    """PolicyError unless every rule's pattern matches one of ``layer_names`` and no
    layer gets two specs; call it with every conv and dense layer of the model."""
    for field, patterns in (("layer_quantizers", [p for p, _ in self.layer_quantizers]),
                            ("layer_activations", [p for p, _ in self.layer_activations]),
                            ("full_precision", self.full_precision)):
      for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names):
          shown = ", ".join(layer_names[:6]) + (", ..." if len(layer_names) > 6 else "")
          raise PolicyError(f"{field} pattern {pattern!r} matches no layer of the model "
                            f"(layers: {shown})")
    for name in layer_names:
      self.quantizer_for(name)
      self.activation_for(name)

  def check_model(self, layers: Mapping[str, str], modules: Mapping[str, str] = {},
                  parameters: Sequence[str] = ()) -> None:
    """PolicyError unless the rules fit a model: ``layers`` maps the path of every layer a
    shift spec can serve (a matmul or conv) to its kind, ``modules`` every other module's.

    A model with no such layer; a weight or activation rule matching no layer (naming
    another kind of module, or a parameter, when it matches one of those instead); a
    layer given two specs. ``full_precision`` patterns may name any module: keeping
    something float needs no kernel. ``parameters``: the paths of the parameters outside
    flax's layers, which ``parameter_quantizers`` rules must name.
    """
    self._check_parameter_rules(layers, parameters)
    if not layers and not self.parameter_quantizers:
      shown = _shown(f"{p} ({k})" for p, k in modules.items()) or "none"
      raise PolicyError(f"the model has no layer a shift spec can serve ({SERVED_KINDS}); "
                        f"its modules: {shown}")
    quantizable = sorted(layers)
    weight_rules = [("layer_quantizers", p) for p, s in self.layer_quantizers if s is not None]
    rules = weight_rules + [("layer_activations", p) for p, s in self.layer_activations
                            if s is not None]
    for field, pattern in rules:
      if not any(fnmatch.fnmatchcase(n, pattern) for n in quantizable):
        raise PolicyError(f"{field} pattern {pattern!r} {_unserved(pattern, layers, modules)}")
    for field, pattern in ([("full_precision", p) for p in self.full_precision] +
                           [("layer_quantizers", p) for p, s in self.layer_quantizers
                            if s is None]):
      if not any(fnmatch.fnmatchcase(n, pattern) for n in [*quantizable, *modules]):
        raise PolicyError(f"{field} pattern {pattern!r} {_unserved(pattern, layers, modules)}")
    for name in quantizable:
      self.quantizer_for(name)
      self.activation_for(name)

  def _check_parameter_rules(self, layers: Mapping[str, str], parameters: Sequence[str]):
    for pattern, _ in self.parameter_quantizers:
      if any(fnmatch.fnmatchcase(p, pattern) for p in parameters):
        continue
      kernels = [f"{p}/{name}" for p in layers for name in ("kernel", "bias")
                 if fnmatch.fnmatchcase(f"{p}/{name}", pattern) or
                 fnmatch.fnmatchcase(p, pattern)]
      if kernels:
        raise PolicyError(
            f"parameter_quantizers pattern {pattern!r} names a layer's parameters "
            f"({_shown(kernels, 6)}): a layer's kernel takes its spec from "
            "layer_quantizers by the layer's path (biases stay float)")
      raise PolicyError(f"parameter_quantizers pattern {pattern!r} matches no parameter "
                        "outside the model's layers; those parameters: "
                        f"{_shown(sorted(parameters)) or 'none'}")
    for path in parameters:
      self.parameter_quantizer_for(path)

  def weight_specs(self, layer_names: Iterable[str]) -> dict[str, qz.Quantizer]:
    """``{layer: weight spec}`` of the quantized layers among ``layer_names``."""
    specs = {n: self.quantizer_for(n) for n in layer_names}
    return {n: q for n, q in specs.items() if q is not None}

  @property
  def is_float(self) -> bool:
    """Whether no layer gets a weight or an input spec: the model stays float."""
    return (self.quantizer is None and all(s is None for _, s in self.layer_quantizers)
            and all(s is None for _, s in self.layer_activations)
            and not self.parameter_quantizers)

  @property
  def is_mixed(self) -> bool:
    """Whether some layers' weight specs differ from ``quantizer`` by a rule."""
    return any(spec != self.quantizer for _, spec in self.layer_quantizers)


SERVED_KINDS = ("Dense, DenseGeneral, Conv, Einsum; in NNX Linear, LinearGeneral, Conv, "
                "Einsum")


def _shown(names: Iterable[str], limit: int = 40) -> str:
  names = list(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit
                                      else "")


def _unserved(pattern: str, layers: Mapping[str, str], modules: Mapping[str, str]) -> str:
  """Why ``pattern`` matches no quantizable layer, for an error message."""
  others = [f"{p!r} ({k})" for p, k in modules.items() if fnmatch.fnmatchcase(p, pattern)]
  if others:
    return (f"matches {_shown(others, 6)}, which a shift spec cannot serve: specs serve "
            f"the kernels of {SERVED_KINDS}")
  params = [f"{p}/{name}" for p in layers for name in ("kernel", "bias")
            if fnmatch.fnmatchcase(f"{p}/{name}", pattern)]
  if params:
    return (f"names parameters ({_shown(params, 6)}); rules name layers by module path, "
            "and a layer's spec quantizes its kernel (biases stay float)")
  return f"matches no layer of the model; its layers: {_shown(sorted(layers))}"


def spec_of(specs: Any, name: str):
  """``specs[name]`` for a ``{layer path: spec}`` mapping, else ``specs`` itself (one spec
  for every layer): what functions that take "a quantizer or one per layer" look up."""
  if isinstance(specs, Mapping):
    if name not in specs:
      raise KeyError(f"no spec for layer {name!r}; the mapping has {sorted(specs)[:6]}")
    return specs[name]
  return specs


def parse_rules(field: str, text: str | Sequence[str]) -> list[tuple[str, str]]:
  """``'stage1_*/*=4, head=float'`` (or a sequence of ``'pattern=value'``) as
  ``[(pattern, value), ...]``; PolicyError naming ``field`` and the entry if malformed."""
  entries = text.split(",") if isinstance(text, str) else list(text)
  rules = []
  for entry in entries:
    entry = entry.strip()
    if not entry:
      continue
    pattern, sep, value = entry.partition("=")
    if not sep or not pattern.strip() or not value.strip():
      raise PolicyError(f"{field} entry {entry!r} is not 'pattern=value' (e.g. "
                        "'stage1_*/*=4')")
    rules.append((pattern.strip(), value.strip()))
  return rules


def is_latent_kernel(kernel) -> bool:
  """Whether a ``'kernel'`` param holds quantizer latents (a dict) or float weights."""
  return isinstance(kernel, dict) or hasattr(kernel, "keys")
