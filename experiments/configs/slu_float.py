"""Spoken language understanding: the float speech ResNet on synthetic_slu (baseline).

    python -m experiments.make_synthetic_slu --data_dir=data/tfds
    python -m experiments.train --config=experiments/configs/slu_float.py --config.data_dir=data/tfds --workdir=workdirs/slu_float

Everything as ``slu_denseshift3.py`` but with float weights.
"""

from experiments.configs import slu_denseshift3


def get_config():
  c = slu_denseshift3.get_config()
  c.quantizer = "float"
  return c
