"""Differentiable float convolution for training: ``conv`` (custom VJP) on the native CPU kernels (``shiftjax.kernels.cpu``)."""
