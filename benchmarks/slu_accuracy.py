"""Float vs DenseShift 3-bit vs S3 3-bit on synthetic_slu (unseen test voices).

Trains the speech ResNet of ``experiments/configs/slu_denseshift3.py`` once per method
and seed, changing only the quantizer (and the seed; "DenseShift 3-bit distilled" also
learns from the same seed's float run), and prints the test accuracies
(2,400 utterances spoken by voices never heard in training): each seed's, their mean and
standard deviation, and the gap to float with its standard error:

    python benchmarks/slu_accuracy.py --config.data_dir=data/tfds [--seeds=3] [--methods=float,"S3 3-bit"] [--workdir=/tmp/slu_accuracy]

Builds ``synthetic_slu`` in ``--config.data_dir`` first if it is not there (needs
espeak-ng and flite; minutes). Runs one after the other (never two trainings at once on a
small machine); each run resumes from its own workdir if interrupted. Extra
``--config.*`` flags apply to all.
"""

import os
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from shiftjax import host_memory
from shiftjax.benchmarking import method_comparison
from shiftjax.data.slu import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "slu_accuracy"),
                    "Parent directory; one subdirectory per method and seed.")
flags.DEFINE_integer("seeds", 1, "Seeds 0 .. N-1 of every method.", lower_bound=1)
flags.DEFINE_list("methods", None, "A subset of the methods (default: all).")
flags.DEFINE_string("reference", "float", "The method every gap is measured against "
                    "(trained too when --methods leaves it out).")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                           "slu_denseshift3.py"), "Base config (DenseShift 3-bit).")


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  logging.set_verbosity(logging.WARNING)
  try:
    methods = method_comparison.select_methods(
        FLAGS.methods, method_comparison.SLU_METHODS, method_comparison.VARIANTS,
        reference=FLAGS.reference)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  base = FLAGS.config
  data_dir = base.data_dir or None
  if base.dataset == "synthetic_slu" and not synthetic.SyntheticSlu(
      data_dir=data_dir).is_prepared():
    print(f"Building synthetic_slu in {data_dir or 'the tfds default data_dir'} ...")
    synthetic.prepare_synthetic_slu(data_dir)
  summaries = method_comparison.train_each(base, methods, FLAGS.workdir, range(FLAGS.seeds))
  print(f"\n{base.dataset}, {base.model} (width x{base.width_multiplier}), "
        f"{base.num_epochs:g} epochs, batch {base.batch_size}, augment={base.augment}, "
        f"seeds 0..{FLAGS.seeds - 1}")
  method_comparison.print_table(
      summaries, FLAGS.reference, {"packed KiB": lambda s: s["packed_weight_bytes"] / 1024})

if __name__ == "__main__":
  app.run(main)
