"""Differentiable float convolution for training: ``conv`` (custom VJP) on ``native`` CPU kernels."""
