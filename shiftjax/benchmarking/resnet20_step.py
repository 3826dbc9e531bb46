"""The ResNet-20 CPU training step the speed benchmarks time and profile
(``benchmarks/train_step.py``, ``benchmarks/profile_train_step.py``).

``Resnet20Step`` is ``shiftjax.loop.train_step`` as the launcher runs it (uint8 images
normalized on device, SGD momentum 0.9 + coupled weight decay 1e-4, BatchNorm statistics
updated), jitted with the state donated, on CIFAR shapes (32x32x3, 10 classes).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import ml_collections
import numpy as np

from shiftjax import loop
from shiftjax import models
from shiftjax import train
from shiftjax.kernels.cpu import native

BATCH_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def optimizer_config() -> ml_collections.ConfigDict:
  """The optimizer fields of experiments/configs/default.py (the reference recipe), and
  the dataset whose normalization the step applies."""
  return ml_collections.ConfigDict(dict(
      optimizer="sgd", momentum=0.9, nesterov=False, weight_decay=1e-4,
      weight_decay_on="all", dataset="cifar10"))


def random_batch(batch: int, seed: int = 0) -> dict:
  """``{'image': uint8 [batch, 32, 32, 3], 'label': int32 [batch]}``, random."""
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch, *BATCH_SHAPE), dtype=np.uint8),
          "label": rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)}


class Resnet20Step:
  """The jitted ``loop.train_step`` of one model variant, carrying its own state; each
  call is one step (blocked on) and returns its mean loss.

  ``step`` is the compiled executable; ``native`` says whether it calls the native CPU
  kernels (``native_kernels=False`` traces it without them)."""

  def __init__(self, quantizer, fast_grad: bool, batch: dict, compiler_options=None,
               native_kernels: bool = True):
    model = models.resnet20(num_classes=NUM_CLASSES, quantizer=quantizer, fast_grad=fast_grad)
    key = train.init_key(0)
    config = optimizer_config()
    self.state = train.create_train_state(key, config, model, BATCH_SHAPE, lambda step: 0.1)
    self.batch = jax.device_put(batch)
    self.key = jax.random.fold_in(key, 1)
    step = jax.jit(functools.partial(
        loop.train_step, model=loop.functional(model), task=train.image_task(config),
        tx=train.create_optimizer(config, lambda step: 0.1)), donate_argnums=0,
        compiler_options=compiler_options)
    # Compiled here: whether the native kernels are used is decided when tracing.
    with contextlib.nullcontext() if native_kernels else native.disabled():
      self.step = step.lower(self.state, self.batch, self.key).compile()
    self.native = "shiftjax_conv" in self.step.as_text()  # the native kernels' FFI targets
    if self.native and not native_kernels:
      raise RuntimeError("the step traced without native kernels still calls them")

  def __call__(self) -> float:
    self.state, metrics = self.step(self.state, self.batch, self.key)
    jax.block_until_ready(metrics)
    return float(metrics["loss"])
