"""Post-training quantization of the trained float byte-level language model.

    python benchmarks/language_model.py --seeds=1 --methods=float --workdir=W
    python benchmarks/ptq_language_model.py --workdir=W

For each float run in ``W/float/seed*`` (``sj.fit``'s checkpoints, read into the NNX
model by ``loop.load_into``) and each width, every calibration of
``shiftjax.ptq.quantize_trained`` converts the model to DenseShift weights (the head
float, as in QAT) from ``--calibration`` training windows; validation bits per byte and
per-byte perplexity on all validation bytes, with the conversion's wall time; each row
is the mean over the float runs (perplexity against each run's own float model). QAT
rows (from scratch, and from the PTQ model: ``language_model.py --from_float``) are read
from ``W/<method>/seed*`` when those runs exist. The model's sizes must be those of the
float run (the defaults are ``benchmarks/language_model.py``'s).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import statistics
import time

from absl import app
from absl import flags
from flax import nnx

import shiftjax as sj
from shiftjax import loop
from shiftjax import ptq
from shiftjax.benchmarking import tables
from shiftjax.data import text
from shiftjax.models import language_model as lm

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "benchmarks/language_model.py's --workdir.")
flags.DEFINE_list("bits", ["3", "4"], "DenseShift widths.")
flags.DEFINE_integer("calibration", 64, "Training windows the calibration sees.")
flags.DEFINE_integer("seq_len", 256, "Bytes per window (as the float run trained).")
flags.DEFINE_integer("d_model", 128, "Token width of the float run.")
flags.DEFINE_integer("num_layers", 4, "Blocks of the float run.")
flags.DEFINE_integer("mlp_dim", 512, "MLP width of the float run.")
PROMPT_POSITIONS = 32  # as benchmarks/language_model.py's model


def qat_bits_per_byte(run_name: str) -> dict[str, float]:
  """``{seed directory name: final validation bits per byte}`` of the QAT runs."""
  out = {}
  for path in sorted(glob.glob(os.path.join(FLAGS.workdir, run_name, "seed*",
                                            "metrics.jsonl"))):
    evals = [l["eval_bits_per_token"] for l in map(json.loads, open(path))
             if "eval_bits_per_token" in l]
    if evals:
      out[os.path.basename(os.path.dirname(path))] = evals[-1]
  return out


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir names benchmarks/language_model.py's workdir")
  train, validation = text.split(text.load_corpus())
  windows = text.random_windows(train, 8, FLAGS.seq_len, seed=123)
  calibration = [(b["inputs"],) for b in itertools.islice(windows, FLAGS.calibration // 8)]
  config = lm.LMConfig(context_length=FLAGS.seq_len + PROMPT_POSITIONS, d_model=FLAGS.d_model,
                       num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim)

  def bits_per_byte(model) -> float:
    return lm.evaluate_bits_per_byte(model, text.sequential_windows(validation, 64,
                                                                    FLAGS.seq_len))
  rows: dict[str, list[tuple[float, float, float]]] = {}  # name: (bpb, float bpb, s)
  references = {}
  for seed_dir in sorted(glob.glob(os.path.join(FLAGS.workdir, "float", "seed*"))):
    model = loop.load_into(lm.TransformerLM(config, rngs=nnx.Rngs(0)), seed_dir)
    reference = references[os.path.basename(seed_dir)] = bits_per_byte(model)
    rows.setdefault("float", []).append((reference, reference, 0.0))
    for bits in map(int, FLAGS.bits):
      policy = sj.LayerPolicy(sj.DenseShift(bits), ("head",))
      for name, kwargs in ptq.CALIBRATIONS.items():
        start = time.time()
        quantized = ptq.quantize_trained(model, policy, calibration=calibration, **kwargs)
        seconds = time.time() - start
        bpb = bits_per_byte(quantized)
        rows.setdefault(f"PTQ DenseShift {bits}-bit, {name}", []).append(
            (bpb, reference, seconds))
        print(f"{seed_dir} {bits}-bit {name}: {bpb:.4f} ({seconds:.1f} s)", flush=True)
  if not references:
    raise app.UsageError(f"no float run in {FLAGS.workdir}/float/seed*")
  runs = [("float_from_float", "float trained on as long from the float run (the control "
                                 "of QAT from the PTQ model)")]
  for bits in map(int, FLAGS.bits):
    runs += [(f"DenseShift_{bits}-bit", f"QAT DenseShift {bits}-bit from scratch"),
             (f"DenseShift_{bits}-bit_from_float_latent_lr_x0.1",
              f"QAT DenseShift {bits}-bit from the PTQ model, latent lr x0.1")]
  for run_name, label in runs:
    for seed, bpb in qat_bits_per_byte(run_name).items():
      if seed in references:
        rows.setdefault(label, []).append((bpb, references[seed], float("nan")))
  print(f"\nPTQ of the float language model ({len(references)} run(s)), calibration "
        f"{FLAGS.calibration} windows of {FLAGS.seq_len} bytes, validation "
        f"{len(validation):,} bytes\n")
  table = []
  for name, values in rows.items():
    bpb = statistics.mean(b for b, _, _ in values)
    change = statistics.mean(2 ** (b - r) - 1 for b, r, _ in values)
    seconds = statistics.mean(s for _, _, s in values)
    table.append((f"{name} ({len(values)} run(s))" if name != "float" else name,
                  f"{bpb:.4f}", f"{statistics.mean(2 ** b for b, _, _ in values):.3f}",
                  "" if name == "float" else f"{100 * change:+.1f} %",
                  "(training)" if seconds != seconds else
                  ("" if name == "float" else f"{seconds:.1f}")))
  print(tables.markdown(("model", "bits/byte", "perplexity/byte", "vs float",
                         "conversion seconds"), table))


if __name__ == "__main__":
  app.run(main)
