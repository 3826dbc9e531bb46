"""shiftjax's kernels, imported as ``shiftjax.kernels``; three folders by purpose.

* ``shiftjax.kernels.inference``: run packed N-bit power-of-two codes, no gradients.
  ``pow2_matmul`` multiplies by packed zero-free weights (Pallas on GPU/TPU, XLA on CPU);
  ``pow2_conv`` is the NHWC convolution built on it; ``fused_conv`` a layer's conv and
  epilogue on float (decoded) weights. Re-exported here: this is the
  deployment API (``shiftjax.deploy`` runs packed models on it).
* ``shiftjax.kernels.training``: the differentiable float convolution that training's
  layers call (``conv2d`` with its CPU-fast custom VJP). Not imported here: deployment
  does not need it.
* ``shiftjax.kernels.cpu``: the native C++ CPU kernels (``native``, ``cpu_conv.cc``) both
  run on: the forward conv (with a fused epilogue for inference) and the kernel gradient.
"""

from shiftjax.kernels.inference.conv import fused_conv
from shiftjax.kernels.inference.conv import pow2_conv
from shiftjax.kernels.inference.matmul import BACKENDS
from shiftjax.kernels.inference.matmul import Blocks
from shiftjax.kernels.inference.matmul import codes_per_word
from shiftjax.kernels.inference.matmul import decode_pair_bf16
from shiftjax.kernels.inference.matmul import decode_slot
from shiftjax.kernels.inference.matmul import default_blocks
from shiftjax.kernels.inference.matmul import default_dot
from shiftjax.kernels.inference.matmul import FMA_MAX_ACCUMULATOR
from shiftjax.kernels.inference.matmul import GPU_DOTS
from shiftjax.kernels.inference.matmul import pow2_matmul
from shiftjax.kernels.inference.matmul import resolve_backend
from shiftjax.kernels.inference.matmul import SUPPORTED_BITS
from shiftjax.kernels.inference.matmul import unpack_codes

__all__ = [
    "BACKENDS", "Blocks", "FMA_MAX_ACCUMULATOR", "GPU_DOTS", "SUPPORTED_BITS",
    "codes_per_word", "decode_pair_bf16", "decode_slot", "default_blocks", "default_dot",
    "fused_conv", "pow2_conv", "pow2_matmul", "resolve_backend", "unpack_codes",
]
