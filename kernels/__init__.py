"""Kernels for packed power-of-two weights, imported as ``shiftjax.kernels``.

``pow2_matmul`` multiplies by packed zero-free N-bit power-of-two weights (Pallas on
GPU/TPU, XLA on CPU); ``pow2_conv`` is the NHWC convolution built on it.
"""

from shiftjax.kernels.conv import pow2_conv
from shiftjax.kernels.matmul import BACKENDS
from shiftjax.kernels.matmul import Blocks
from shiftjax.kernels.matmul import codes_per_word
from shiftjax.kernels.matmul import decode_slot
from shiftjax.kernels.matmul import default_blocks
from shiftjax.kernels.matmul import pow2_matmul
from shiftjax.kernels.matmul import SUPPORTED_BITS
from shiftjax.kernels.matmul import unpack_codes

__all__ = [
    "BACKENDS", "Blocks", "SUPPORTED_BITS", "codes_per_word", "decode_slot",
    "default_blocks", "pow2_conv", "pow2_matmul", "unpack_codes",
]
