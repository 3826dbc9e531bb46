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

from absl import app

from shiftjax.benchmarking import method_comparison
from shiftjax.data.slu import synthetic

method_comparison.define_flags(
    "slu_accuracy", os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                                 "slu_denseshift3.py"), "Base config (DenseShift 3-bit).")


def prepare_synthetic_slu(base) -> None:
  """Builds synthetic_slu in ``base.data_dir`` unless it is there (minutes)."""
  data_dir = base.data_dir or None
  if base.dataset == "synthetic_slu" and not synthetic.SyntheticSlu(
      data_dir=data_dir).is_prepared():
    print(f"Building synthetic_slu in {data_dir or 'the tfds default data_dir'} ...")
    synthetic.prepare_synthetic_slu(data_dir)


def main(argv):
  del argv
  method_comparison.run_from_flags(
      method_comparison.SLU_METHODS, prepare=prepare_synthetic_slu,
      extra={"packed KiB": lambda s: s["packed_weight_bytes"] / 1024})


if __name__ == "__main__":
  app.run(main)
