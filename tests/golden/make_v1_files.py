"""Writes the version 1 packed files that tests/deploy/test_format.py loads (run once,
with the shiftjax of commit d07ac99, the last that wrote version 1):

    git worktree add /tmp/shiftjax_v1 d07ac99
    ln -s ../kernels /tmp/shiftjax_v1/shiftjax/kernels   # its own kernels, not the installed
    PYTHONPATH=/tmp/shiftjax_v1 python tests/golden/make_v1_files.py tests/golden

For each model: ``<name>.v1.shiftjax``, the images ``<name>.images.npy`` and the logits
that version's ``packed_apply`` gave, ``<name>.logits.npy``. Small initialized models with
made-up batch statistics: what matters is the file, not the training.
"""

import os
import sys

import jax
import numpy as np

import shiftjax as sj
from shiftjax import export as ex
from shiftjax import models

MODELS = {
    "resnet8_denseshift3": lambda: models.resnet8(num_classes=10, width_multiplier=0.5,
                                                  quantizer=sj.DenseShift(bits=3)),
    "resnet8_s3": lambda: models.resnet8(num_classes=10, width_multiplier=0.5,
                                         quantizer=sj.S3(bits=3)),
}


def main(out_dir):
  assert ex.FORMAT_VERSION == 1, "run with the shiftjax that writes version 1"
  rng = np.random.default_rng(0)
  for name, make in MODELS.items():
    model = make()
    images = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), images)
    stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                         variables["batch_stats"])
    packed = ex.export({"params": variables["params"], "batch_stats": stats}, model)
    packed.save(os.path.join(out_dir, f"{name}.v1.shiftjax"), overwrite=True)
    np.save(os.path.join(out_dir, f"{name}.images.npy"), images)
    np.save(os.path.join(out_dir, f"{name}.logits.npy"),
            np.asarray(ex.packed_apply(packed, images)))


if __name__ == "__main__":
  main(sys.argv[1])
