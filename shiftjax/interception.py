"""Shift-quantize any Flax model, linen or NNX, by rules over its module paths.

``quantize_model(model, policy)`` returns a copy of a float model whose matmuls and
convolutions take their weight spec (and input spec) from ``policy`` (a
``shiftjax.policy.LayerPolicy``) by their module path:

* linen (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Einsum``): the model's
  ``__call__`` runs under ``nn.intercept_methods``. A layer the policy quantizes stores
  its quantizer's latents as its ``'kernel'`` param (a dict) and runs its own flax
  forward pass on ``spec.weight(latents)``; its input goes through its activation spec
  first, whose learned ranges are its ``'activation'`` param. So a quantized model's
  variables are those of ``shiftjax.layers.ShiftDense``/``ShiftConv`` at the same paths.
* NNX (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``): the layers
  of a clone of the model get a ``ShiftKernel`` (an ``nnx.Param`` holding the latents
  dict, read as the quantized weight) in place of their float kernel, and, with an
  input spec, an ``activation`` param and a ``__call__`` that quantizes the input.

A parameter outside those layers that the user's own code multiplies with
(``jnp.einsum(..., w)``, ``lax.dot_general``, ``x @ w``) is quantized when a
``parameter_quantizers`` rule names its path (``'<module path>/<name>'``): in linen its
module's ``self.param(name, ...)`` creates the latents under that name (as
``{'kernel': latents}``, see ``LATENTS``) and returns the quantized weight; in NNX the
``nnx.Param`` attribute becomes a ``ShiftParameter``, which
reads as the quantized weight however the code reads it (``w[...]``, ``w.value``,
``jnp.asarray(w)``, ``jnp.einsum(..., w)``, ``x @ w``). Its record's kind is ``'Param'``.

Every layer keeps running flax's own code, so everything the layer supports (dtype
promotion, feature groups, dilation, padding modes, bias broadcasting) works unchanged;
only the kernel it reads is quantized. Gradients are the quantizers' straight-through
ones.

Why not a qwix provider: qwix intercepts the primitive (``dot_general``, ``conv``) and
hands its provider the float kernel that the layer already read from its params, so the
stored parameter stays a float array of the kernel's shape. Shift quantizers learn
latents of other shapes (S3's and DenseShift's stacked bit latents, DeepShift-PS's
shift and sign), so the parameter itself must change; a provider could only add the
latents beside an unused float kernel (twice the memory and optimizer state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import policy as policy_lib
from shiftjax import quantizers as qz

# The float layers whose kernels a shift spec replaces, by framework.
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


# Marks the subclasses this library makes of a user's classes (they keep its name).
DYNAMIC = "_shiftjax_dynamic"


def user_class(cls: type) -> type:
  """The user's class under the subclasses ``quantize_model``/``pack_model`` make."""
  while cls.__dict__.get(DYNAMIC):
    cls = cls.__mro__[1]
  return cls


def subclass(base: type, **attributes) -> type:
  """A subclass of a user's class with ``attributes`` (methods, class fields), named and
  placed as ``base`` (reprs and errors show the user's name) and marked ``DYNAMIC``."""
  return type(base.__name__, (base,), {"__module__": base.__module__,
                                       "__qualname__": base.__qualname__, DYNAMIC: True,
                                       **attributes})


def around_linen_method(method: Callable, around: Callable) -> Callable:
  """A linen ``method`` as ``around(self, call)`` runs it (``call()`` runs the method on
  its arguments), for a subclass: unwrapped from linen's method handler, which the new
  class re-applies, and still ``compact`` if it was."""
  inner = method.__wrapped__ if hasattr(method, "method_handler_wrapped") else method

  @functools.wraps(inner)
  def run(self, *args, **kwargs):
    return around(self, lambda: inner(self, *args, **kwargs))

  if hasattr(inner, "compact"):
    run.compact = inner.compact
  return run


@dataclasses.dataclass
class LayerRecord:
  """One quantizable layer as a traced call saw it (for checks and ``summary``)."""
  kind: str
  weight_spec: qz.Quantizer | None
  input_spec: Any
  kernel_shape: tuple[int, ...] = ()
  output_shape: tuple[int, ...] = ()
  has_bias: bool = False
  out_features: int = 0  # the kernel's elements per contraction: outputs it feeds


# The kind of a quantized parameter outside flax's layers (a LayerRecord's, a file's).
PARAM_KIND = "Param"
# A quantized parameter holds its latents under this key, as a layer holds them under
# its 'kernel': what finds latents by that name (the latent learning-rate scale, weight
# decay masks: shiftjax.optim) finds these too.
LATENTS = "kernel"


