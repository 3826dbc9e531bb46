"""A float ViT (linen) shift-quantized by rules, trained on real Fashion-MNIST.

    python benchmarks/vit_fashion_mnist.py --seeds=3 --steps=1500

For each method (float, DenseShift 3-bit, S3 3-bit, DenseShift 2-bit, and the variants
named by --methods) and seed: ``shiftjax.models.vit_tiny()`` (a plain float flax model)
goes through ``sj.quantize_model`` with the method's policy (the patch embedding and the
classifier stay float, as the papers keep the first and last layer; the formats'
exponent offsets are in ``shiftjax.benchmarking.transformer_methods``), ``sj.fit``
trains it with adam (warmup + cosine) on the 60k training images, and top-1 is measured on all
10k test images. Each shift run is then packed (``sj.deploy.pack_model``), written to
``<run>/model.shiftjax``, loaded back into the float ViT's code
(``deploy.packed_layers.load_model``) and its top-1 compared with the trained model's on
the same 10k images (``shiftjax.benchmarking.agreement``: ties named as such). Prints a
markdown table: mean +- std over seeds, the change against float, the packed files'
agreement and the wall time of a run. Data: Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

from absl import app
from absl import flags
import numpy as np
import optax

import jax

import shiftjax as sj
from shiftjax.benchmarking import agreement as agreement_lib
from shiftjax.benchmarking import tables
from shiftjax.benchmarking import transformer_methods
from shiftjax import data as data_lib
from shiftjax import distill as distill_lib
from shiftjax import loop
from shiftjax import ptq
from shiftjax.deploy import packed_layers
from shiftjax.models import vit as vit_lib

FLOAT_LAYERS = ("patch_embed", "head")
METHODS = transformer_methods.methods(FLOAT_LAYERS, "encoder_block*/attention/*")
DEFAULT_METHODS = transformer_methods.DEFAULT_METHODS

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"Any of {list(METHODS)}.")
flags.DEFINE_integer("seeds", 3, "Seeds per method (0, 1, ...).")
flags.DEFINE_integer("steps", 1500, "Optimizer steps per run (batch 128).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam's peak learning rate.")
flags.DEFINE_float("latent_lr_scale", 1.0, "Multiplies the quantizer latents' updates.")
flags.DEFINE_string("data_dir", data_lib.fashion_mnist.DEFAULT_SOURCE_DIR,
                    "Where the Fashion-MNIST idx files are.")
flags.DEFINE_bool("from_float", False, "Start each shift run from the float run of its "
                  "seed (<workdir>/float/seed<k>) converted by post-training quantization "
                  "(error feedback + bias correction, shiftjax.ptq); the float run's steps "
                  "come on top of --steps. 'float' then trains the float run on for as "
                  "many steps: the control with the same budget.")
flags.DEFINE_float("distill", 0.0, "With --from_float: distill from the float run of "
                   "the seed with this weight of the soft targets (temperature 4; 0: no "
                   "distillation).")
flags.DEFINE_string("workdir", None, "Keep each run's checkpoints and metrics here "
                    "(<workdir>/<method>/seed<k>); a finished run is read, not retrained.")


def load_split(split: str) -> dict[str, np.ndarray]:
  return data_lib.fashion_mnist.normalized_arrays(split, FLAGS.data_dir)


def label(method: str) -> str:
  """The method with the flags that change its training (a workdir and a table row)."""
  if method == "float":  # from float: the float run trained on, the control
    return (method + (", from float" if FLAGS.from_float else "")
            + (f", {FLAGS.steps} steps" if FLAGS.steps != 1500 else ""))
  return (method + (", from float" if FLAGS.from_float else "")
          + (f", latent lr x{FLAGS.latent_lr_scale:g}" if FLAGS.latent_lr_scale != 1 else "")
          + (f", distilled x{FLAGS.distill:g}" if FLAGS.distill else "")
          + (f", {FLAGS.steps} steps" if FLAGS.steps != 1500 else ""))


def from_float(method: str, seed: int, train):
  """The float run of ``seed`` through post-training quantization to ``method``."""
  if not FLAGS.workdir:
    raise app.UsageError("--from_float reads the float runs in --workdir")
  variables = loop.load_variables(os.path.join(FLAGS.workdir, "float", f"seed{seed}"))
  calibration = [(train["image"][i:i + 128],) for i in range(0, 512, 128)]
  return ptq.quantize_trained(vit_lib.vit_tiny(), METHODS[method](), variables, calibration,
                              rounding="error_feedback", bias_correction=True)


def packed_agreement(model, variables, test, workdir: str | None):
  """The trained shift model packed, through its file when there is a ``workdir``,
  against the trained model on the test images."""
  packed, packed_variables = sj.deploy.pack_model(model, variables, test["image"][:1])
  if workdir:
    path = packed_layers.save_model(os.path.join(workdir, "model.shiftjax"), packed,
                                    packed_variables, overwrite=True)
    packed, packed_variables = packed_layers.load_model(path, vit_lib.vit_tiny())
  return agreement_lib.top1_agreement(jax.jit(lambda x: model.apply(variables, x)),
                                      jax.jit(lambda x: packed.apply(packed_variables, x)),
                                      test["image"])


def run(method: str, seed: int, train, test) -> tuple[float, float, object]:
  """(test top-1, wall seconds, the packed file's agreement) of one training run."""
  model = sj.quantize_model(vit_lib.vit_tiny(), METHODS[method]())
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, FLAGS.learning_rate, FLAGS.steps // 20, FLAGS.steps)
  workdir = (os.path.join(FLAGS.workdir, label(method).replace(" ", "_").replace(",", ""),
                          f"seed{seed}") if FLAGS.workdir else None)
  eval_batches = [{k: v[i:i + 1000] for k, v in test.items()}
                  for i in range(0, len(test["label"]), 1000)]
  init_variables, teacher, distillation = None, None, None
  if FLAGS.from_float and method == "float":  # the control: as many more steps, labels
    init_variables = loop.load_variables(os.path.join(FLAGS.workdir, "float",
                                                      f"seed{seed}"))
  elif FLAGS.from_float:
    model, init_variables = from_float(method, seed, train)
    if FLAGS.distill:
      float_variables = loop.load_variables(os.path.join(FLAGS.workdir, "float",
                                                         f"seed{seed}"))
      teacher = functools.partial(vit_lib.vit_tiny().apply, float_variables)
      distillation = distill_lib.Distillation(weight=FLAGS.distill)
  start = time.time()
  result = loop.fit(model, train, optimizer=optax.adam(schedule), num_steps=FLAGS.steps,
                    batch_size=FLAGS.batch_size, eval_data=eval_batches, workdir=workdir,
                    seed=seed, log_every=max(FLAGS.steps // 10, 1),
                    checkpoint_every=FLAGS.steps, latent_lr_scale=FLAGS.latent_lr_scale,
                    progress_bar=False, init_variables=init_variables,
                    teacher=teacher, distillation=distillation)
  seconds = time.time() - start
  agreement = (None if method == "float"
               else packed_agreement(model, result.model, test, workdir))
  return result.metrics["eval_accuracy"], seconds, agreement


def main(argv):
  del argv
  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; allowed: {list(METHODS)}")
  if FLAGS.distill and not FLAGS.from_float:
    raise app.UsageError("--distill distills from the float runs: it needs --from_float")
  train, test = load_split("train"), load_split("test")
  print(sj.summarize(sj.quantize_model(vit_lib.vit_tiny(), METHODS["DenseShift 3-bit"]()),
                     train["image"][:1]))
  results = {}
  for method in FLAGS.methods:
    for seed in range(FLAGS.seeds):
      top1, seconds, agreement = run(method, seed, train, test)
      results.setdefault(label(method), []).append((top1, seconds, agreement))
      print(f"{method} seed {seed}: top-1 {top1:.4f} in {seconds:.0f} s"
            + (f"; packed file: {agreement}" if agreement else ""), flush=True)
  reference = (statistics.mean(t for t, _, _ in results["float"]) if "float" in results
               else None)
  print(f"\nViT (vit_tiny) on Fashion-MNIST, {FLAGS.steps} steps of batch "
        f"{FLAGS.batch_size}, {FLAGS.seeds} seed(s)\n")
  rows = []
  for method, runs in results.items():
    top1, std = tables.mean_std([t for t, _, _ in runs])
    delta = "" if reference is None or method == "float" else f"{100 * (top1 - reference):+.2f}"
    packed = agreement_lib.total([a for _, _, a in runs if a is not None])
    rows.append((method, f"{100 * top1:.2f} +- {100 * std:.2f}", delta, packed,
                 f"{statistics.mean(s for _, s, _ in runs):.0f}"))
  print(tables.markdown(("method", "test top-1 (mean +- std)", "vs float (points)",
                         "packed file: same top-1", "seconds a run"), rows))


if __name__ == "__main__":
  app.run(main)
