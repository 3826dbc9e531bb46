"""Inference kernels on packed power-of-two codes (no gradients): ``matmul`` and ``conv``."""