@dataclasses.dataclass
class CallRecord:
  """What one traced call of a quantized model met: its layers (and quantized
  parameters, kind ``PARAM_KIND``), its other modules and their parameters."""
  layers: dict[str, LayerRecord] = dataclasses.field(default_factory=dict)
  modules: dict[str, str] = dataclasses.field(default_factory=dict)
  parameters: set[str] = dataclasses.field(default_factory=set)

  def check(self, policy: policy_lib.LayerPolicy) -> None:
    policy.check_model({p: r.kind for p, r in self.layers.items() if r.kind != PARAM_KIND},
                       self.modules, sorted(self.parameters))


# Observers of the next traced calls (``record_calls``); a stack so that nested uses work.
_OBSERVERS: list[CallRecord] = []


@contextlib.contextmanager
def record_calls():
  """Within the block, every quantized model call records its layers into the yielded
  ``CallRecord`` (``jax.eval_shape`` a call inside it to learn a model's layers)."""
  record = CallRecord()
  _OBSERVERS.append(record)
  try:
    yield record
  finally:
    _OBSERVERS.remove(record)


def _path_name(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def quantize_model(model, policy: policy_lib.LayerPolicy, *, rngs: nnx.Rngs | None = None,
                   from_float: bool = False, methods: Sequence[str] = ("__call__",)):
  """A shift-quantized copy of a float Flax model (linen or NNX); see the module docstring.

  Args:
    model: an ``nn.Module`` (unbound) or an ``nnx.Module``; it is not modified.
    policy: which weight and input spec each layer gets, by glob patterns over module
      paths (``'blocks/*/mlp/*'``, ``'head'``); see ``shiftjax.policy``.
    rngs: NNX only: the keys that initialize latents and activation ranges (default
      ``nnx.Rngs(0)``). Linen models initialize them in ``init`` as usual.
    from_float: NNX only: latents encode the nearest powers of two of the model's float
      kernels (``shiftjax.transfer``) instead of a fresh initialization.
    methods: linen only: the methods that run quantized (``'__call__'`` by default).
  Returns:
    the quantized model, of the same framework.
  Raises:
    PolicyError: NNX at once, linen when initialized (when its layers are first seen):
      a rule matches no layer (the message lists the layers), names a layer kind no
      shift spec serves (an embedding, a norm) or a parameter, two rules give a layer
      two specs, or the model has no quantizable layer.
  """
  if not isinstance(policy, policy_lib.LayerPolicy):
    raise TypeError(f"policy must be a shiftjax LayerPolicy, got {policy!r}")
  if isinstance(model, nn.Module):
    if rngs is not None or from_float:
      raise ValueError("rngs and from_float are for NNX models; a linen model creates its "
                       "latents in init (shiftjax.transfer.init_from_float maps float params)")
    return _quantize_linen(model, policy, tuple(methods))
  if isinstance(model, nnx.Module):
    if tuple(methods) != ("__call__",):
      raise ValueError(f"methods is for linen models; an NNX model's layers are quantized "
                       f"whichever method calls them, got {methods!r}")
    return _quantize_nnx(model, policy, rngs or nnx.Rngs(0), from_float)
  raise TypeError(f"quantize_model takes a flax.linen or flax.nnx Module, got "
                  f"{type(model).__name__}")


# ---------------------------------------------------------------------------- linen


def _quantize_linen(model: nn.Module, policy, methods) -> nn.Module:
  if model.scope is not None:
    raise ValueError("quantize_model takes an unbound linen module (the model, not a "
                     "module inside init/apply)")
  base = getattr(type(model), "_shiftjax_float_class", type(model))
  quantized = model.clone()
  quantized.__class__ = _quantized_linen_class(base, policy, methods)
  return quantized


@functools.cache
def _quantized_linen_class(base: type, policy, methods: tuple[str, ...]) -> type:
  """A subclass of ``base`` whose ``methods`` run under the shift interceptor."""
  fields = {"_shiftjax_float_class": base, "shift_policy": policy}
  for name in methods:
    method = getattr(base, name, None)
    if method is None:
      raise ValueError(f"{base.__name__} has no method {name!r} to quantize")
    fields[name] = around_linen_method(method, functools.partial(_run_quantized, policy))
  return subclass(base, **fields)


def _run_quantized(policy, module: nn.Module, call: Callable):
  """``call()`` under the shift interceptor; checks the policy against the layers when
  initializing and tells the observers (``record_calls``) the layers it met."""
  record = CallRecord()
  with nn.intercept_methods(functools.partial(_intercept_linen, policy, record)), \
      param_override(module, _parameter_reader(module, "", policy, record)):
    out = call()  # the model's own method: not intercepted, its parameters read here
  if module.is_initializing():
    record.check(policy)
  for observer in _OBSERVERS:
    observer.layers.update(record.layers)
    observer.modules.update(record.modules)
    observer.parameters.update(record.parameters)
  return out


def _intercept_linen(policy, record: CallRecord, next_fun, args, kwargs, context):
  module = context.module
  if module.scope is None:
    return next_fun(*args, **kwargs)
  path = _path_name(module.scope.path)  # '' for the model itself
  if not isinstance(module, LINEN_LAYERS) and not _is_shift_layer(module):
    # Any method, setup included: each may create parameters the user's code multiplies.
    if path:
      record.modules[path] = type(module).__name__
    with param_override(module, _parameter_reader(module, path, policy, record)):
      return next_fun(*args, **kwargs)
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if _is_shift_layer(module):
    return _record_shift_layer(module, path, record, next_fun, args, kwargs)
  weight_spec, input_spec = policy.quantizer_for(path), policy.activation_for(path)
  layer = LayerRecord(type(module).__name__, weight_spec, input_spec)
  record.layers[path] = layer
  if input_spec is not None:
    args = (_quantize_input(module, input_spec, args[0]), *args[1:])
  with _reading_kernel(module, weight_spec, layer):
    out = next_fun(*args, **kwargs)
  layer.output_shape = tuple(jnp.shape(out))
  layer.out_features = _out_features(module, layer.kernel_shape)
  return out


def _out_features(layer, kernel_shape: tuple[int, ...]) -> int:
  """How many of a kernel's elements are output features (the rest are contracted)."""
  einsum_str = getattr(layer, "einsum_str", None)
  if isinstance(layer, (nn.Einsum, nnx.Einsum)) and einsum_str:
    operands, output = einsum_str.replace(" ", "").split("->")
    kernel_axes = operands.split(",")[1]
    return math.prod(d for axis, d in zip(kernel_axes, kernel_shape) if axis in output)
  features = getattr(layer, "features", None) or getattr(layer, "out_features", None)
  if isinstance(layer, (nn.DenseGeneral, nnx.LinearGeneral)):
    return math.prod(np.atleast_1d(features))
  return kernel_shape[-1]


def _is_shift_layer(module) -> bool:
  """``shiftjax.layers.ShiftConv``/``ShiftDense``: layers quantized by their own policy."""
  return type(module).__name__ in ("ShiftConv", "ShiftDense") and hasattr(
      module, "kernel_weight")


def _record_shift_layer(module, path, record, next_fun, args, kwargs):
  """Records an explicit shift layer (its own spec) without changing what it does."""
  x = args[0]
  kind = "Conv" if type(module).__name__ == "ShiftConv" else "Dense"
  shape = ((*module.kernel_size, x.shape[-1], module.features) if kind == "Conv"
           else (x.shape[-1], module.features))
  out = next_fun(*args, **kwargs)
  record.layers[path] = LayerRecord(kind, module.quantizer, module.activation, shape,
                                    tuple(jnp.shape(out)), module.use_bias, shape[-1])
  return out


def _quantize_input(module: nn.Module, spec, x):
  """``x`` through the activation spec, its learned ranges the ``'activation'`` param."""
  params = (module.param("activation", lambda key: spec.init(module.param_dtype))
            if spec.param_shapes() else {})
  return spec.quantize(params, x)


@contextlib.contextmanager
def _reading_kernel(module: nn.Module, spec, layer: LayerRecord):
  """While the layer runs, its ``self.param('kernel', ...)`` creates ``spec``'s latents
  and returns ``spec.weight(latents)`` (float with ``spec`` None); records the shapes."""
  float_param = nn.Module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    if name == "bias":
      layer.has_bias = True
    if name != "kernel":
      return float_param(module, name, init_fn, *init_args, **init_kwargs)
    layer.kernel_shape = tuple(init_args[0])
    if spec is None:
      return float_param(module, name, init_fn, *init_args, **init_kwargs)
    latents = float_param(module, "kernel", _latent_init(spec), *init_args)
    return spec.weight(latents)

  with param_override(module, param):
    yield


@contextlib.contextmanager
def param_override(module: nn.Module, param: Callable):
  """While the layer runs, its ``self.param`` is ``param``: an instance attribute shadows
  the method for this call only, so the layer's own code (shapes, dtype promotion, the
  dot or conv) runs as written on whatever kernel ``param`` gives."""
  shadowed = module.__dict__.get("param")  # an outer method's override, on a nested call
  object.__setattr__(module, "param", param)
  try:
    yield
  finally:
    if shadowed is None:
      object.__delattr__(module, "param")
    else:
      object.__setattr__(module, "param", shadowed)


def _parameter_reader(module: nn.Module, path: str, policy, record: CallRecord) -> Callable:
  """``self.param`` of a module that is not a layer: a parameter a
  ``parameter_quantizers`` rule names is created as its spec's latents (of the shape
  and dtype its initializer gives) and read as the quantized weight; every parameter's
  path is recorded (for the rules' checks)."""
  float_param = nn.Module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    full = f"{path}/{name}" if path else name
    record.parameters.add(full)
    spec = policy.parameter_quantizer_for(full)
    if spec is None:
      return float_param(module, name, init_fn, *init_args, **init_kwargs)

    def latent_init(key):
      shape = jax.eval_shape(lambda k: init_fn(k, *init_args, **init_kwargs), key)
      return {LATENTS: spec.init(key, shape.shape, shape.dtype)}

    weight = spec.weight(float_param(module, name, latent_init)[LATENTS])
    record.layers[full] = LayerRecord(PARAM_KIND, spec, None, tuple(weight.shape))
    return weight

  return param


def _latent_init(spec):
  return lambda key, shape, dtype=jnp.float32: spec.init(key, shape, dtype)


# ------------------------------------------------------------------------------ NNX


class ReadsAsWeight:
  """An NNX variable holding another form of a weight (latents, codes) that reads as the
  weight (``weight()``) however code reads an array variable: ``v[...]``, ``v.value``,
  ``jnp.asarray(v)`` and jnp functions (``__jax_array__``), ``x @ v``, ``v @ x``.
  ``get_value()`` still gives what it holds (what training and packing work on)."""

  def weight(self) -> jax.Array:
    raise NotImplementedError

  def __getitem__(self, key):
    weight = self.weight()
    return weight if key is Ellipsis else weight[key]

  def __jax_array__(self):
    return self.weight()

  @property
  def value(self):
    return self.weight()

  def __matmul__(self, other):
    return self.weight() @ other

  def __rmatmul__(self, other):
    return other @ self.weight()

  @property
  def shape(self) -> tuple[int, ...]:
    return self.weight_shape

  @property
  def ndim(self) -> int:
    return len(self.weight_shape)


class ShiftKernel(ReadsAsWeight, nnx.Param):
  """An NNX layer's kernel (or a parameter the model's code multiplies) as shift
  latents: holds ``weight_spec``'s latents (a dict), reads as the quantized weight."""

  def latents(self) -> dict[str, jax.Array]:
    return self.get_value()

  def weight(self) -> jax.Array:
    return self.weight_spec.weight(self.latents())

  @property
  def dtype(self):
    return jax.tree.leaves(self.latents())[0].dtype


class ShiftParameter(ShiftKernel):
  """A parameter outside flax's layers (which the model's own code multiplies) as shift
  latents, held as ``{LATENTS: latents}`` (the module docstring of ``LATENTS``)."""

  def latents(self) -> dict[str, jax.Array]:
    return self.get_value()[LATENTS]


class ActivationRange(nnx.Param):
  """The learned parameters of a layer's input spec (PACT's clipping range), a dict."""


def _quantize_nnx(model: nnx.Module, policy, rngs: nnx.Rngs, from_float: bool):
  model = nnx.clone(model)
  layers, modules = {}, {}
  for path, module in nnx.iter_modules(model):
    name = _path_name(path)  # '' for the model itself
    if isinstance(module, NNX_LAYERS):
      layers[name] = module
      continue
    if path:
      modules[name] = type(module).__name__
  parameters = nnx_parameters(model)
  policy.check_model({p: _nnx_kind(m) for p, m in layers.items()}, modules, sorted(parameters))
  for name, (module, attribute) in parameters.items():
    spec = policy.parameter_quantizer_for(name)
    if spec is not None:
      setattr(module, attribute, _shift_kernel(getattr(module, attribute), spec, rngs,
                                               from_float, name, parameter=True))
  for name, layer in layers.items():
    weight_spec, input_spec = policy.quantizer_for(name), policy.activation_for(name)
    if weight_spec is not None:
      layer.kernel = _shift_kernel(layer.kernel, weight_spec, rngs, from_float, name)
    if input_spec is not None:
      _quantize_nnx_input(layer, input_spec)
  return model


def nnx_parameters(model: nnx.Module, kind: type = nnx.Param
                   ) -> dict[str, tuple[nnx.Module, str]]:
  """``{'<module path>/<attribute>': (module, attribute)}`` of the ``kind`` variables
  held as attributes by the modules of ``model`` that are not layers: the parameters its
  own code multiplies (and its other parameters, such as a norm's scale)."""
  found = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, NNX_LAYERS):
      continue
    prefix = _path_name(path)
    for attribute, value in vars(module).items():
      if isinstance(value, kind):
        found[f"{prefix}/{attribute}" if prefix else attribute] = (module, attribute)
  return found


