"""Builds ``synthetic_slu``: FSC's 31 intents spoken by espeak-ng and flite voices.

    apt-get install -y espeak-ng flite
    python -m experiments.make_synthetic_slu --data_dir=DIR

writes the tfds dataset ``DIR/synthetic_slu/1.0.0`` (array_record, 583 MB; 5 minutes of
CPU, up to 15 on a busy 2-core machine, for the default 12,000 / 1,200 / 2,400 train /
valid / test utterances). The test and valid voices are never heard in training; see
``shiftjax/data/slu/synthetic.py``.
Rerunning with the same flags does nothing; other flags need another ``--data_dir``.
"""

from absl import app
from absl import flags

from shiftjax.data.slu import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds's, "
                    "~/tensorflow_datasets).")
flags.DEFINE_integer("seed", 0, "Seed of the voices' split, the plan and the noise.")
flags.DEFINE_integer("num_train", synthetic.DEFAULT_SIZES["train"], "Train utterances.")
flags.DEFINE_integer("num_valid", synthetic.DEFAULT_SIZES["valid"], "Valid utterances.")
flags.DEFINE_integer("num_test", synthetic.DEFAULT_SIZES["test"], "Test utterances.")
flags.DEFINE_enum("flite", "auto", ["auto", "yes", "no"],
                  "Use flite's voices too (auto: when flite is installed).")
flags.DEFINE_integer("workers", None, "Parallel synthesizer processes (default: cores).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  use_flite = {"auto": None, "yes": True, "no": False}[FLAGS.flite]
  sizes = {"train": FLAGS.num_train, "valid": FLAGS.num_valid, "test": FLAGS.num_test}
  path = synthetic.prepare_synthetic_slu(FLAGS.data_dir, seed=FLAGS.seed, sizes=sizes,
                                         use_flite=use_flite, workers=FLAGS.workers)
  print(f"synthetic_slu is in {path}")


if __name__ == "__main__":
  app.run(main)
