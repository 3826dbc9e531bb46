"""Native C++ CPU kernels (``native``, ``cpu_conv.cc``), shared by training and inference.

The forward convolution serves both: training's ``conv2d`` and, with the layer's
epilogue fused (scale, bias, residual, relu), the packed forward pass on the CPU. The
kernel gradient serves training. Needs jax only, so deployment can use it.
"""
