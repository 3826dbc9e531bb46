"""The methods the transformer benchmarks compare (the ViT and the language model).

Exponent offsets put each format's largest magnitude at 1/4 (1/8 at 2 bits): a
transformer's matmuls have no BatchNorm after them to absorb a scale, and He's std for
their fan-ins (128-768) is 2**-3..2**-4.
"""

from __future__ import annotations

from typing import Callable

import shiftjax as sj
from shiftjax.policy import LayerPolicy

SPECS = {"DenseShift 3-bit": sj.DenseShift(3, e0=-5), "S3 3-bit": sj.S3(3, e0=-4),
         "DenseShift 2-bit": sj.DenseShift(2, e0=-4), "DenseShift 4-bit": sj.DenseShift(4, e0=-9)}
DEFAULT_METHODS = ("float", "DenseShift 3-bit", "S3 3-bit", "DenseShift 2-bit")


def methods(float_layers: tuple[str, ...], attention: str
            ) -> dict[str, Callable[[], LayerPolicy]]:
  """``{method: policy factory}``: float, each of ``SPECS`` with ``float_layers`` kept
  float, and DenseShift 3-bit with the ``attention`` projections float, or at 4 bits."""
  return {
      "float": lambda: LayerPolicy(None),
      **{name: (lambda spec=spec: LayerPolicy(spec, float_layers))
         for name, spec in SPECS.items()},
      "DenseShift 3-bit, attention float": lambda: LayerPolicy(
          SPECS["DenseShift 3-bit"], float_layers + (attention,)),
      "DenseShift 3-bit, attention 4-bit": lambda: LayerPolicy(
          SPECS["DenseShift 3-bit"], float_layers,
          layer_quantizers=((attention, SPECS["DenseShift 4-bit"]),)),
  }
