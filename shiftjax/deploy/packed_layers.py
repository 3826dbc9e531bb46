"""Packed inference of any quantized model through the model's own code (linen or NNX).

``pack_model`` turns a trained shift model (``shiftjax.quantize_model``'s) into the
same model whose quantized layers hold their integer codes instead of latents: uint32
words, ``floor(32 / bits)`` codes each along the kernel's contraction rows (the layout
``shiftjax.kernels`` reads; ``[ceil(R / P), C]`` for a kernel of ``R = prod(shape[:-1])``
rows and ``C = shape[-1]`` columns). Everything else (norms, embeddings, float layers)
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
import functools
import math
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

CODES_COLLECTION = "shift_codes"


def kernel_words(codes, bits: int) -> jax.Array:
  """A kernel's codes (its own shape) as ``[ceil(R / P), C]`` uint32 words."""
  codes = jnp.asarray(codes)
  return codes_lib.pack(codes.reshape(-1, codes.shape[-1]), bits, axis=0)


def decode_words(words, spec: qz.Quantizer, shape, dtype=jnp.float32) -> jax.Array:
  """``kernel_words``' inverse, decoded: the float kernel of ``shape``."""
  codes = codes_lib.unpack(words, spec.bits, math.prod(shape[:-1]), axis=0)
  return codes_lib.decode(codes, spec.code_format, dtype).reshape(shape)


def runs_on_kernels(kind: str, spec: qz.Quantizer) -> bool:
  """Whether a packed layer multiplies on ``shiftjax.kernels.pow2_matmul``."""
  fmt = spec.code_format
  return kind == "Dense" and not fmt.has_zero and fmt.bits in kernels.SUPPORTED_BITS


