"""Runs a ``PackedModel`` with its weights kept packed: ``packed_apply``, ``forward``.

The weights stay packed in memory and are decoded inside each call. On GPU/TPU a
quantized conv calls ``shiftjax.kernels.pow2_conv`` (Pallas) on the kernels' word layout
(bit-plane files are repacked into words in the jitted pass); on the CPU, words go to
``pow2_conv``'s XLA path and bit planes are decoded directly, both then
``kernels.fused_conv``: the native CPU conv with the layer's scale, bias, residual and
relu applied in its registers. The kernels serve zero-free formats of 2..5 bits
(DenseShift, DeepShift-Q up to 5 bits); formats with a zero code (S3, DeepShift-PS) and
wider codes are unpacked and decoded (``codes.decode``) in XLA and convolved with
``kernels.fused_conv`` on every backend. Each layer
runs at its own width (mixed widths), and a layer whose input is quantized first
quantizes it as training did (``shiftjax.activations``, the learned ranges from the file).

``export_serialized`` writes packed inference as a ``jax.export`` artifact (the packed
words embedded as constants) that plain jax can deserialize and call without shiftjax.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Mapping, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from shiftjax import codes as codes_lib
from shiftjax import kernels
from shiftjax.kernels.cpu import native
from shiftjax.kernels.inference.matmul import resolve_backend
from shiftjax import pooling
from shiftjax.deploy.architecture import SPEECH_POOLS, Layer, PackedModelError
from shiftjax.deploy import folding
from shiftjax.deploy.format import PackedModel, write_atomic


def _uses_kernel(fmt: codes_lib.CodeFormat) -> bool:
  return not fmt.has_zero and fmt.bits in kernels.SUPPORTED_BITS


def decode_kernel(words, fmt: codes_lib.CodeFormat, shape,
                  code_layout: str = "words") -> jax.Array:
  """A quantized kernel's uint32 words -> float32 weights of ``shape``, in XLA ops.

  ``code_layout`` ``'words'``: ``[ceil(K / P), O]`` with ``K * O = prod(shape)``;
  ``'bitplanes'``: ``[ceil(prod(shape) / 32), bits]``. The path of what the kernels do not
  take (zero codes, over 5 bits, bit planes on the CPU) on every backend.
  """
  if code_layout == "bitplanes":
    codes = codes_lib.unpack_bitplanes(words, fmt.bits, tuple(shape))
  else:
    codes = codes_lib.unpack(words, fmt.bits, math.prod(shape[:-1]))
  return codes_lib.decode(codes, fmt, jnp.float32).reshape(shape)


def _kernel_words(layer: Layer, kernel, fmt, code_layout):
  """The ``[ceil(K / P), O]`` words ``shiftjax.kernels`` reads, from either layout.

  Bit planes are repacked on the fly (in the jitted forward pass): the Pallas kernels read
  the word layout only.
  """
  if code_layout == "words":
    return kernel
  codes = codes_lib.unpack_bitplanes(kernel, fmt.bits, layer.shape)
  return codes_lib.pack(codes.reshape(-1, layer.shape[-1]), fmt.bits, axis=0)


def _runs_kernel(layer: Layer, code_layout, backend, platform) -> bool:
  """Whether a quantized layer runs on ``shiftjax.kernels`` rather than decode + XLA.

  The kernels take zero-free formats of 2..5 bits. On the XLA backend (CPU) bit planes
  are decoded directly: repacking them into words first would only add work.
  """
  if not (layer.quantized and _uses_kernel(layer.code_format)):
    return False
  return code_layout == "words" or resolve_backend(backend, platform)[0] != "xla"


def _conv_layer(layer: Layer, arrays, x, residual, code_layout, backend, platform):
  """The layer's whole step: conv, scale (quantized layers), bias, residual, relu."""
  kernel = arrays[f"{layer.name}/kernel"]
  bias = arrays[f"{layer.name}/bias"]
  scale = arrays[f"{layer.name}/scale"] if layer.quantized else None
  fmt = layer.code_format
  if _runs_kernel(layer, code_layout, backend, platform):
    return kernels.pow2_conv(x, _kernel_words(layer, kernel, fmt, code_layout), bits=fmt.bits,
                             e0=fmt.e0, kernel_shape=layer.shape, strides=layer.strides,
                             padding=layer.padding, scale=scale, bias=bias,
                             residual=residual, relu=layer.relu, backend=backend,
                             platform=platform)
  w = (decode_kernel(kernel, fmt, layer.shape, code_layout) if layer.quantized
       else kernel.astype(jnp.float32))
  return kernels.fused_conv(x, w, strides=layer.strides, padding=layer.padding, scale=scale,
                            bias=bias, residual=residual, relu=layer.relu)


