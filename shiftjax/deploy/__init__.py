"""Deployment of packed shift networks, independent of the training stack.

A packed model file holds a model's quantized layers as N-bit codes (bit planes, exactly
N bits per weight) keyed by module path, BatchNorms folded into the layers they follow,
and every other variable the model needs. It runs through the model's own code (linen
or NNX) with its quantized layers reading the codes, or as a ``jax.export`` artifact.

  container      the checksummed, versioned file (``write_atomic``)
  format         ``load`` (every version); ``PackedModel``, a packed ResNet of format
                 versions 1-3, read for ``shiftjax.export.upgrade``
  packed_tree    ``PackedTree``: what a version 4 file holds
  spec_json      weight and input specs as JSON
  resnet_config  the zoo ResNets' constructor arguments in a file, and their checks
  packed_layers  ``pack_model``, ``save_model``, ``load_model``, ``export_artifact``:
                 any linen or NNX model's packed layers (needs flax; imported on first
                 use)
  norm_folding   BatchNorm folding for any model
  epilogues      ``fuse_conv_epilogues``: a residual add and relu moved into the native
                 conv before them (a pass over any function's jaxpr)

None of it imports optax, orbax, tensorflow-datasets or ml_collections.
``shiftjax.export`` packs and loads the zoo's ResNets.
"""

import importlib

from shiftjax.deploy.container import FILE_SUFFIX, write_atomic
from shiftjax.deploy.epilogues import fuse_conv_epilogues
from shiftjax.deploy.format import FORMAT_VERSION, PackedModel, from_bytes, load
from shiftjax.deploy.packed_tree import LayerEntry, PackedTree
from shiftjax.deploy.spec_json import PackedModelError

__all__ = [
    "FILE_SUFFIX", "FORMAT_VERSION", "LayerEntry", "PackedModel", "PackedModelError",
    "PackedTree", "export_artifact", "from_bytes", "fuse_conv_epilogues", "load",
    "load_model", "pack_model", "save_artifact", "save_model", "write_atomic",
]

# Need flax: imported on first use. {name: module}
_LAZY_NAMES = {name: "packed_layers" for name in (
    "pack_model", "PackedKernel", "save_model", "load_model", "export_artifact",
    "save_artifact")}


def __getattr__(name):
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"shiftjax.deploy.{_LAZY_NAMES[name]}"), name)
  if name in ("packed_layers", "norm_folding"):
    return importlib.import_module(f"shiftjax.deploy.{name}")
  raise AttributeError(f"module 'shiftjax.deploy' has no attribute {name!r}")
