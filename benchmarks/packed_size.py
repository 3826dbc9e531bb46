"""Packed model file sizes against float32 weights: ResNet-20 and ResNet-18, 2..5 bits
and mixed widths.

    python benchmarks/packed_size.py

For each model and DenseShift bit width: a randomly initialized model (sizes do not
depend on the values) is exported (``shiftjax.export.export``: format version 4, BatchNorm
folded into each quantized conv's scale and bias) and written to a temporary directory
(``PackedTree.save``); the script prints the file's bytes (header and digests included),
the stored bits per quantized weight (``size_report``), the bits per weight of the whole
file, and how much smaller the file is than the network's float32 weights (every
conv/dense kernel plus BatchNorm gamma, beta, mean, var and the dense bias, as
``train.weight_bytes``; the file holds a folded BatchNorm as two arrays, not four).
Version 4 files store codes only as bit planes (N words hold
bit j of 32 codes: exactly N bits per weight); there is no other layout to compare.
The stem and the classifier stay float32, as in the training recipe. The ``mixed`` row
has the first and the last quantized stage at 4 bits and the others at 2 (per-layer
specs, ``layer_quantizers``): every layer is stored at its own width.

The latents use DenseShift's ``'binary'`` encoding (N-1 latents per weight, not the
chain's 2**(N-1)-1) to keep ResNet-18 at 5 bits in memory; the codes and so the file are
the same for either encoding.
"""

from __future__ import annotations

import functools
import os
import tempfile

from absl import app
import jax
import jax.numpy as jnp

import shiftjax as sj
from shiftjax import export as ex
from shiftjax import models
from shiftjax import train

MODELS = {  # name: (make(quantizer, layer_quantizers), input shape, number of stages)
    "ResNet-20 (CIFAR-10)": (lambda q, rules: models.resnet20(
        num_classes=10, policy=sj.LayerPolicy(q, ("stem", "head"), rules)), (32, 32, 3), 3),
    "ResNet-18 (ImageNet)": (lambda q, rules: models.resnet18(
        num_classes=1000, policy=sj.LayerPolicy(q, ("stem", "head"), rules)), (64, 64, 3), 4),
}


def dense_shift(bits: int) -> sj.DenseShift:
  return sj.DenseShift(bits=bits, encoding="binary", init_method="he")


def widths(stages: int):
  """(label, default quantizer, per-layer rules): 2..5 bits, then mixed 4/2../4."""
  for bits in (2, 3, 4, 5):
    yield str(bits), dense_shift(bits), ()
  yield "mixed", dense_shift(2), (("stage1_*/*", dense_shift(4)),
                                  (f"stage{stages}_*/*", dense_shift(4)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"{'model':22s} {'bits':>5s} {'file KiB':>10s} {'float32 KiB':>12s} "
        f"{'smaller':>8s} {'bits/q-weight':>13s} {'bits/weight':>11s} {'q-weights':>10s}")
  with tempfile.TemporaryDirectory() as tmp:
    for name, (make, image_shape, stages) in MODELS.items():
      for bits, quantizer, rules in widths(stages):
        model = make(quantizer, rules)
        variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(0, impl="rbg"), jnp.zeros((1, *image_shape)))
        variables = jax.device_get(variables)
        packed = ex.export(variables, model)
        path = packed.save(os.path.join(tmp, f"{name.split()[0]}-{bits}.shiftjax"))
        size = os.path.getsize(path)
        assert sj.deploy.load(path).layers.keys() == packed.layers.keys()
        report = packed.size_report()
        float32_bytes = train.weight_bytes(
            variables["params"], variables["batch_stats"],
            {p: e.weight_spec for p, e in packed.layers.items()})["float32_weight_bytes"]
        total_weights = float32_bytes // 4
        print(f"{name:22s} {bits:>5s} {size / 1024:10.1f} {float32_bytes / 1024:12.1f} "
              f"{float32_bytes / size:7.2f}x "
              f"{report['bits_per_quantized_weight']:13.3f} "
              f"{8 * size / total_weights:11.3f} {report['quantized_weights']:10d}")
        del variables, packed


if __name__ == "__main__":
  app.run(main)
