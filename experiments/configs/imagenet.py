r"""ImageNet ResNet-18/50 recipes: float, S3 3-bit, DenseShift 2/3/4-bit, fine-tuning.

    python -m experiments.train --config=experiments/configs/imagenet.py:resnet18,denseshift,3 --config.data_dir=DATA --workdir=workdirs/in_r18_ds3

Fine-tuning a float run (its workdir, its checkpoints dir or one step's dir):

    python -m experiments.train --config=experiments/configs/imagenet.py:resnet18,denseshift,3,finetune --config.init_from=workdirs/in_r18_float --config.data_dir=DATA --workdir=workdirs/in_r18_ds3_ft

Config string ``MODEL,METHOD[,BITS][,finetune][,runlocal]`` (see ``recipes.py``):
  MODEL   resnet18 | resnet50 (resnet34 too)
  METHOD  float | s3 | denseshift (deepshift_q | deepshift_ps also parse)
  BITS    S3 3 (default; 2, 4 extend the method), DenseShift 2 | 3 (default) | 4
The paper grid (``RECIPES``): ResNet-18 and ResNet-50, each float, S3 3-bit, DenseShift
2/3/4-bit, and DenseShift 3-bit fine-tuned from the float run.

Recipe (S3/DenseShift reference code): 200 epochs, batch 256, SGD momentum 0.9, lr 0.1,
cosine to 0, no warmup, weight decay 1e-4 on every parameter (latents included); random-
resized-crop 224 + flip for training, resize 256 + center crop 224 for evaluation
(``shiftjax.data.imagenet``); stem conv and classifier full precision; S3 adds its
dense-weight regularizer (alpha 1e-5). Reported: PAPERS.md (S3 ResNet-18 69.83, ResNet-50
75.75; DenseShift ResNet-18 2/3/4-bit 68.90/70.62/70.94, UNVERIFIED).

``finetune`` (our choice, not from a paper; DeepShift fine-tuned for 15 epochs): the
shift model starts from the float checkpoint given by ``--config.init_from``
(``shiftjax.transfer``: nearest powers of two with per-channel scales folded into
BatchNorm, latents 1e-3 from their thresholds), then 15 epochs at lr 0.01, cosine, same
optimizer, batch and weight decay. Without ``init_from`` the run stops with an error.

Data: tfds ``imagenet2012`` prepared as array_record (see ``shiftjax/data/imagenet.py``
for the manual download and ``tfds build``). ``runlocal``: 3 steps of batch 8 at 64x64
(``image_size``), for a CPU with ``tfds.testing.mock_data``.
"""

from experiments.configs import recipes

MODELS = ("resnet18", "resnet50", "resnet34")
DEFAULT = "resnet18,denseshift,3"
RECIPES = tuple(
    f"{model},{method}" for model in ("resnet18", "resnet50")
    for method in ("float", "s3,3", "denseshift,2", "denseshift,3", "denseshift,4",
                   "denseshift,3,finetune"))


def get_config(config_string: str = DEFAULT):
  recipe = recipes.parse(config_string, models=MODELS, allow_finetune=True)
  c = recipes.base_config(recipe)
  c.dataset = "imagenet2012"
  c.image_size = 224            # training crop and evaluation center crop
  c.width_multiplier = 1.0      # unused by the ImageNet ResNets
  c.batch_size = 256
  c.eval_batch_size = 500       # 50,000 validation images in 100 batches
  c.num_epochs = 200.0
  if recipe.finetune:
    c.learning_rate = 0.01 if recipe.method != "deepshift_ps" else 0.001
    c.num_epochs = 15.0
  c.log_every_steps = 500
  c.checkpoint_every_steps = 5000
  if recipe.runlocal:
    recipes.shrink_for_local_run(c)
    c.image_size = 64
  return c
