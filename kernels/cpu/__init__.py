"""Native C++ CPU kernels (``native``, ``cpu_conv.cc``, ``cpu_pow2_matmul.cc``), shared by
training and inference; ``layout``: the packed matmul's tiled layout of the words.

The forward convolution serves both: training's ``conv2d`` and, with the layer's
epilogue fused (scale, bias, residual, relu), the packed forward pass on the CPU. The
kernel gradient serves training. Needs jax only, so deployment can use it.
"""
