r"""CIFAR-10 ResNet-20/56 recipes: float, DeepShift-Q/PS, S3 and DenseShift.

    python -m experiments.train --config=experiments/configs/cifar10.py:resnet20,denseshift,3 --workdir=workdirs/c10_r20_ds3

Config string ``MODEL,METHOD[,BITS][,runlocal]`` (see ``recipes.py``):
  MODEL   resnet20 | resnet56 (any CIFAR ResNet: resnet8/14/32/44/110 too)
  METHOD  float | deepshift_q | deepshift_ps | s3 | denseshift
  BITS    DeepShift 5 (default), S3 and DenseShift 2 | 3 (default) | 4
The paper grid (``RECIPES``): ResNet-20 and ResNet-56, each float, DeepShift-Q 5-bit,
DeepShift-PS 5-bit, S3 2/3/4-bit, DenseShift 2/3/4-bit.

Recipe (S3/DenseShift reference code, He et al. CIFAR ResNets): 200 epochs, batch 128,
SGD momentum 0.9, lr 0.1, cosine to 0, no warmup, weight decay 1e-4 on every parameter
(latents included), standard augmentation (4-pixel pad + random crop, flip); stem conv
and classifier full precision; S3 adds its dense-weight regularizer (alpha 1e-5).
DeepShift-PS trains with RAdam at lr 0.01 (its own recipe; SGD does not train it from
scratch). Reported numbers to compare with: PAPERS.md sections 1-3.

``runlocal`` (``...:resnet20,s3,3,runlocal``): 3 steps of batch 8 at width 1/4, small
evaluation batches; runs on a laptop CPU (with ``tfds.testing.mock_data`` in tests).
Any field can still be overridden: ``--config.num_epochs=100``.
"""

from experiments.configs import recipes

MODELS = ("resnet20", "resnet56", "resnet8", "resnet14", "resnet32", "resnet44", "resnet110")
DEFAULT = "resnet20,denseshift,3"
RECIPES = tuple(
    f"{model},{method}" for model in ("resnet20", "resnet56")
    for method in ("float", "deepshift_q,5", "deepshift_ps,5", "s3,2", "s3,3", "s3,4",
                   "denseshift,2", "denseshift,3", "denseshift,4"))


def get_config(config_string: str = DEFAULT):
  recipe = recipes.parse(config_string, models=MODELS, allow_finetune=False)
  c = recipes.base_config(recipe)
  c.dataset = "cifar10"
  c.width_multiplier = 1.0
  c.num_epochs = 200.0
  c.batch_size = 128
  c.eval_batch_size = 500       # 10,000 test images in 20 batches
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  if recipe.runlocal:
    recipes.shrink_for_local_run(c)
    c.width_multiplier = 0.25
  return c
