"""Spoken language understanding: a 3-bit S3 speech ResNet on synthetic_slu.

    python -m experiments.make_synthetic_slu --data_dir=data/tfds
    python -m experiments.train --config=experiments/configs/slu_s3.py --config.data_dir=data/tfds --workdir=workdirs/slu_s3

Everything as ``slu_denseshift3.py`` but with S3 weights (values 0, +-1, +-2, +-4) and
S3's dense-weight regularizer (alpha ``config.s3_regularizer``).
"""

from experiments.configs import slu_denseshift3


def get_config():
  c = slu_denseshift3.get_config()
  c.quantizer = "S3"
  c.bits = 3
  return c
