"""Kernels for power-of-two weights, imported as ``shiftjax.kernels``.

The Pallas zero-free power-of-two matmul lands here (issue 5); until then this package
only exists so that ``import shiftjax.kernels`` works in wheel and editable installs.
"""