def _dense_layer(layer: Layer, arrays, x, code_layout, backend, platform):
  kernel = arrays[f"{layer.name}/kernel"]
  bias = arrays[f"{layer.name}/bias"]
  fmt = layer.code_format
  if _runs_kernel(layer, code_layout, backend, platform):
    return kernels.pow2_matmul(x, _kernel_words(layer, kernel, fmt, code_layout),
                               bits=fmt.bits, e0=fmt.e0, bias=bias, backend=backend,
                               platform=platform)
  w = (decode_kernel(kernel, fmt, layer.shape, code_layout) if layer.quantized
       else kernel.astype(jnp.float32))
  return jnp.dot(x, w, precision=lax.Precision.HIGHEST) + bias


def _quantized_input(layer: Layer, arrays, x):
  """The layer's input through its activation quantizer: the very function training
  called (``shiftjax.activations``), with the learned parameters the file stores."""
  params = {p: arrays[f"{layer.name}/activation_{p}"]
            for p in layer.activation.param_shapes()}
  return layer.activation.quantize(params, x)


def _pool_or_dense_layer(layer: Layer, arrays, x, code_layout, backend, platform):
  if layer.op == "max_pool":
    return pooling.max_pool(x, layer.window, layer.strides, layer.padding)
  if layer.op == "mean_pool":
    return jnp.mean(x, axis=(1, 2))
  if layer.op in SPEECH_POOLS:
    return pooling.speech_pool(x, SPEECH_POOLS[layer.op])
  if layer.op == "dense":
    return _dense_layer(layer, arrays, x, code_layout, backend, platform)
  raise PackedModelError(f"unknown layer op {layer.op!r}")


def forward(arrays: Mapping[str, jax.Array], images: jax.Array, plan: tuple, *,
            backend: str | None = None, platform: str | None = None) -> jax.Array:
  """The packed forward pass (traceable); ``plan`` is ``PackedModel.plan``."""
  layers, code_layout = plan
  acts = {"input": images.astype(jnp.float32)}
  for layer in layers:
    x = acts[layer.input]
    if layer.activation is not None:
      x = _quantized_input(layer, arrays, x)
    if layer.op == "conv":  # the layer's residual and relu included
      residual = acts[layer.residual] if layer.residual is not None else None
      acts[layer.name] = _conv_layer(layer, arrays, x, residual, code_layout, backend,
                                     platform)
    else:
      y = _pool_or_dense_layer(layer, arrays, x, code_layout, backend, platform)
      acts[layer.name] = jax.nn.relu(y) if layer.relu else y
  return acts[layers[-1].name]


def jitted_forward(packed: PackedModel, backend: str | None = None,
                   platform: str | None = None):
  """``jax.jit`` of ``forward`` for ``packed``'s plan: ``f(arrays, images)``.

  Built once per model and (backend, platform), kept on the model, so that a call does
  not hash the plan again.
  """
  cache = packed.__dict__.setdefault("_jitted", {})
  if (backend, platform) not in cache:
    cache[(backend, platform)] = jax.jit(functools.partial(
        forward, plan=packed.plan, backend=backend, platform=platform))
  return cache[(backend, platform)]


def _check_images(packed: PackedModel, shape) -> None:
  cin = packed.config["in_channels"]
  if len(shape) != 4 or shape[-1] != cin:
    raise ValueError(f"images must be [N, H, W, {cin}] (normalized, NHWC), got shape "
                     f"{tuple(shape)}")


