"""A float byte-level transformer LM (NNX) shift-quantized by rules, trained on the KJV Bible.

    python benchmarks/language_model.py --seeds=3 --steps=1500

For each method and seed: ``shiftjax.models.TransformerLM`` (a plain float NNX model)
goes through ``sj.quantize_model`` with the method's policy (the embedding is a lookup,
not a matmul; the output head stays float), ``sj.fit`` trains it with adam (warmup +
cosine) on random windows of the first 95 % of the corpus, and validation bits per
byte and per-byte perplexity (``2 ** bpb``) are measured on every byte of the last 5 %.
Prints a markdown table: mean +- std over seeds, the change against float (perplexity
in %), and the wall time of a run. Corpus: Debian's ``bible-kjv-text``
(``shiftjax.data.text``).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

from absl import app
from absl import flags
import optax
from flax import nnx

import shiftjax as sj
from shiftjax import fit as fit_lib
from shiftjax.data import text
from shiftjax.models import language_model as lm

FLOAT_LAYERS = ("head",)
ATTENTION = "blocks/*/attention/*"
# Largest magnitude 1/4 (1/8 at 2 bits): no norm follows these matmuls to absorb a scale,
# and He's std for fan-ins of 192-768 is 2**-3..2**-4.
SPECS = {"DenseShift 3-bit": sj.DenseShift(3, e0=-5), "S3 3-bit": sj.S3(3, e0=-4),
         "DenseShift 2-bit": sj.DenseShift(2, e0=-4), "DenseShift 4-bit": sj.DenseShift(4, e0=-9)}
METHODS = {
    "float": lambda: sj.LayerPolicy(None),
    **{name: (lambda spec=spec: sj.LayerPolicy(spec, FLOAT_LAYERS)) for name, spec in SPECS.items()},
    "DenseShift 3-bit, attention float": lambda: sj.LayerPolicy(
        SPECS["DenseShift 3-bit"], FLOAT_LAYERS + (ATTENTION,)),
}
DEFAULT_METHODS = ("float", "DenseShift 3-bit", "S3 3-bit", "DenseShift 2-bit")

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"Any of {list(METHODS)}.")
flags.DEFINE_integer("seeds", 3, "Seeds per method (0, 1, ...).")
flags.DEFINE_integer("steps", 1500, "Optimizer steps per run.")
flags.DEFINE_integer("batch_size", 16, "Windows per step.")
flags.DEFINE_integer("d_model", 128, "Token width (sized for a 2-core CPU).")
flags.DEFINE_integer("num_layers", 4, "Transformer blocks.")
flags.DEFINE_integer("mlp_dim", 512, "Hidden width of each block's MLP.")
flags.DEFINE_integer("seq_len", 128, "Bytes per window.")
flags.DEFINE_float("learning_rate", 2e-3, "Adam's peak learning rate.")
flags.DEFINE_float("latent_lr_scale", 1.0, "Multiplies the quantizer latents' updates.")
flags.DEFINE_integer("eval_bytes", 0, "Evaluate on the first this many validation bytes "
                     "(0: all of them).")
flags.DEFINE_string("workdir", None, "Keep each run's checkpoints, metrics and packed "
                    "model here (<workdir>/<method>/seed<k>).")


def model_config() -> lm.LMConfig:
  return lm.LMConfig(context_length=FLAGS.seq_len, d_model=FLAGS.d_model,
                     num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim)


def run(method: str, seed: int, train, validation) -> tuple[float, float]:
  """(validation bits per byte, wall seconds) of one training run."""
  model = sj.quantize_model(lm.TransformerLM(model_config(), rngs=nnx.Rngs(seed)),
                            METHODS[method](), rngs=nnx.Rngs(seed + 1000))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, FLAGS.learning_rate, FLAGS.steps // 20, FLAGS.steps)
  workdir = (os.path.join(FLAGS.workdir, method.replace(" ", "_").replace(",", ""),
                          f"seed{seed}") if FLAGS.workdir else None)

  def batches(start):
    windows = text.random_windows(train, FLAGS.batch_size, FLAGS.seq_len, seed=seed)
    return itertools.islice(windows, start, None)

  start = time.time()
  result = fit_lib.fit(model, batches, task=fit_lib.next_token(),
                       optimizer=optax.adam(schedule), num_steps=FLAGS.steps,
                       eval_data=lambda: text.sequential_windows(validation, 64, FLAGS.seq_len),
                       workdir=workdir, seed=seed, log_every=max(FLAGS.steps // 10, 1),
                       checkpoint_every=FLAGS.steps, latent_lr_scale=FLAGS.latent_lr_scale,
                       progress_bar=False)
  if workdir and method != "float":
    from shiftjax.deploy import packed_layers  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, "model.shiftjax")
    if not os.path.exists(path):
      packed_layers.save_model(path, sj.deploy.pack_model(result.model),
                               metadata={"method": method, "seed": seed})
  return result.metrics["eval_bits_per_token"], time.time() - start


def main(argv):
  del argv
  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; allowed: {list(METHODS)}")
  train, validation = text.split(text.load_corpus())
  if FLAGS.eval_bytes:
    validation = validation[:FLAGS.eval_bytes]
  example = lm.TransformerLM(model_config(), rngs=nnx.Rngs(0))
  print(sj.summarize(sj.quantize_model(example, METHODS["DenseShift 3-bit"]()),
                     train[None, :FLAGS.seq_len].astype("int32")))
  results = {}
  for method in FLAGS.methods:
    for seed in range(FLAGS.seeds):
      bpb, seconds = run(method, seed, train, validation)
      results.setdefault(method, []).append((bpb, seconds))
      print(f"{method} seed {seed}: {bpb:.4f} bits/byte in {seconds:.0f} s", flush=True)
  reference = (statistics.mean(2 ** b for b, _ in results["float"]) if "float" in results
               else None)
  print(f"\nTransformerLM on the KJV Bible (bytes), {FLAGS.steps} steps of "
        f"{FLAGS.batch_size} x {FLAGS.seq_len} bytes, {FLAGS.seeds} seed(s), validation "
        f"{len(validation):,} bytes\n")
  print("| method | bits/byte (mean +- std) | perplexity/byte | vs float | seconds a run |")
  print("|---|---|---|---|---|")
  for method, runs in results.items():
    bpbs = [b for b, _ in runs]
    ppl = statistics.mean(2 ** b for b in bpbs)
    std = statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0
    delta = ("" if reference is None or method == "float"
             else f"{100 * (ppl / reference - 1):+.1f} %")
    print(f"| {method} | {statistics.mean(bpbs):.4f} +- {std:.4f} | {ppl:.3f} | {delta} | "
          f"{statistics.mean(s for _, s in runs):.0f} |")


if __name__ == "__main__":
  app.run(main)
