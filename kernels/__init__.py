"""shiftjax's kernels, imported as ``shiftjax.kernels``; three folders by purpose.

* ``shiftjax.kernels.inference``: run packed N-bit power-of-two codes, no gradients.
  ``pow2_matmul`` multiplies by packed zero-free weights (the native C++ kernel on CPU,
  docs/cpu_kernel.md, with an XLA fallback; Pallas on GPU/TPU, its tiles a ``Blocks``
  value, ``default_blocks`` unless given; packed words or ``TiledWords``, their native
  CPU layout, from ``tile_words``); ``pow2_conv`` is the NHWC convolution built on
  it; ``fused_conv`` a layer's conv and epilogue on float (decoded) weights. Re-exported
  here: this is the deployment API (``shiftjax.deploy`` runs packed models on it). The
  internals (the in-kernel decoders, the backend choice, the tiling rules) are imported
  from their modules: ``shiftjax.kernels.inference.matmul``, ``.tiling``, ``.in_kernel``.
* ``shiftjax.kernels.training``: the differentiable float convolution that training's
  layers call (``conv2d`` with its CPU-fast custom VJP). Not imported here: deployment
  does not need it.
* ``shiftjax.kernels.cpu``: the native C++ CPU kernels (``native``, ``cpu_conv.cc``,
  ``cpu_pow2_matmul.cc``) both run on: the forward conv (with a fused epilogue for
  inference), the kernel gradient and the packed matmul.
"""

from shiftjax.kernels.cpu.layout import tile_words
from shiftjax.kernels.cpu.layout import TiledWords
from shiftjax.kernels.inference.conv import fused_conv
from shiftjax.kernels.inference.conv import pow2_conv
from shiftjax.kernels.inference.matmul import BACKENDS
from shiftjax.kernels.inference.matmul import pow2_matmul
from shiftjax.kernels.inference.matmul import SUPPORTED_BITS
from shiftjax.kernels.inference.tiling import Blocks
from shiftjax.kernels.inference.tiling import default_blocks

__all__ = ["BACKENDS", "Blocks", "SUPPORTED_BITS", "default_blocks", "fused_conv",
           "pow2_conv", "pow2_matmul", "tile_words", "TiledWords"]