def packed_apply(packed: PackedModel, images, *, backend: str | None = None,
                 platform: str | None = None) -> jax.Array:
  """Logits ``[N, num_classes]`` (float32) of normalized NHWC ``images``, weights packed.

  Equals ``model.apply(variables, images, train=False)`` of the exported model up to
  float rounding (BatchNorm is folded). ``backend``/``platform`` go to
  ``shiftjax.kernels`` (None: Pallas on GPU/TPU, XLA on CPU).
  """
  images = jnp.asarray(images, jnp.float32)
  _check_images(packed, images.shape)
  runnable = in_kernel_layout(packed, backend, platform)
  return jitted_forward(runnable, backend, platform)(runnable.device_arrays, images)


def in_kernel_layout(packed: PackedModel, backend: str | None = None,
                     platform: str | None = None) -> PackedModel:
  """``packed`` as the kernels read it: where they run (Pallas on GPU/TPU), a bit-plane
  file's codes become the word layout once, kept on the model, instead of being repacked
  inside every call; where XLA decodes (CPU), bit planes are decoded as they are."""
  if packed.code_layout == "words" or resolve_backend(backend, platform)[0] == "xla":
    return packed
  cache = packed.__dict__.setdefault("_in_words", {})
  if "words" not in cache:
    cache["words"] = folding.with_code_layout(packed, "words")
  return cache["words"]


# ---------------------------------------------------------------- jax.export artifacts


def export_serialized(packed: PackedModel, batch_shape: Sequence[int | None], *,
                      platforms: Sequence[str] | None = None, backend: str | None = "xla",
                      platform: str | None = None) -> bytes:
  """Packed inference as a serialized ``jax.export.Exported`` (bytes).

  The packed words, scales and biases are constants of the exported function, which
  maps float32 ``batch_shape`` images (normalized NHWC; a None dimension is symbolic)
  to float32 logits. Anyone with jax runs it without shiftjax::

    exported = jax.export.deserialize(bytearray(open(path, 'rb').read()))
    logits = exported.call(images)

  Args:
    packed: the model.
    batch_shape: ``(N, H, W, C)``; e.g. ``(None, 28, 28, 1)`` for any batch size.
    platforms: ``jax.export`` lowering platforms (default: this machine's), e.g.
      ``['cpu', 'cuda']`` for one artifact that runs on both.
    backend, platform: passed to ``shiftjax.kernels``. The default ``'xla'`` decodes
      the packed words with XLA ops and convolves with XLA's conv (never the native CPU
      kernel), which serialize for every platform. The GPU Pallas
      kernel lowers to a Triton custom call, which ``jax.export`` refuses to serialize
      (no compatibility guarantee); ``backend='pallas', platform='tpu'`` with
      ``platforms=['tpu']`` embeds the Mosaic TPU kernel (UNVERIFIED: no TPU here).
  Requires the ``flatbuffers`` package (jax's serializer).
  """
  _check_images(packed, tuple(batch_shape))
  if any(d is None for d in batch_shape):
    names = iter("abcd")
    dims = ", ".join(next(names) if d is None else str(int(d)) for d in batch_shape)
    shape = jax.export.symbolic_shape(dims)
  else:
    shape = tuple(int(d) for d in batch_shape)
  arrays, plan = packed.device_arrays, packed.plan

  def infer(images):
    return forward(arrays, images, plan, backend=backend, platform=platform)

  # Plain XLA ops only: the native CPU conv is an FFI call of a library built on this
  # machine, which the artifact could not carry (and jax.export refuses to serialize).
  with native.disabled():
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(
        jax.ShapeDtypeStruct(shape, jnp.float32))
  return bytes(exported.serialize())


def save_serialized(packed: PackedModel, path: str | os.PathLike,
                    batch_shape: Sequence[int | None], *, overwrite: bool = False,
                    **kwargs) -> str:
  """Writes ``export_serialized(packed, batch_shape, **kwargs)`` atomically to ``path``."""
  path = os.fspath(path)
  if not overwrite and os.path.lexists(path):
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  write_atomic(path, export_serialized(packed, batch_shape, **kwargs), overwrite=overwrite)
  return path

