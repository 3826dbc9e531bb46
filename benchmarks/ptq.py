"""Post-training quantization of a trained float ViT against quantization-aware training.

    python benchmarks/vit_fashion_mnist.py --seeds=1 --methods=float --workdir=W
    python benchmarks/ptq.py --workdir=W

For each float run in ``W/float/seed*`` (``sj.fit``'s checkpoints) and each width, every
calibration of ``shiftjax.ptq.quantize_trained`` (nearest rounding, + bias correction,
GPTQ-style error feedback, both) converts the trained ViT to DenseShift weights (patch
embedding and classifier float, as in QAT) from ``--calibration`` training images, and
top-1 is measured on all 10k test images, with the conversion's wall time. Prints a
markdown table; QAT rows are read from ``W/<method>/seed*`` when those runs exist.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

import shiftjax as sj
from shiftjax import data as data_lib
from shiftjax import loop
from shiftjax import ptq
from shiftjax.benchmarking import tables
from shiftjax.models import vit as vit_lib


FLOAT_LAYERS = ("patch_embed", "head")  # as benchmarks/vit_fashion_mnist.py keeps them
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "benchmarks/vit_fashion_mnist.py's --workdir: its "
                    "float runs (<workdir>/float/seed*) and QAT runs.")
flags.DEFINE_list("bits", ["3", "4"], "DenseShift widths.")
flags.DEFINE_integer("calibration", 512, "Training images the calibration sees.")
CALIBRATIONS = ptq.CALIBRATIONS


def accuracy(model, variables, test) -> float:
  apply = jax.jit(model.apply)
  correct = sum(int((np.argmax(apply(variables, test["image"][i:i + 1000]), -1)
                     == test["label"][i:i + 1000]).sum())
                for i in range(0, len(test["label"]), 1000))
  return correct / len(test["label"])


def qat_accuracy(method: str) -> list[float]:
  runs = sorted(glob.glob(os.path.join(FLAGS.workdir, method.replace(" ", "_"), "seed*",
                                       "metrics.jsonl")))
  out = []
  for path in runs:
    lines = [json.loads(l) for l in open(path)]
    evals = [l["eval_accuracy"] for l in lines if "eval_accuracy" in l]
    if evals:
      out.append(evals[-1])
  return out


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir names benchmarks/vit_fashion_mnist.py's workdir")
  train = data_lib.fashion_mnist.normalized_arrays("train")
  test = data_lib.fashion_mnist.normalized_arrays("test")
  calibration = [(train["image"][i:i + 128],) for i in range(0, FLAGS.calibration, 128)]
  model = vit_lib.vit_tiny()
  rows = {}
  for seed_dir in sorted(glob.glob(os.path.join(FLAGS.workdir, "float", "seed*"))):
    variables = loop.load_variables(seed_dir)
    rows.setdefault("float", []).append((accuracy(model, variables, test), 0.0))
    for bits in map(int, FLAGS.bits):
      policy = sj.LayerPolicy(sj.DenseShift(bits), FLOAT_LAYERS)
      for name, kwargs in CALIBRATIONS.items():
        start = time.time()
        quantized, qvars = ptq.quantize_trained(model, policy, variables, calibration,
                                                **kwargs)
        seconds = time.time() - start
        top1 = accuracy(quantized, qvars, test)
        rows.setdefault(f"PTQ DenseShift {bits}-bit, {name}", []).append((top1, seconds))
        print(f"{seed_dir} {bits}-bit {name}: {top1:.4f} ({seconds:.1f} s)", flush=True)
  if "float" not in rows:
    raise app.UsageError(f"no float run in {FLAGS.workdir}/float/seed*")
  reference = statistics.mean(t for t, _ in rows["float"])
  print(f"\nPTQ of the float ViT (vit_tiny, {len(rows['float'])} run(s)), calibration "
        f"{FLAGS.calibration} training images\n")
  table = []
  for name, values in rows.items():
    top1, _ = tables.mean_std([t for t, _ in values])
    table.append((name, f"{100 * top1:.2f}", f"{100 * (top1 - reference):+.2f}",
                  f"{statistics.mean(s for _, s in values):.1f}"))
  for bits in map(int, FLAGS.bits):
    qat = qat_accuracy(f"DenseShift {bits}-bit")
    if qat:
      top1, _ = tables.mean_std(qat)
      table.append((f"QAT DenseShift {bits}-bit ({len(qat)} run(s), vit_fashion_mnist.py)",
                    f"{100 * top1:.2f}", f"{100 * (top1 - reference):+.2f}", "(training)"))
  print(tables.markdown(("model", "test top-1", "vs float (points)", "conversion seconds"),
                        table))


if __name__ == "__main__":
  app.run(main)
