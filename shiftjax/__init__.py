"""shiftjax: low-bit power-of-two (shift) neural networks in JAX/Flax.

``import shiftjax as sj``:

* specs: weight quantizers (``sj.DenseShift``, ``sj.S3``, ``sj.DeepShiftQ``,
  ``sj.DeepShiftPS``), activation quantizers (``sj.PACT``, ``sj.FixedPoint``), the
  N-bit code format (``sj.codes``);
* any model: ``sj.quantize_model(model, sj.LayerPolicy(...))`` (linen or NNX, rules over
  module paths), ``sj.summarize``, ``sj.fit`` (``shiftjax.loop``: any model, any data),
  ``sj.ptq`` (post-training quantization of a trained float model);
* deployment: ``sj.deploy`` (packed files, ``pack_model`` for any model, packed apply),
  ``sj.kernels`` (the packed matmul and conv: native CPU, Pallas on GPU/TPU, XLA);
* the zoo and its launcher: ``sj.models`` (ResNets, a ViT, a byte-level language model),
  ``sj.data``, ``sj.audio``, ``sj.train``, ``sj.transfer``, ``sj.distill``, ``sj.export``.

Only the specs and the code format are imported with the package; every other module on
first use (``sj.train``, ``from shiftjax import train``). So a program that loads and
runs a packed ResNet needs jax and numpy, not flax, optax, orbax, tensorflow-datasets or
ml_collections.
"""

import importlib

from shiftjax import activations
from shiftjax import codes
from shiftjax import quantizers
from shiftjax.activations import FixedPoint, PACT
from shiftjax.quantizers import DeepShiftPS, DeepShiftQ, DenseShift, S3, s3_regularizer

__version__ = "0.1.0"

# Imported on first attribute access (PEP 562): these pull in flax, optax, orbax,
# tensorflow-datasets and ml_collections, which deployment does not need.
_LAZY_MODULES = ("audio", "batch_norm", "data", "deploy", "distill", "export",
                 "host_memory", "interception", "kernels", "layers", "loop", "metrics",
                 "models", "optim", "policy", "ptq", "summary", "train", "transfer", "trees")
# Functions and classes of those modules that ``sj.`` offers directly: {name: module}.
_LAZY_NAMES = {"quantize_model": "interception", "LayerPolicy": "policy",
               "PolicyError": "policy", "summarize": "summary", "fit": "loop"}


def __getattr__(name):
  if name in _LAZY_MODULES:
    return importlib.import_module(f"shiftjax.{name}")
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"shiftjax.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module 'shiftjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
