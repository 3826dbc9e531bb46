"""Packed inference of any quantized model through the model's own code (linen or NNX).

``pack_model`` turns a trained shift model (``shiftjax.quantize_model``'s) into the
same model whose quantized layers hold their integer codes instead of latents: uint32
words, ``floor(32 / bits)`` codes each along the kernel's contraction rows (the layout
``shiftjax.kernels`` reads; ``[ceil(R / P), C]`` for a kernel of ``R = prod(shape[:-1])``
rows and ``C = shape[-1]`` columns; where a layer runs on the native CPU kernel, the same
words in its tiled layout, ``shiftjax.kernels.TiledWords``, converted once by
``pack_model`` and ``load_model``). Everything else (norms, embeddings, float layers)
is the trained model's own.

Running it: a ``Dense``/``Linear`` layer whose format the kernels take (zero-free,
DenseShift, 2-5 bits) calls ``shiftjax.kernels.pow2_matmul`` (the native CPU kernel,
Pallas on GPU/TPU, XLA otherwise) on the words; any other quantized layer (convs,
``DenseGeneral``, ``Einsum``, formats with a zero) decodes its words to float weights by
bit assembly (``codes.decode``, no table) and runs flax's own forward. No latents, no
optimizer, no training stack.

* NNX: ``pack_model(model)`` returns a clone whose quantized layers hold a
  ``PackedKernel`` (an ``nnx.Variable``, not a ``Param``: nothing to train).
* linen: ``pack_model(model, variables, *inputs)`` returns ``(packed_model,
  packed_variables)``: the codes sit in the ``'shift_codes'`` collection at each layer's
  path, the quantized kernels are gone from ``'params'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from typing import Any, Mapping

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import codes as codes_lib
from shiftjax import interception
from shiftjax import kernels
from shiftjax import quantizers as qz
from shiftjax import trees
from shiftjax.deploy import format as format_lib
from shiftjax.deploy import norm_folding
from shiftjax.deploy.packed_tree import CODES, VARIABLES, LayerEntry, PackedTree

CODES_COLLECTION = "shift_codes"


def kernel_words(codes, bits: int) -> jax.Array:
  """A kernel's codes (its own shape) as ``[ceil(R / P), C]`` uint32 words."""
  codes = jnp.asarray(codes)
  return codes_lib.pack(codes.reshape(-1, codes.shape[-1]), bits, axis=0)


def decode_words(words, spec: qz.Quantizer, shape, dtype=jnp.float32) -> jax.Array:
  """``kernel_words``' inverse, decoded: the float kernel of ``shape`` (words or
  ``TiledWords``)."""
  codes = codes_lib.unpack(_plain_words(words), spec.bits, math.prod(shape[:-1]), axis=0)
  return codes_lib.decode(codes, spec.code_format, dtype).reshape(shape)


def runs_on_kernels(kind: str, spec: qz.Quantizer) -> bool:
  """Whether a packed layer multiplies on ``shiftjax.kernels.pow2_matmul``."""
  if spec is None:
    return False
  fmt = spec.code_format
  return kind == "Dense" and not fmt.has_zero and fmt.bits in kernels.SUPPORTED_BITS


def layer_words(words, kind: str, spec: qz.Quantizer):
  """A packed layer's words as it holds them: tiled (``kernels.tile_words``, once, here)
  where the layer multiplies on ``pow2_matmul`` and the native CPU kernel is available,
  which then streams each tile of columns; else the words as they are (the other
  backends' layout; a tiled layer run elsewhere, e.g. under ``native.disabled()``, is
  converted back in each call)."""
  from shiftjax.kernels.cpu import native  # pylint: disable=g-import-not-at-top
  if runs_on_kernels(kind, spec) and native.available():
    return kernels.tile_words(words)
  return words


def _plain_words(words) -> jax.Array:
  """The words layout of ``words`` or of ``TiledWords``."""
  from shiftjax.kernels.cpu import layout  # pylint: disable=g-import-not-at-top
  return layout.untile(words) if isinstance(words, layout.TiledWords) else words


