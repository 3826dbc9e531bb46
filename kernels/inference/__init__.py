"""Inference kernels on packed power-of-two codes (no gradients): ``matmul`` (the public
``pow2_matmul``) on ``matmul_xla``, the native CPU kernel or the Pallas kernels
(``matmul_pallas``, ``matmul_tpu``, ``matmul_gpu``, ``in_kernel``, tiles from ``tiling``);
``conv`` built on it."""
