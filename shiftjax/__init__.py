"""shiftjax: low-bit power-of-two (shift) neural networks in JAX/Flax.

``import shiftjax as sj``: quantizer specs (``sj.DenseShift``, ``sj.S3``,
``sj.DeepShiftQ``, ``sj.DeepShiftPS``), activation quantizers (``sj.PACT``,
``sj.FixedPoint``: ``sj.activations``), the code format (``sj.codes``), layers
(``sj.layers``, ``sj.batch_norm``), models (``sj.models``), deployment of packed models
(``sj.deploy``: the file format, BatchNorm folding, packed apply), export of trained flax
models (``sj.export``), the kernels (``sj.kernels``: inference on packed codes;
``shiftjax.kernels.training``: the differentiable CPU-fast convolution), data pipelines
(``sj.data``), the log-mel frontend (``sj.audio``), training (``sj.train``,
``sj.metrics``), float-to-shift conversion (``sj.transfer``) and distillation from a
float run (``sj.distill``);
``sj.host_memory.reuse_freed_memory()`` at the start of a CPU training program spares
each step from faulting in XLA's scratch memory again.

Only the quantizers (weights and activations) and the code format are imported with the
package; every other
module is imported on first use (``sj.train``, ``from shiftjax import train``). So a program that only loads and runs a packed model
needs jax and numpy, not flax, optax, orbax, tensorflow-datasets or ml_collections.
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
                 "models", "optim", "policy", "summary", "train", "transfer", "trees")
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