def packed_dense(x, words, spec: qz.Quantizer, bias=None, dtype=None):
  """``x @ W + bias`` on the packed words (``x [..., K]``); the result in ``dtype``
  (default x's after promotion with float32, as flax's Dense)."""
  fmt = spec.code_format
  x_dtype = x.dtype if x.dtype in (jnp.float32, jnp.bfloat16) else jnp.float32
  y = kernels.pow2_matmul(x.astype(x_dtype), words, bits=fmt.bits, e0=fmt.e0,
                          bias=None if bias is None else bias.astype(jnp.float32))
  return y.astype(dtype or jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------------------------ NNX


class PackedKernel(interception.ReadsAsWeight, nnx.Variable):
  """A quantized kernel's (or parameter's) words (``kernel_words``); reads as its decoded
  weights."""

  def weight(self) -> jax.Array:
    return decode_words(self.get_value(), self.weight_spec, self.weight_shape)


def split_path(path: str) -> tuple[str, str]:
  """``(module path, name)`` of a parameter's path (``'attn/qkv'`` -> ``('attn', 'qkv')``)."""
  module, _, name = path.rpartition("/")
  return module, name


def _pack_nnx(model: nnx.Module, example_inputs, fold_batch_norm: bool) -> nnx.Module:
  quantized = model
  model = nnx.clone(model)
  packed = []
  for path, (module, attribute) in interception.nnx_parameters(model, interception.ShiftKernel).items():
    latent = getattr(module, attribute)
    spec = latent.weight_spec
    setattr(module, attribute, PackedKernel(
        kernel_words(spec.codes(latent.latents()), spec.bits), weight_spec=spec,
        weight_shape=latent.weight_shape))
    packed.append(path)
  layers = []
  for path, layer in nnx.iter_modules(model):
    if not isinstance(layer, interception.NNX_LAYERS):
      continue
    kernel = layer.kernel
    if not isinstance(kernel, interception.ShiftKernel):
      continue
    spec = kernel.weight_spec
    words = kernel_words(spec.codes(kernel.latents()), spec.bits)
    dense = isinstance(layer, nnx.Linear)
    layer.kernel = PackedKernel(layer_words(words, "Dense" if dense else "", spec),
                                weight_spec=spec, weight_shape=kernel.weight_shape)
    if dense and runs_on_kernels("Dense", spec):
      layer.__class__ = _packed_linear(type(layer))
    layers.append("/".join(map(str, path)))
  if not packed and not layers:
    raise ValueError("the model has no quantized layer to pack (quantize it with "
                     "shiftjax.quantize_model and train it first)")
  if fold_batch_norm and example_inputs is not None and layers:
    folds, reasons = norm_folding.find_foldable_nnx(quantized, layers, example_inputs)
    for reason in reasons:
      warnings.warn(reason, stacklevel=3)
    norm_folding.fold_nnx(model, folds)
  return model


@functools.cache
def _packed_linear(layer_class: type) -> type:
  """``layer_class`` (an ``nnx.Linear``, maybe with a quantized input) multiplying on
  the packed words with ``shiftjax.kernels``."""

  def __call__(self, inputs):
    if hasattr(self, "input_spec"):
      params = self.activation.get_value() if hasattr(self, "activation") else {}
      inputs = self.input_spec.quantize(params, inputs)
    bias = self.bias.get_value() if self.bias is not None else None
    return packed_dense(inputs, self.kernel.get_value(), self.kernel.weight_spec, bias,
                        self.dtype)

  return interception.subclass(layer_class, __call__=__call__)


# ---------------------------------------------------------------------------- linen


def _pack_linen(model: nn.Module, variables: Mapping[str, Any], inputs, kwargs,
                fold_batch_norm: bool):
  if not interception.is_quantized(model):
    raise ValueError("pack_model takes the quantized model (shiftjax.quantize_model's) "
                     "whose variables these are")
  with interception.record_calls() as record:
    jax.eval_shape(functools.partial(model.apply, **kwargs), variables, *inputs)
  params = dict(variables["params"])  # copied along each edited path (trees.writable)
  codes: dict[str, Any] = {}
  table = []
  for path, layer in record.layers.items():
    if layer.weight_spec is None:
      if layer.input_spec is not None:  # a float layer that quantizes its input
        table.append((path, LayerEntry(layer.kind, None, layer.kernel_shape,
                                       layer.input_spec)))
      continue
    module, name = split_path(_codes_path(path, layer))
    owner, codes_owner = trees.writable(params, module), trees.writable(codes, module)
    spec = layer.weight_spec
    latents = owner.pop(name)
    if layer.kind == interception.PARAM_KIND:
      latents = latents[interception.LATENTS]
    codes_owner[name] = layer_words(kernel_words(spec.codes(latents), spec.bits),
                                    layer.kind, spec)
    table.append((path, LayerEntry(layer.kind, spec, layer.kernel_shape, layer.input_spec)))
  if not any(e.weight_spec is not None for _, e in table):
    raise ValueError("the model has no quantized layer to pack")
  packed_variables = {**variables, "params": params, CODES_COLLECTION: codes}
  foldable = [p for p, e in table
              if e.weight_spec is not None and e.kind != interception.PARAM_KIND]
  if fold_batch_norm and foldable:
    folds, reasons = norm_folding.find_foldable(model, variables, foldable, inputs, kwargs)
    for reason in reasons:
      warnings.warn(reason, stacklevel=3)
    packed_variables = norm_folding.fold(packed_variables, folds)
    norms = {f.layer: f.norm for f in folds}
    table = [(p, dataclasses.replace(e, folded_norm=norms.get(p))) for p, e in table]
  base = type(model)._shiftjax_float_class  # pylint: disable=protected-access
  return packed_linen_model(model, base, tuple(table)), packed_variables


def packed_linen_model(model: nn.Module, base: type, table) -> nn.Module:
  """``model`` (unbound) as its packed class: ``table`` is ``((path, LayerEntry), ...)``."""
  packed = model.clone()
  packed.__class__ = _packed_linen_class(base, table)
  return packed


@functools.cache
def _packed_linen_class(base: type, table) -> type:
  layers = {p: e for p, e in table if e.kind != interception.PARAM_KIND}
  folded_norms = frozenset(e.folded_norm for e in layers.values() if e.folded_norm)
  parameters: dict[str, dict[str, LayerEntry]] = {}
  for path, entry in table:
    if entry.kind == interception.PARAM_KIND:
      module, name = split_path(path)
      parameters.setdefault(module, {})[name] = entry

  def around(module, call):
    with nn.intercept_methods(functools.partial(_intercept_packed, layers, folded_norms,
                                                parameters)), \
        _decoded_parameters(module, parameters.get("", {})):
      return call()  # the model's own method: not intercepted, its parameters read here

  return interception.subclass(
      base, __call__=interception.around_linen_method(base.__call__, around),
      packed_layers=table, _shiftjax_float_class=base)


def _intercept_packed(layers, folded_norms, parameters, next_fun, args, kwargs, context):
  module = context.module
  if module.scope is None:
    return next_fun(*args, **kwargs)
  path = "/".join(module.scope.path)
  if path in parameters and not isinstance(module, interception.LINEN_LAYERS):
    with _decoded_parameters(module, parameters[path]):  # any method, setup included
      return next_fun(*args, **kwargs)
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if path in folded_norms:
    return args[0]  # its layer applied it
  entry = layers.get(path)
  if entry is None or not isinstance(module, interception.LINEN_LAYERS):
    return next_fun(*args, **kwargs)
  epilogue = None
  if entry.folded_norm is not None:
    epilogue = (module.get_variable(norm_folding.FOLDED_COLLECTION, "scale"),
                module.get_variable(norm_folding.FOLDED_COLLECTION, "bias"))
  return _run_packed(module, entry, next_fun, args, kwargs, epilogue)


def _run_packed(module: nn.Module, entry: LayerEntry, next_fun, args, kwargs, epilogue):
  """A packed layer's output, then its folded BatchNorm's ``epilogue`` (scale, bias):
  on the kernels, as one fused conv, or flax's forward on decoded weights."""
  spec, input_spec = entry.weight_spec, entry.input_spec
  x = args[0]
  if input_spec is not None:
    params = module.get_variable("params", "activation") if input_spec.param_shapes() else {}
    x = input_spec.quantize(params, x)
  if spec is None:  # a float layer
    out = next_fun(x, *args[1:], **kwargs)
  elif isinstance(module, nn.Dense) and runs_on_kernels("Dense", spec):
    bias = module.get_variable("params", "bias") if module.use_bias else None
    out = packed_dense(x, module.get_variable(CODES_COLLECTION, "kernel"), spec, bias,
                       module.dtype)
  else:
    words = module.get_variable(CODES_COLLECTION, "kernel")
    padding = norm_folding.fused_conv_padding(module, x)
    if epilogue is not None and padding is not None and not args[1:] and not kwargs:
      weights = decode_words(words, spec, entry.kernel_shape)
      bias = module.get_variable("params", "bias") if module.use_bias else None
      return norm_folding.fused_conv(module, x, weights, bias, padding, *epilogue)
    with _decoded_kernel(module, words, spec):
      out = next_fun(x, *args[1:], **kwargs)
  if epilogue is None:
    return out
  scale, bias = epilogue
  return out * scale + bias


@contextlib.contextmanager
def _decoded_kernel(module: nn.Module, words, spec):
  """While the layer runs, ``self.param('kernel', ...)`` gives the decoded weights."""
  float_param = nn.Module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    if name == "kernel":
      return decode_words(words, spec, tuple(init_args[0]))
    return float_param(module, name, init_fn, *init_args, **init_kwargs)

  with interception.param_override(module, param):
    yield


@contextlib.contextmanager
def _decoded_parameters(module: nn.Module, entries: Mapping[str, LayerEntry]):
  """While a module that is not a layer runs, ``self.param(name, ...)`` of each of its
  packed parameters gives the decoded weights."""
  float_param = nn.Module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    entry = entries.get(name)
    if entry is None:
      return float_param(module, name, init_fn, *init_args, **init_kwargs)
    return decode_words(module.get_variable(CODES_COLLECTION, name), entry.weight_spec,
                        entry.kernel_shape)

  with interception.param_override(module, param):
    yield


# ----------------------------------------------------------------------------- public


def pack_model(model, variables: Mapping[str, Any] | None = None, *inputs,
               fold_batch_norm: bool = True, example_inputs: tuple | None = None,
               **kwargs):
  """A trained shift model with codes in place of latents (module docstring).

  Args:
    model: an NNX model from ``quantize_model`` (trained), or a linen model from
      ``quantize_model`` with its trained ``variables`` and example ``inputs`` (and
      keyword arguments) of one call, which find its layers.
    fold_batch_norm: each BatchNorm that directly follows a quantized layer, in
      inference mode, becomes that layer's epilogue (``deploy.norm_folding``); one that
      cannot fold stays and a warning says which and why. Found on a traced call: of
      ``inputs`` (linen), of ``example_inputs`` (NNX; without them norms stay).
    example_inputs: NNX: the positional inputs of one call, for folding.
  Returns:
    NNX: the packed model. linen: ``(packed_model, packed_variables)``.
  """
  if isinstance(model, nnx.Module):
    if variables is not None or inputs:
      raise ValueError("an NNX model holds its own variables: pack_model(model) (with "
                       "example_inputs=(x,) to fold BatchNorms)")
    return _pack_nnx(model, example_inputs, fold_batch_norm)
  if isinstance(model, nn.Module):
    if variables is None or not inputs:
      raise ValueError("a linen model needs its variables and example inputs: "
                       "pack_model(model, variables, x)")
    return _pack_linen(model, variables, inputs, kwargs, fold_batch_norm)
  raise TypeError(f"pack_model takes a flax.linen or flax.nnx Module, got "
                  f"{type(model).__name__}")


# --------------------------------------------------------------------- jax.export


def export_artifact(packed, *inputs, variables: Mapping[str, Any] | None = None,
                    platforms=None, native_kernels: bool = False, **call_kwargs) -> bytes:
  """A packed model as a serialized ``jax.export.Exported``: the codes are constants of
  the exported function, which anyone with jax runs without the model's code::

    exported = jax.export.deserialize(bytearray(open(path, 'rb').read()))
    outputs = exported.call(x)

  Args:
    packed: ``pack_model``'s result (NNX model; or linen model with ``variables``).
    inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``; shapes may be symbolic).
    platforms: ``jax.export`` lowering platforms (default this machine's).
    native_kernels: carry the native CPU matmul as an FFI call. The artifact then runs
      only where its target (``shiftjax_pow2_matmul``) is registered, i.e. in a process
      that has called ``shiftjax.kernels.cpu.native.available()`` on a CPU with the same
      library; by default the weights are decoded with XLA ops, which every platform
      runs (jax refuses to serialize the GPU Pallas kernel's Triton call).
    call_kwargs: keyword arguments of the model's call (e.g. ``train=False``).
  """
  from shiftjax.kernels.cpu import native  # pylint: disable=g-import-not-at-top
  if isinstance(packed, nnx.Module):
    graphdef, state = nnx.split(packed)

    def call(*x):
      return nnx.merge(graphdef, state)(*x, **call_kwargs)
  else:
    if variables is None:
      raise ValueError("a linen packed model needs its variables")

    def call(*x):
      return packed.apply(variables, *x, **call_kwargs)
  specs = [x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
      jnp.shape(x), jnp.asarray(x).dtype) for x in inputs]
  if native_kernels:
    if not native.available():
      raise ValueError("native_kernels=True needs the native CPU kernels (g++, CPU backend)")
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in native.ffi_targets()]
    exported = jax.export.export(jax.jit(call), platforms=platforms,
                                 disabled_checks=checks)(*specs)
  else:
    with native.disabled():
      exported = jax.export.export(jax.jit(call), platforms=platforms)(*specs)
  return bytes(exported.serialize())


