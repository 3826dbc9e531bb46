"""Writes the version 2 packed files that tests/deploy/test_format.py loads (run once,
with the shiftjax of commit 4b7ef77, the last that wrote version 2):

    git worktree add /tmp/shiftjax_v2 4b7ef77
    ln -s ../kernels /tmp/shiftjax_v2/shiftjax/kernels
    PYTHONPATH=/tmp/shiftjax_v2 python tests/golden/make_v2_files.py tests/golden

The same models, images and statistics as make_v1_files.py (same seed): each file's
logits equal the committed ``<name>.logits.npy`` of version 1 (it checks, and prints the
largest difference: 0.0 when these were written).
"""

import os
import sys
import jax, numpy as np
import shiftjax as sj
from shiftjax import export as ex
from shiftjax import models
from shiftjax.deploy import format as fmt_lib
MODELS = {
    "resnet8_denseshift3": lambda: models.resnet8(num_classes=10, width_multiplier=0.5, quantizer=sj.DenseShift(bits=3)),
    "resnet8_s3": lambda: models.resnet8(num_classes=10, width_multiplier=0.5, quantizer=sj.S3(bits=3)),
}
out_dir = sys.argv[1]
assert fmt_lib.FORMAT_VERSION == 2, fmt_lib.FORMAT_VERSION
rng = np.random.default_rng(0)
for name, make in MODELS.items():
  model = make()
  images = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
  assert np.array_equal(images, np.load(os.path.join(out_dir, f"{name}.images.npy")))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), images)
  stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables["batch_stats"])
  packed = ex.export({"params": variables["params"], "batch_stats": stats}, model)
  packed.save(os.path.join(out_dir, f"{name}.v2.shiftjax"), overwrite=True)
  logits = np.asarray(ex.packed_apply(packed, images))
  diff = np.abs(logits - np.load(os.path.join(out_dir, f"{name}.logits.npy"))).max()
  print(name, diff)
  assert diff <= 1e-6 * np.abs(logits).max()
