"""shiftjax: low-bit power-of-two (shift) neural networks in JAX/Flax."""

from shiftjax import codes
from shiftjax import quantizers
from shiftjax.quantizers import DeepShiftPS, DeepShiftQ, DenseShift, S3, s3_regularizer

__version__ = "0.1.0"