def save_artifact(path: str | os.PathLike, packed, *inputs, overwrite: bool = False,
                  **kwargs) -> str:
  """Writes ``export_artifact(packed, *inputs, **kwargs)`` atomically to ``path``."""
  path = os.fspath(path)
  if not overwrite and os.path.lexists(path):
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  format_lib.write_atomic(path, export_artifact(packed, *inputs, **kwargs),
                          overwrite=overwrite)
  return path


# ------------------------------------------------------------------------- files (v4)


def bitplanes(words, entry: LayerEntry) -> np.ndarray:
  """A layer's codes from its words (``kernel_words``' layout, or ``TiledWords``) as the
  file's bit planes."""
  codes = codes_lib.unpack(_plain_words(words), entry.weight_spec.bits,
                           math.prod(entry.kernel_shape[:-1]), axis=0)
  codes = codes.reshape(entry.kernel_shape)
  return np.asarray(codes_lib.pack_bitplanes(codes, entry.weight_spec.bits))


def _words(tree: PackedTree, path: str) -> jax.Array:
  """A layer's bit planes in the kernels' word layout (``layer_words``: tiled where it
  runs on the native CPU kernel): converted once, at load."""
  entry = tree.layers[path]
  words = kernel_words(tree.kernel_codes(path), entry.weight_spec.bits)
  return layer_words(words, entry.kind, entry.weight_spec)