def _nnx_kind(layer: nnx.Module) -> str:
  """The linen name of an NNX layer's kind (rules and summaries speak one language)."""
  return {"Linear": "Dense", "LinearGeneral": "DenseGeneral"}.get(
      type(layer).__name__, type(layer).__name__)


def _shift_kernel(kernel: nnx.Param, spec, rngs: nnx.Rngs, from_float: bool, name: str,
                  parameter: bool = False) -> ShiftKernel:
  if isinstance(kernel, ShiftKernel):
    raise policy_lib.PolicyError(f"layer {name!r} is quantized already ({kernel.weight_spec!r})")
  value = kernel.get_value()
  if from_float:
    from shiftjax import transfer  # pylint: disable=g-import-not-at-top
    latents = jax.tree.map(jnp.asarray, transfer.shift_latents_from_float(
        np.asarray(value), spec, dtype=value.dtype))
  else:
    latents = spec.init(rngs.params(), value.shape, value.dtype)
  if parameter:
    return ShiftParameter({LATENTS: latents}, weight_spec=spec,
                          weight_shape=tuple(value.shape))
  return ShiftKernel(latents, weight_spec=spec, weight_shape=tuple(value.shape))


def _quantize_nnx_input(layer: nnx.Module, spec) -> None:
  dtype = getattr(layer, "param_dtype", jnp.float32)
  if spec.param_shapes():
    layer.activation = ActivationRange(spec.init(dtype))
  layer.input_spec = spec
  layer.__class__ = _with_quantized_input(type(layer))


