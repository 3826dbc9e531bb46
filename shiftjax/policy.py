"""Which layers of a model are quantized: a quantizer and glob patterns of float layers.

Shared by the flax layers (``shiftjax.layers``), which create latents or float kernels
by it, and the packed forward pass (``shiftjax.deploy``), which rebuilds from a file's
patterns which layers hold codes; it needs neither flax nor the training stack.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Sequence

from shiftjax import quantizers as qz

# The reference code keeps the stem conv and the classifier in full precision.
DEFAULT_FULL_PRECISION = ("stem", "head")


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
  """Which layers get ``quantizer``: all but those whose path matches a pattern.

  Paths are module names joined by ``/`` below the model (``'stage1_block0/conv1'``);
  patterns are ``fnmatch`` globs matched against the whole path.
  """
  quantizer: qz.Quantizer | None = None
  full_precision: tuple[str, ...] = DEFAULT_FULL_PRECISION

  def __post_init__(self):
    if isinstance(self.full_precision, str):
      raise ValueError(
          f"full_precision must be a tuple of patterns, got the string {self.full_precision!r}")

  def quantizer_for(self, path: Sequence[str]) -> qz.Quantizer | None:
    """The quantizer of the layer at ``path`` (None: kept full precision)."""
    name = "/".join(path)
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.full_precision):
      return None
    return self.quantizer


def is_latent_kernel(kernel) -> bool:
  """Whether a ``'kernel'`` param holds quantizer latents (a dict) or float weights."""
  return isinstance(kernel, dict) or hasattr(kernel, "keys")