def _codes_path(path: str, entry) -> str:
  """Where a linen layer's (or parameter's) latents lie in its params, and its words in
  the codes collection (``entry``: a ``LayerEntry`` or ``LayerRecord``)."""
  return path if entry.kind == interception.PARAM_KIND else f"{path}/kernel"


def class_name(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def _storable(path: str, value) -> np.ndarray:
  a = np.asarray(value)
  if a.dtype.name not in format_lib.ARRAY_DTYPES:
    raise ValueError(f"variable {path!r} has dtype {a.dtype}; a packed file stores "
                     f"{', '.join(format_lib.ARRAY_DTYPES)}")
  return a


def _nnx_variables(model: nnx.Module) -> dict[str, Any]:
  """Every variable a packed NNX model needs but its codes and RNG streams, by path."""
  state = nnx.state(model, nnx.All(nnx.Variable, nnx.Not(nnx.RngState),
                                    nnx.Not(PackedKernel)))
  return trees.flatten(state)


def to_tree(packed, variables: Mapping[str, Any] | None = None, *,
            metadata: Mapping[str, Any] | None = None) -> PackedTree:
  """The ``PackedTree`` (format version 4) of a packed model (``pack_model``'s result:
  an NNX model, or a linen model and its variables)."""
  if isinstance(packed, nnx.Module):
    layers, arrays = {}, {}
    for path, layer in nnx.iter_modules(packed):
      if not isinstance(layer, interception.NNX_LAYERS):
        continue
      name, kernel = "/".join(map(str, path)), layer.kernel
      kind = interception._nnx_kind(layer)  # pylint: disable=protected-access
      input_spec = getattr(layer, "input_spec", None)
      if isinstance(kernel, PackedKernel):
        entry = LayerEntry(kind, kernel.weight_spec, tuple(kernel.weight_shape), input_spec,
                           getattr(layer, "folded_norm", None))
        arrays[CODES + name] = bitplanes(kernel.get_value(), entry)
      elif input_spec is not None:  # a float layer that quantizes its input
        entry = LayerEntry(kind, None, tuple(kernel.shape), input_spec)
      else:
        continue
      layers[name] = entry
    for name, (module, attribute) in interception.nnx_parameters(packed, PackedKernel).items():
      kernel = getattr(module, attribute)
      layers[name] = LayerEntry(interception.PARAM_KIND, kernel.weight_spec,
                                tuple(kernel.weight_shape))
      arrays[CODES + name] = bitplanes(kernel.get_value(), layers[name])
    arrays.update({VARIABLES + p: _storable(p, v)
                   for p, v in _nnx_variables(packed).items()})
    base = type(packed).__mro__[0]
    framework = "nnx"
  else:
    table = getattr(type(packed), "packed_layers", None)
    if table is None or variables is None:
      raise ValueError("to_tree takes pack_model's result: an NNX model, or a linen model "
                       "and its packed variables")
    layers = dict(table)
    codes = variables[CODES_COLLECTION]
    arrays = {CODES + p: bitplanes(trees.get(codes, _codes_path(p, e)), e)
              for p, e in layers.items() if e.weight_spec is not None}
    rest = {k: v for k, v in variables.items() if k != CODES_COLLECTION}
    arrays.update({VARIABLES + p: _storable(p, v) for p, v in trees.flatten(rest).items()})
    base = type(packed)._shiftjax_float_class  # pylint: disable=protected-access
    framework = "linen"
  return PackedTree(framework, class_name(interception.user_class(base)), layers, arrays,
                    dict(metadata or {}))


def save_model(path: str | os.PathLike, packed, variables=None, *,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes a packed model (``pack_model``'s result) as a format version 4 file."""
  return to_tree(packed, variables, metadata=metadata).save(path, overwrite=overwrite)


def load_model(source, model):
  """A packed model file (or ``PackedTree``) run by ``model``'s own code.

  Args:
    source: a path or a ``PackedTree``.
    model: the float model the file was packed from (its class, built with the same
      configuration; NNX: an instance, its values are replaced).
  Returns:
    NNX: the packed model. linen: ``(packed_model, variables)``.
  Raises:
    PackedModelError/ValueError: the file is damaged, of another framework or class, or
      a layer or variable does not fit the model (naming it and both shapes).
  """
  tree = source if isinstance(source, PackedTree) else format_lib.load(source)
  if not isinstance(tree, PackedTree):
    raise ValueError(f"{source} is a packed ResNet of format version <= 3: "
                     "shiftjax.export.load runs it (export.upgrade makes it version 4)")
  framework = "nnx" if isinstance(model, nnx.Module) else "linen"
  if tree.framework != framework:
    raise ValueError(f"the file holds a {tree.framework} model, got a {framework} one")
  wanted = class_name(interception.user_class(type(model)))
  if tree.model.rpartition(".")[2] != wanted.rpartition(".")[2]:
    raise ValueError(f"the file holds a {tree.model}, got a {wanted}")
  if framework == "linen":
    variables = _unflatten(tree.variables)
    variables[CODES_COLLECTION] = _unflatten({_codes_path(p, e): _words(tree, p)
                                              for p, e in tree.quantized_layers.items()})
    base = interception.user_class(type(model))
    plain = model.clone()
    plain.__class__ = base
    return packed_linen_model(plain, base, tuple(tree.layers.items())), variables
  return _load_nnx(tree, model)


def _load_nnx_parameter(modules, path: str, entry: LayerEntry, words) -> None:
  """The model's parameter at ``path`` replaced by the file's packed words."""
  module_path, name = split_path(path)
  module = modules.get(module_path)
  param = getattr(module, name, None) if module is not None else None
  if not isinstance(param, nnx.Param):
    raise ValueError(f"the file's parameter {path!r} is not an nnx.Param of the model")
  if tuple(param.shape) != entry.kernel_shape:
    raise ValueError(f"parameter {path!r} has shape {list(entry.kernel_shape)} in the "
                     f"file, {list(param.shape)} in the model")
  setattr(module, name, PackedKernel(words, weight_spec=entry.weight_spec,
                                     weight_shape=entry.kernel_shape))


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jax.tree.map(jnp.asarray, value)  # an array, or TiledWords
  return out


def _load_nnx(tree: PackedTree, model: nnx.Module) -> nnx.Module:
  model = nnx.clone(model)
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  for path, entry in tree.layers.items():
    if entry.kind == interception.PARAM_KIND:
      _load_nnx_parameter(modules, path, entry, _words(tree, path))
      continue
    layer = modules.get(path)
    if not isinstance(layer, interception.NNX_LAYERS):
      raise ValueError(f"the file's layer {path!r} ({entry.kind}) is "
                       f"{type(layer).__name__ if layer is not None else 'not'} in the model")
    shape = tuple(layer.kernel.shape)
    if shape != entry.kernel_shape:
      raise ValueError(f"layer {path!r} has kernel shape {list(entry.kernel_shape)} in the "
                       f"file, {list(shape)} in the model")
    if entry.weight_spec is None:  # a float layer that quantizes its input
      interception._quantize_nnx_input(layer, entry.input_spec)  # pylint: disable=protected-access
      continue
    layer.kernel = PackedKernel(_words(tree, path), weight_spec=entry.weight_spec,
                                weight_shape=entry.kernel_shape)
    if entry.input_spec is not None:
      interception._quantize_nnx_input(layer, entry.input_spec)  # pylint: disable=protected-access
    if isinstance(layer, nnx.Linear) and runs_on_kernels("Dense", entry.weight_spec):
      layer.__class__ = _packed_linear(type(layer))
  norm_folding.refold_nnx(model, tree.layers)
  stored = tree.variables
  state = nnx.state(model, nnx.All(nnx.Variable, nnx.Not(nnx.RngState),
                                    nnx.Not(PackedKernel)))
  flat = trees.flatten(state)
  missing = sorted(set(flat) - set(stored))
  extra = sorted(set(stored) - set(flat))
  if missing or extra:
    raise ValueError(f"the file's variables do not fit the model: missing {missing[:8]}, "
                     f"not in the model {extra[:8]}")

  def restore(path, leaf):
    name = "/".join(trees.path_names(path))
    value = stored[name]
    if tuple(value.shape) != tuple(np.shape(leaf)):
      raise ValueError(f"variable {name!r} has shape {tuple(value.shape)} in the file, "
                       f"{tuple(np.shape(leaf))} in the model")
    return jnp.asarray(value, dtype=jnp.asarray(leaf).dtype)
  nnx.update(model, jax.tree_util.tree_map_with_path(restore, state))
  return model
