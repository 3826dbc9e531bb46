"""shiftjax: low-bit power-of-two (shift) neural networks in JAX/Flax."""

from shiftjax import codes

__version__ = "0.1.0"
