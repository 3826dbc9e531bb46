"""shiftjax: low-bit power-of-two (shift) neural networks in JAX/Flax.

``import shiftjax as sj``: quantizer specs (``sj.DenseShift``, ``sj.S3``,
``sj.DeepShiftQ``, ``sj.DeepShiftPS``), the code format (``sj.codes``), layers
(``sj.layers``, ``sj.conv`` and ``sj.batch_norm`` with CPU-fast gradients), models (``sj.models``), packed export (``sj.export``), the kernels
(``sj.kernels``, also ``import shiftjax.kernels``), data pipelines (``sj.data``), the
log-mel frontend (``sj.audio``), training (``sj.train``, ``sj.metrics``) and
float-to-shift conversion (``sj.transfer``); ``sj.host_memory.reuse_freed_memory()`` at
the start of a CPU training program spares each step from faulting in XLA's scratch
memory again.
"""

from shiftjax import codes
from shiftjax import quantizers
from shiftjax.quantizers import DeepShiftPS, DeepShiftQ, DenseShift, S3, s3_regularizer
from shiftjax import conv
from shiftjax import batch_norm
from shiftjax import layers
from shiftjax import models
from shiftjax import kernels
from shiftjax import export
from shiftjax import audio
from shiftjax import data
from shiftjax import metrics
from shiftjax import train
from shiftjax import transfer
from shiftjax import host_memory

__version__ = "0.1.0"
