"""What the scripts in ``benchmarks/`` share, and what the tests check of them.

``timing``: one harness for every timed comparison (contenders called in alternation,
medians and percentiles). ``method_comparison``: the accuracy benchmarks' methods, runs
and statistics over seeds. ``weight_values``: the share of each weight magnitude.
``resnet20_step``: the CPU training step the speed benchmarks time and profile. ``sass``,
``gpu_tiles`` and ``gpu_checks``: the GPU kernel's machine code read without a GPU, the
tile settings its benchmark sweeps, and the correctness cases it runs first.

Nothing is imported with the package: ``timing``, ``gpu_tiles`` and ``gpu_checks`` need
only jax and numpy (a GPU machine without the training stack runs them);
``method_comparison``, ``weight_values`` and ``resnet20_step`` import the training stack.
"""