@functools.cache
def _with_quantized_input(layer_class: type) -> type:
  """``layer_class`` whose ``__call__`` first passes its input through ``input_spec``."""

  def __call__(self, inputs, *args, **kwargs):
    params = self.activation.get_value() if hasattr(self, "activation") else {}
    return layer_class.__call__(self, self.input_spec.quantize(params, inputs), *args,
                                **kwargs)

  return subclass(layer_class, __call__=__call__)


def record_nnx_call(model: nnx.Module, *inputs, **kwargs) -> CallRecord:
  """The layers (quantized or not) and other modules of an NNX model as one call
  ``model(*inputs, **kwargs)`` meets them, traced with ``jax.eval_shape`` on a clone."""
  model = nnx.clone(model)
  record = CallRecord()
  for path, module in nnx.iter_modules(model):
    name = _path_name(path)
    if isinstance(module, NNX_LAYERS):
      kernel = module.kernel
      spec = kernel.weight_spec if isinstance(kernel, ShiftKernel) else None
      record.layers[name] = LayerRecord(
          _nnx_kind(module), spec, getattr(module, "input_spec", None), tuple(kernel.shape),
          has_bias=getattr(module, "bias", None) is not None,
          out_features=_out_features(module, tuple(kernel.shape)))
      module.__class__ = _recording_output(type(module))
      module.output_record = record.layers[name]
      continue
    if path:
      record.modules[name] = type(module).__name__
  for param_path, (owner, attribute) in nnx_parameters(model).items():
    record.parameters.add(param_path)
    value = getattr(owner, attribute)
    if isinstance(value, ShiftKernel):
      record.layers[param_path] = LayerRecord(PARAM_KIND, value.weight_spec, None,
                                              tuple(value.weight_shape))
  jax.eval_shape(lambda: model(*inputs, **kwargs))
  return record


@functools.cache
def _recording_output(layer_class: type) -> type:
  def __call__(self, *args, **kwargs):
    out = layer_class.__call__(self, *args, **kwargs)
    self.output_record.output_shape = tuple(jnp.shape(out))
    return out
  return subclass(layer_class, __call__=__call__)


def policy_of(model) -> policy_lib.LayerPolicy | None:
  """The policy ``quantize_model`` quantized a linen model with (None: not quantized;
  an NNX model carries its specs in its ``ShiftKernel`` params instead)."""
  return getattr(type(model), "shift_policy", None) if isinstance(model, nn.Module) else None


def is_quantized(model) -> bool:
  """Whether ``model`` came from ``quantize_model`` (linen) or holds a ShiftKernel (NNX)."""
  if isinstance(model, nn.Module):
    return hasattr(type(model), "_shiftjax_float_class")
  return any(isinstance(v, ShiftKernel) for _, m in nnx.iter_modules(model)
             for v in vars(m).values())
