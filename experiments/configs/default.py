"""Every training hyper-parameter, with the S3/DenseShift reference recipe's values.

Other configs import this one and override a few fields. Any field can be overridden on
the command line: ``--config.bits=2 --config.learning_rate=0.05``.

    python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/run
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "resnet20"            # shiftjax.models.MODELS
  c.width_multiplier = 1.0        # CIFAR ResNets only
  c.full_precision_layers = ("stem", "head")  # glob patterns of layer paths kept float
  # Per-layer weight specs (mixed widths): 'pattern=value,...' with value '<bits>' (the
  # quantizer below), '<Method>:<bits>' or 'float'; e.g. 'stage1_*/*=4,stage3_*/*=4'.
  c.layer_quantizers = ""
  # Quantizer: 'float', 'DenseShift', 'S3', 'DeepShiftQ', 'DeepShiftPS'.
  c.quantizer = "DenseShift"
  c.bits = 3
  c.e0 = 0                        # exponent offset: weights are +-2**(e0 + p)
  c.encoding = "chain"            # DenseShift: 'chain' (reference) or 'binary'
  c.surrogate = "sqrt"            # DenseShift backward: 'sqrt' (reference) or 'exact'
  c.init_method = ""              # '' = the method's default (DenseShift, S3: 'low_variance')
  c.rounding = "deterministic"    # DeepShift: or 'stochastic'
  # Activations: the inputs of the quantized layers (shiftjax/activations.py).
  c.activation_bits = 0           # 0 = float activations; PACT: 2..8
  c.activation_quantizer = "PACT"  # 'PACT' (learned clipping range) or 'FixedPoint' (DeepShift)
  c.activation_clip = 6.0         # PACT: initial clipping range alpha
  c.activation_integer_bits = 16  # FixedPoint: integer bits (fraction: activation_bits - these)
  # Per-layer input specs: 'pattern=value,...' with value '<bits>', '<bits>:signed' or
  # 'float'; e.g. 'stem=8:signed,head=8' also quantizes the images and the classifier input.
  c.layer_activations = ""
  c.s3_regularizer = 1e-5         # alpha of S3's dense-weight regularizer (S3 only)
  c.fast_grad = "auto"            # CPU-fast conv and BatchNorm gradients: 'auto', 'on', 'off'
  c.eigen_convs = "auto"          # CPU convs on XLA's Eigen (all cores): 'auto', 'off'
  # Data.
  c.dataset = "cifar10"
  c.data_dir = ""                 # '' = the tfds default (~/tensorflow_datasets)
  c.prepare_offline_data = False  # fashion_mnist: build it from Debian's package first
  c.augment = True                # the dataset's standard training augmentation
  # Speech datasets: SpecAugment's mask counts and widths (frames, mel bins); None = the
  # dataset's own (shiftjax/data/speech.py: 2 x <= 20 frames, 2 x <= 6 bins for synthetic_slu).
  c.spec_augment = ml_collections.ConfigDict({
      "time_masks": ml_collections.config_dict.placeholder(int),
      "max_time": ml_collections.config_dict.placeholder(int),
      "freq_masks": ml_collections.config_dict.placeholder(int),
      "max_freq": ml_collections.config_dict.placeholder(int)})
  c.image_size = ml_collections.config_dict.placeholder(int)  # imagenet2012: crop side
  # Transfer: start a fresh run from a float run's checkpoint (shiftjax/transfer.py).
  c.init_from = ""                # float run's workdir or checkpoint dir; '' = random init
  c.init_from_required = False    # fine-tuning recipes: error out without init_from
  c.init_margin = 1e-3            # converted latents sit this far from their thresholds
  c.init_granularity = "layer"    # scale exponent offset per 'layer' or per 'channel'
  # Distillation (shiftjax/distill.py): also train toward a finished float run's
  # predictions; that run must be of the same model, width and dataset.
  c.distill_from = ""             # the float run's workdir or checkpoint dir; '' = off
  c.distill_weight = 0.5          # share of the soft-target term in the loss, (0, 1]
  c.distill_temperature = 4.0     # T: softmax(logits / T) on both sides
  # Optimization (reference: SGD 0.9, lr 0.1, cosine, 200 epochs, batch 256, wd 1e-4).
  c.optimizer = "sgd"             # 'sgd', 'radam' (DeepShift-PS), 'adam'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on = "all"       # 'all' (latents included, as the recipe), 'kernels',
                                  # 'all_but_latents', 'none'
  c.latent_lr_scale = 1.0         # quantizer latents step at learning_rate * this
  c.label_smoothing = 0.0         # eps: targets (1 - eps) * one_hot + eps / classes
  c.lr_schedule = "cosine"        # or 'constant'
  c.warmup_epochs = 0.0
  c.num_epochs = 200.0
  c.num_train_steps = -1          # > 0 overrides num_epochs
  c.batch_size = 256
  c.eval_batch_size = 500
  c.seed = 0
  # Bookkeeping.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.progress_bar = ml_collections.config_dict.placeholder(bool)  # None: on for a terminal
  c.export_packed = False         # write <workdir>/model.shiftjax (N-bit packed) at the end
  c.distributed = False           # call jax.distributed.initialize() (multi-host)
  return c
