"""How often each weight magnitude occurs in a trained run's quantized layers.

    python benchmarks/weight_values.py --config=experiments/configs/slu_s3.py --config.data_dir=data/tfds --workdir=workdirs/slu_s3 [--workdir=...]

Restores each run's latest checkpoint (``--config`` is the runs' config, as for
``experiments/evaluate.py``) and prints, over all its quantized kernels, the fraction of
weights at each magnitude |w| (0 for S3's pruned weights) and the zero fraction. Reads
the checkpoints only; trains and writes nothing.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from shiftjax import train
from shiftjax.benchmarking import weight_values

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "A training run's workdir (repeat for several).",
                          required=True)
config_flags.DEFINE_config_file("config", None, "The runs' config.", lock_config=True)
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  quantizers = train.layer_quantizers(train.layer_plan(FLAGS.config))
  for workdir in FLAGS.workdir:
    _, variables, step = train.restore_variables(FLAGS.config, workdir)
    fractions = weight_values.magnitude_fractions(variables["params"], quantizers)
    shares = ", ".join(f"|w|={v:g}: {f:.4f}" for v, f in fractions.items())
    print(f"{workdir} (step {step}): zero fraction {fractions.get(0.0, 0.0):.4f}; {shares}")


if __name__ == "__main__":
  app.run(main)
