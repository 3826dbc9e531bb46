"""Post-training quantization of the trained float byte-level language model.

    python benchmarks/language_model.py --seeds=1 --methods=float --workdir=W
    python benchmarks/ptq_language_model.py --workdir=W

For each float run in ``W/float/seed*`` (``sj.fit``'s checkpoints, read into the NNX
model by ``loop.load_into``) and each width, every calibration of
``shiftjax.ptq.quantize_trained`` converts the model to DenseShift weights (the head
float, as in QAT) from ``--calibration`` training windows; validation bits per byte and
per-byte perplexity on all validation bytes, with the conversion's wall time. QAT rows
are read from ``W/<method>/seed*`` when those runs exist. The model's sizes must be
those of the float run (the defaults are ``benchmarks/language_model.py``'s).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
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


def qat_bits_per_byte(method: str) -> list[float]:
  out = []
  for path in sorted(glob.glob(os.path.join(FLAGS.workdir, method.replace(" ", "_"),
                                            "seed*", "metrics.jsonl"))):
    evals = [l["eval_bits_per_token"] for l in map(json.loads, open(path))
             if "eval_bits_per_token" in l]
    out += evals[-1:]
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
  rows = []
  for seed_dir in sorted(glob.glob(os.path.join(FLAGS.workdir, "float", "seed*"))):
    model = loop.load_into(lm.TransformerLM(config, rngs=nnx.Rngs(0)), seed_dir)
    reference = bits_per_byte(model)
    rows.append(("float", f"{reference:.4f}", f"{2 ** reference:.3f}", "", ""))
    for bits in map(int, FLAGS.bits):
      policy = sj.LayerPolicy(sj.DenseShift(bits), ("head",))
      for name, kwargs in ptq.CALIBRATIONS.items():
        start = time.time()
        quantized = ptq.quantize_trained(model, policy, calibration=calibration, **kwargs)
        seconds = time.time() - start
        bpb = bits_per_byte(quantized)
        rows.append((f"PTQ DenseShift {bits}-bit, {name}", f"{bpb:.4f}", f"{2 ** bpb:.3f}",
                     f"{100 * (2 ** (bpb - reference) - 1):+.1f} %", f"{seconds:.1f}"))
        print(f"{seed_dir} {bits}-bit {name}: {bpb:.4f} ({seconds:.1f} s)", flush=True)
      for bpb in qat_bits_per_byte(f"DenseShift {bits}-bit"):
        rows.append((f"QAT DenseShift {bits}-bit (language_model.py)", f"{bpb:.4f}",
                     f"{2 ** bpb:.3f}", f"{100 * (2 ** (bpb - reference) - 1):+.1f} %",
                     "(training)"))
  if not rows:
    raise app.UsageError(f"no float run in {FLAGS.workdir}/float/seed*")
  print(f"\nPTQ of the float language model, calibration {FLAGS.calibration} windows of "
        f"{FLAGS.seq_len} bytes, validation {len(validation):,} bytes\n")
  print(tables.markdown(("model", "bits/byte", "perplexity/byte", "vs float",
                         "conversion seconds"), rows))


if __name__ == "__main__":
  app.run(main)
