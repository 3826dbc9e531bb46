"""Writes the version 3 packed files that tests/deploy/test_format.py loads (run once,
with the shiftjax of commit a5d5f40, the last that wrote version 3):

    git worktree add /tmp/shiftjax_v3 a5d5f40
    PYTHONPATH=/tmp/shiftjax_v3 python tests/golden/make_v3_files.py tests/golden

What version 3 added over 2: each layer's own weight spec (mixed widths) and input spec
(quantized activations with learned ranges). Two small initialized models with made-up
batch statistics and PACT ranges: a CIFAR ResNet-8 at mixed widths, and a speech ResNet
(strided stem, mean-and-max pooling) with S3 and fixed-point inputs. For each:
``<name>.v3.shiftjax``, the images ``<name>.images.npy`` and the logits that version's
``packed_apply`` gave, ``<name>.logits.npy``.
"""

import os
import sys

import jax
import numpy as np

import shiftjax as sj
from shiftjax import export as ex
from shiftjax import models
from shiftjax.policy import LayerPolicy

MODELS = {
    "resnet8_mixed_pact": (lambda: models.resnet8(
        num_classes=10, width_multiplier=0.5, policy=LayerPolicy(
            sj.DenseShift(bits=3), ("stem", "head"),
            layer_quantizers=(("stage1_*", sj.DenseShift(bits=4)),
                              ("stage3_*", sj.DenseShift(bits=2))),
            activation=sj.PACT(bits=4))), (4, 28, 28, 1)),
    "speech_s3_fixed": (lambda: models.speech_resnet(
        num_classes=7, widths=(8, 16, 16), stem_strides=(2, 1), pooling="meanmax",
        policy=LayerPolicy(sj.S3(bits=3), ("stem",), activation=sj.FixedPoint(integer_bits=4, fraction_bits=4))),
        (3, 40, 20, 1)),
}


def main(out_dir):
  assert sj.deploy.FORMAT_VERSION == 3, "run with the shiftjax that writes version 3"
  rng = np.random.default_rng(3)
  for name, (make, shape) in MODELS.items():
    model = make()
    images = rng.standard_normal(shape).astype(np.float32)
    variables = jax.device_get(jax.jit(lambda k, x: model.init(k, x, train=False))(
        jax.random.key(0), images))
    stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                         variables["batch_stats"])
    params = jax.tree_util.tree_map_with_path(  # PACT ranges away from their init
        lambda p, a: (rng.uniform(2.0, 6.0, a.shape).astype(np.float32)
                      if "activation" in jax.tree_util.keystr(p) else a),
        variables["params"])
    packed = ex.export({"params": params, "batch_stats": stats}, model)
    packed.save(os.path.join(out_dir, f"{name}.v3.shiftjax"), overwrite=True)
    np.save(os.path.join(out_dir, f"{name}.images.npy"), images)
    np.save(os.path.join(out_dir, f"{name}.logits.npy"),
            np.asarray(sj.deploy.packed_apply(packed, images)))
    print(name, packed.size_report()["file_bytes"] if "file_bytes" in packed.size_report()
          else "", [(l.name, l.quantizer, l.activation) for l in packed.layers][:4])


if __name__ == "__main__":
  main(sys.argv[1])