def packed_dense(x, words, spec: qz.Quantizer, bias=None, dtype=None):
  """``x @ W + bias`` on the packed words (``x [..., K]``); the result in ``dtype``
  (default x's after promotion with float32, as flax's Dense)."""
  fmt = spec.code_format
  x_dtype = x.dtype if x.dtype in (jnp.float32, jnp.bfloat16) else jnp.float32
  y = kernels.pow2_matmul(x.astype(x_dtype), words, bits=fmt.bits, e0=fmt.e0,
                          bias=None if bias is None else bias.astype(jnp.float32))
  return y.astype(dtype or jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------------------------ NNX


class PackedKernel(nnx.Variable):
  """A quantized kernel's words (``kernel_words``); reads as its decoded weights."""

  def __getitem__(self, key):
    weight = decode_words(self.get_value(), self.weight_spec, self.weight_shape)
    return weight if key is Ellipsis else weight[key]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.weight_shape


def _pack_nnx(model: nnx.Module) -> nnx.Module:
  model = nnx.clone(model)
  packed = 0
  for _, layer in nnx.iter_modules(model):
    if not isinstance(layer, interception.NNX_LAYERS):
      continue
    kernel = layer.kernel
    if not isinstance(kernel, interception.ShiftKernel):
      continue
    spec = kernel.weight_spec
    words = kernel_words(spec.codes(kernel.get_value()), spec.bits)
    layer.kernel = PackedKernel(words, weight_spec=spec, weight_shape=kernel.weight_shape)
    if isinstance(layer, nnx.Linear) and runs_on_kernels("Dense", spec):
      layer.__class__ = _packed_linear(type(layer))
    packed += 1
  if not packed:
    raise ValueError("the model has no quantized layer to pack (quantize it with "
                     "shiftjax.quantize_model and train it first)")
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

  return type(layer_class.__name__, (layer_class,),
              {"__call__": __call__, "__module__": layer_class.__module__})


# ---------------------------------------------------------------------------- linen


def _pack_linen(model: nn.Module, variables: Mapping[str, Any], inputs, kwargs):
  if not interception.is_quantized(model):
    raise ValueError("pack_model takes the quantized model (shiftjax.quantize_model's) "
                     "whose variables these are")
  with interception.record_calls() as record:
    jax.eval_shape(functools.partial(model.apply, **kwargs), variables, *inputs)
  params = dict(variables["params"])  # copied along each edited path (_subtree)
  codes: dict[str, Any] = {}
  for path, layer in record.layers.items():
    if layer.weight_spec is None:
      continue
    owner, codes_owner = _subtree(params, path), _subtree(codes, path, create=True)
    spec = layer.weight_spec
    codes_owner["kernel"] = kernel_words(spec.codes(owner.pop("kernel")), spec.bits)
  if not codes:
    raise ValueError("the model has no quantized layer to pack")
  base = type(model)._shiftjax_float_class  # pylint: disable=protected-access
  packed = model.clone()
  packed.__class__ = _packed_linen_class(base, model.shift_policy)
  return packed, {**variables, "params": params, CODES_COLLECTION: codes}


def _subtree(tree: dict, path: str, create: bool = False) -> dict:
  node = tree
  for part in path.split("/") if path else ():
    if create:
      node = node.setdefault(part, {})
    else:
      node[part] = dict(node[part])
      node = node[part]
  return node


@functools.cache
def _packed_linen_class(base: type, policy) -> type:
  method = base.__call__
  inner = method.__wrapped__ if hasattr(method, "method_handler_wrapped") else method

  @functools.wraps(inner)
  def run(self, *args, **kwargs):
    with nn.intercept_methods(functools.partial(_intercept_packed, policy)):
      return inner(self, *args, **kwargs)

  if hasattr(inner, "compact"):
    run.compact = inner.compact
  return type(base.__name__, (base,), {"__call__": run, "shift_policy": policy,
                                       "_shiftjax_float_class": base})


def _intercept_packed(policy, next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__" or module.scope is None
      or not isinstance(module, interception.LINEN_LAYERS)
      or not module.has_variable(CODES_COLLECTION, "kernel")):
    return next_fun(*args, **kwargs)
  path = "/".join(module.scope.path)
  spec, input_spec = policy.quantizer_for(path), policy.activation_for(path)
  words = module.get_variable(CODES_COLLECTION, "kernel")
  x = args[0]
  if input_spec is not None:
    params = module.get_variable("params", "activation") if input_spec.param_shapes() else {}
    x = input_spec.quantize(params, x)
  if isinstance(module, nn.Dense) and runs_on_kernels("Dense", spec):
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return packed_dense(x, words, spec, bias, module.dtype)
  with _decoded_kernel(module, words, spec):
    return next_fun(x, *args[1:], **kwargs)


@contextlib.contextmanager
def _decoded_kernel(module: nn.Module, words, spec):
  """While the layer runs, ``self.param('kernel', ...)`` gives the decoded weights."""
  float_param = nn.Module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    if name == "kernel":
      return decode_words(words, spec, tuple(init_args[0]))
    return float_param(module, name, init_fn, *init_args, **init_kwargs)

  object.__setattr__(module, "param", param)
  try:
    yield
  finally:
    object.__delattr__(module, "param")


# ----------------------------------------------------------------------------- public


def pack_model(model, variables: Mapping[str, Any] | None = None, *inputs, **kwargs):
  """A trained shift model with codes in place of latents (module docstring).

  Args:
    model: an NNX model from ``quantize_model`` (trained), or a linen model from
      ``quantize_model`` with its trained ``variables`` and example ``inputs`` (and
      keyword arguments) of one call, which find its layers.
  Returns:
    NNX: the packed model. linen: ``(packed_model, packed_variables)``.
  """
  if isinstance(model, nnx.Module):
    if variables is not None or inputs:
      raise ValueError("an NNX model holds its own variables: pack_model(model)")
    return _pack_nnx(model)
  if isinstance(model, nn.Module):
    if variables is None or not inputs:
      raise ValueError("a linen model needs its variables and example inputs: "
                       "pack_model(model, variables, x)")
    return _pack_linen(model, variables, inputs, kwargs)
  raise TypeError(f"pack_model takes a flax.linen or flax.nnx Module, got "
                  f"{type(model).__name__}")
