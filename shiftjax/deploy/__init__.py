"""Deployment of packed shift networks, independent of the training stack.

A packed model is data: an architecture name and config, a quantizer spec, and arrays
of N-bit codes packed in uint32 words with BatchNorm folded into per-channel scales and
biases. This package reads, writes, builds and runs such models, and imports only jax,
numpy, the quantizers, the code format and the inference kernels (no flax, optax, orbax,
tensorflow-datasets or ml_collections):

  architecture   the layers an architecture config implies, and config validation
  format         ``PackedModel`` and its versioned, checksummed file (``load``, ``save``)
  folding        trained variables -> ``PackedModel`` (``pack``, ``fold_batch_norm``),
                 and between code layouts (``with_code_layout``)
  apply          the packed forward pass (``packed_apply``) and ``jax.export`` artifacts

``shiftjax.export`` is the bridge from a trained flax module to ``pack``.

Any model (linen or NNX, from ``shiftjax.quantize_model``) packs and runs through its own
code with ``packed_layers`` (``pack_model``); that module needs flax, so it is imported
on first use (``sj.deploy.pack_model``).
"""

import importlib

from shiftjax.deploy.apply import decode_kernel, export_serialized, forward, packed_apply
from shiftjax.deploy.apply import save_serialized
from shiftjax.deploy.architecture import ARCHITECTURES, CODE_LAYOUTS, Layer, PackedModelError
from shiftjax.deploy.architecture import build_layers, check_architecture, expected_arrays
from shiftjax.deploy.folding import BN_EPSILON, fold_batch_norm, pack, with_code_layout
from shiftjax.deploy.format import FILE_SUFFIX, FORMAT_VERSION, PackedModel, from_bytes
from shiftjax.deploy.format import load, write_atomic

__all__ = [
    "ARCHITECTURES", "BN_EPSILON", "CODE_LAYOUTS", "FILE_SUFFIX", "FORMAT_VERSION", "Layer",
    "PackedModel", "PackedModelError", "build_layers", "check_architecture", "decode_kernel",
    "expected_arrays", "export_serialized", "fold_batch_norm", "forward", "from_bytes", "load",
    "pack", "packed_apply", "save_serialized", "with_code_layout", "write_atomic",
]

# Needs flax: imported on first use. {name: module}
_LAZY_NAMES = {"pack_model": "packed_layers", "PackedKernel": "packed_layers"}


def __getattr__(name):
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"shiftjax.deploy.{_LAZY_NAMES[name]}"), name)
  if name == "packed_layers":
    return importlib.import_module("shiftjax.deploy.packed_layers")
  raise AttributeError(f"module 'shiftjax.deploy' has no attribute {name!r}")
