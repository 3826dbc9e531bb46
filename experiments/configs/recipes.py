"""Shared parts of the paper recipes (``cifar10.py``, ``imagenet.py``): not a config itself.

A recipe is named by a config string, as in big_vision:
``MODEL,METHOD[,BITS][,finetune][,runlocal]``, for example ``resnet20,denseshift,3``.

METHOD is one of ``float``, ``deepshift_q``, ``deepshift_ps``, ``s3``, ``denseshift``;
BITS defaults to 5 for DeepShift and 3 for S3 and DenseShift (float takes none).
``runlocal`` shrinks the run (batch, steps, width or resolution) so that it finishes in
seconds on a CPU, with ``tfds.testing.mock_data`` or with the real data.
``finetune`` (ImageNet) starts from a float checkpoint: ``--config.init_from=WORKDIR``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.configs import default

# config-string name -> (config.quantizer, default bits)
METHODS = {
    "float": ("float", None),
    "deepshift_q": ("DeepShiftQ", 5),
    "deepshift_ps": ("DeepShiftPS", 5),
    "s3": ("S3", 3),
    "denseshift": ("DenseShift", 3),
}
FLAGS = ("runlocal", "finetune")


@dataclasses.dataclass(frozen=True)
class Recipe:
  model: str
  method: str
  bits: int | None
  runlocal: bool = False
  finetune: bool = False


def parse(config_string: str, *, models: tuple[str, ...], allow_finetune: bool) -> Recipe:
  """``'resnet20,denseshift,3,runlocal'`` -> Recipe; ValueError naming what is wrong."""
  usage = (f"expected MODEL,METHOD[,BITS]{'[,finetune]' if allow_finetune else ''}"
           f"[,runlocal] with MODEL in {models} and METHOD in {tuple(METHODS)}")
  tokens = [t.strip() for t in config_string.split(",") if t.strip()]
  if len(tokens) < 2:
    raise ValueError(f"config string {config_string!r}: {usage}")
  model, method, rest = tokens[0].lower(), tokens[1].lower(), tokens[2:]
  if model not in models:
    raise ValueError(f"config string {config_string!r}: unknown model {model!r}; {usage}")
  if method not in METHODS:
    raise ValueError(f"config string {config_string!r}: unknown method {method!r}; {usage}")
  bits = METHODS[method][1]
  flags = set()
  for token in rest:
    if token.isdigit():
      if method == "float":
        raise ValueError(f"config string {config_string!r}: float takes no bit-width")
      bits = int(token)
    elif token in FLAGS and (token != "finetune" or allow_finetune):
      flags.add(token)
    else:
      raise ValueError(f"config string {config_string!r}: unknown option {token!r}; {usage}")
  if "finetune" in flags and method == "float":
    raise ValueError(f"config string {config_string!r}: finetune converts a float model "
                     "to a shift method; name one (e.g. denseshift,3)")
  return Recipe(model, method, bits, "runlocal" in flags, "finetune" in flags)


def base_config(recipe: Recipe) -> ml_collections.ConfigDict:
  """Every field of ``default.py``, then every recipe-relevant one set explicitly."""
  c = default.get_config()
  c.model = recipe.model
  c.full_precision_layers = ("stem", "head")   # reference: stem conv and classifier float
  c.quantizer = METHODS[recipe.method][0]
  c.bits = recipe.bits if recipe.bits is not None else 3  # unused by float
  c.e0 = 0
  c.encoding = "chain"          # DenseShift reference sign-scale decomposition
  c.surrogate = "sqrt"          # DenseShift reference backward
  # The reference codes' inits: DenseShift low_variance (its default), S3 he (S3's
  # default is low_variance, which trained better at short budgets: README).
  c.init_method = "he" if recipe.method == "s3" else ""
  c.rounding = "deterministic"  # DeepShift
  c.s3_regularizer = 1e-5 if recipe.method == "s3" else 0.0
  c.fast_grad = "auto"
  c.data_dir = ""
  c.prepare_offline_data = False
  c.augment = True              # the dataset's standard training augmentation
  if recipe.method == "deepshift_ps":  # its authors': SGD does not train it from scratch
    c.optimizer = "radam"
    c.learning_rate = 0.01
  else:
    c.optimizer = "sgd"
    c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on = "all"     # latents included, as the reference code
  c.lr_schedule = "cosine"
  c.warmup_epochs = 0.0
  c.num_train_steps = -1
  c.seed = 0
  c.keep_checkpoints = 3
  c.progress_bar = None         # on for a terminal
  c.export_packed = False
  c.distributed = False
  # Initialization from a float checkpoint (shiftjax.transfer; empty: from scratch).
  c.init_from = ""
  c.init_from_required = recipe.finetune
  c.init_margin = 1e-3          # latents this far from their thresholds
  c.init_granularity = "channel"  # per-channel scale exponents absorbed by BatchNorm
  c.recipe = ",".join(
      [recipe.model, recipe.method] + ([str(recipe.bits)] if recipe.bits else [])
      + (["finetune"] if recipe.finetune else []) + (["runlocal"] if recipe.runlocal else []))
  return c


def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """A few steps of tiny batches: checks a recipe end to end, on a CPU, in seconds."""
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 1.0
  c.num_train_steps = 3
  c.warmup_epochs = 0.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 1
  c.progress_bar = False
  # For three steps XLA's own conv gradient compiles faster than the CPU-fast one pays back.
  c.fast_grad = "off"
