"""The launcher's library: a config's ResNet, data and optimizer, trained by ``sj.fit``.

``train_and_evaluate(config, workdir)`` is everything a launcher or notebook calls:
it validates the config before compiling anything, builds the model, data, optimizer
and task the config names, and hands them to ``shiftjax.loop.fit``, the loop every model
trains with (orbax checkpoints that resume bit for bit, batches sharded over all
devices, JSON lines, TensorBoard, a progress display). Its log hook adds the learning
rate and the fraction of codes that changed; then it evaluates on the full test split
and writes ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from shiftjax import activations as act_lib
from shiftjax import codes as codes_lib
from shiftjax.kernels.training import conv
from shiftjax import data as data_lib
from shiftjax import distill
from shiftjax import deploy as deploy_lib
from shiftjax import export as export_lib
from shiftjax import interception
from shiftjax import host_memory
from shiftjax import layers
from shiftjax import metrics as metrics_lib
from shiftjax import loop
from shiftjax import models
from shiftjax.optim import latent_mask, scale_latent_updates, weight_decay_mask  # pylint: disable=unused-import
from shiftjax import policy as policy_lib
from shiftjax import quantizers as qz
from shiftjax import summary as summary_lib
from shiftjax import transfer

SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = loop.CHECKPOINT_DIR
OPTIMIZERS = ("sgd", "radam", "adam")
SCHEDULES = ("cosine", "constant")
FAST_GRAD = {"auto": None, "on": True, "off": False}
EIGEN_CONVS = ("auto", "off")
WEIGHT_DECAY_ON = ("all", "kernels", "all_but_latents", "none")


def say(message: str) -> None:
  """Progress for the person at the terminal (process 0 only).

  Plain print: absl's INFO level would also bring every orbax message.
  """
  if jax.process_index() == 0:
    print(message, flush=True)


NonFiniteLossError = loop.NonFiniteLossError


# ----------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field before any data is read or code compiled."""
  if config.model not in models.MODELS:
    raise ValueError(f"config.model: unknown model {config.model!r}; "
                     f"allowed: {sorted(models.MODELS)}")
  data_lib.get_spec(config.dataset)
  layer_plan(config)  # every quantizer and policy rule, checked against the layers
  for field, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                         ("fast_grad", tuple(FAST_GRAD)),
                         ("weight_decay_on", WEIGHT_DECAY_ON)):
    if config[field] not in allowed:
      raise ValueError(f"config.{field} must be one of {allowed}, got {config[field]!r}")
  if config.get("eigen_convs", "auto") not in EIGEN_CONVS:
    raise ValueError(f"config.eigen_convs must be one of {EIGEN_CONVS}, got "
                     f"{config.eigen_convs!r}")
  for field in ("batch_size", "eval_batch_size", "log_every_steps",
                "checkpoint_every_steps"):
    if not isinstance(config[field], int) or config[field] <= 0:
      raise ValueError(f"config.{field} must be a positive integer, got {config[field]!r}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs > 0 or config.num_train_steps > 0, got "
                     f"{config.num_epochs} and {config.num_train_steps}")
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be positive, got {config.learning_rate}")
  if config.get("latent_lr_scale", 1.0) <= 0:
    raise ValueError(f"config.latent_lr_scale must be positive, got {config.latent_lr_scale}")
  if not 0.0 <= config.get("label_smoothing", 0.0) < 1.0:
    raise ValueError("config.label_smoothing must be in [0, 1), got "
                     f"{config.label_smoothing}")
  training_augmentation(config)
  distillation(config)
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ValueError(f"config.{field}={config[field]} is not divisible by the "
                       f"{devices} devices of this run")


def training_augmentation(config) -> bool | data_lib.SpecAugment:
  """``config.augment``, or the speech dataset's SpecAugment with the mask sizes that
  ``config.spec_augment`` sets; ValueError for sizes the dataset cannot take."""
  sizes = {k: v for k, v in config.get("spec_augment", {}).items() if v is not None}
  if not sizes:
    return config.augment
  spec = data_lib.get_spec(config.dataset)
  if not isinstance(spec.augment, data_lib.SpecAugment):
    raise ValueError(f"config.spec_augment sets {sizes}, but {config.dataset} is not a "
                     f"speech dataset; only these take SpecAugment: "
                     f"{sorted(data_lib.speech.SPECS)}")
  if not config.augment:
    raise ValueError(f"config.spec_augment sets {sizes} with config.augment=False; "
                     "set config.augment=True to augment")
  for field, value in sizes.items():
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"config.spec_augment.{field} must be a non-negative integer, "
                       f"got {value!r}")
  return dataclasses.replace(spec.augment, **sizes)


def distillation(config) -> distill.Distillation | None:
  """``config``'s distillation settings, None when ``config.distill_from`` is empty."""
  if not config.get("distill_from", ""):
    return None
  try:
    return distill.Distillation(config.distill_weight, config.distill_temperature)
  except ValueError as e:  # "weight must be ..." -> "config.distill_weight must be ..."
    raise ValueError(f"config.distill_{e}") from None


def teacher_config(config) -> ml_collections.ConfigDict:
  """``config``'s model in float, the architecture a distilled run's teacher has."""
  teacher = config.copy_and_resolve_references()
  teacher.unlock()
  teacher.update(quantizer="float", layer_quantizers="", activation_bits=0,
                 layer_activations="")
  return teacher


def load_teacher(config, image_shape) -> tuple[nn.Module, dict]:
  """The float teacher's model and variables (host arrays) from ``config.distill_from``."""
  model = create_model(teacher_config(config), data_lib.get_spec(config.dataset).num_classes)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, *image_shape), jnp.float32))
  return model, distill.load_teacher(config.distill_from, shapes)


def create_quantizer(config, method: str | None = None,
                     bits: int | None = None) -> qz.Quantizer | None:
  """The spec named by ``config.quantizer`` (or ``method``) at ``config.bits`` (or
  ``bits``), with the options that spec has."""
  options = {"bits": config.bits if bits is None else bits, "e0": config.e0,
             "encoding": config.encoding, "surrogate": config.surrogate,
             "init_method": config.init_method, "rounding": config.rounding}
  name = config.quantizer if method is None else method
  if name.lower() in ("float", "none", ""):
    return None
  cls = {k.lower(): v for k, v in qz.QUANTIZERS.items()}.get(name.lower())
  if cls is None:
    raise ValueError(f"config.quantizer: unknown quantizer {name!r}; "
                     f"allowed: {['float'] + list(qz.QUANTIZERS)}")
  fields = {f.name for f in dataclasses.fields(cls)}
  # Empty strings mean "the spec's default" (init defaults differ between methods).
  kwargs = {k: v for k, v in options.items() if k in fields and v != ""}
  return cls(**kwargs)


def _rule_error(field: str, pattern: str, value: str, problem: str) -> ValueError:
  return policy_lib.PolicyError(f"config.{field} entry '{pattern}={value}': {problem}")


def _weight_rule(config, pattern: str, value: str) -> qz.Quantizer | None:
  """``'float'``, ``'<bits>'`` (config.quantizer's method) or ``'<Method>:<bits>'``."""
  if value.lower() == "float":
    return None
  method, _, bits = value.rpartition(":") if ":" in value else (None, "", value)
  if not bits.isdigit():
    raise _rule_error("layer_quantizers", pattern, value,
                      "the value must be 'float', '<bits>' or '<Method>:<bits>' "
                      "(e.g. 'DenseShift:4')")
  if method is None and create_quantizer(config) is None:
    raise _rule_error("layer_quantizers", pattern, value,
                      "config.quantizer is float, so name the method ('DenseShift:4')")
  try:
    return create_quantizer(config, method, int(bits))
  except ValueError as e:
    raise _rule_error("layer_quantizers", pattern, value, str(e)) from None


def create_activation(config, bits: int | None = None, signed: bool = False,
                      field: str = "activation_bits"):
  """The activation spec of ``config.activation_quantizer`` at ``bits`` (default
  ``config.activation_bits``; 0: None, float activations)."""
  bits = config.activation_bits if bits is None else bits
  if not isinstance(bits, int) or isinstance(bits, bool) or bits < 0:
    raise ValueError(f"config.{field} must be 0 (float) or a number of bits, got {bits!r}")
  if bits == 0:
    return None
  name = config.get("activation_quantizer", "PACT")
  if name not in act_lib.ACTIVATION_QUANTIZERS:
    raise ValueError(f"config.activation_quantizer must be one of "
                     f"{list(act_lib.ACTIVATION_QUANTIZERS)}, got {name!r}")
  try:
    if name == "FixedPoint":
      integer_bits = config.get("activation_integer_bits", 16)
      return act_lib.FixedPoint(integer_bits, bits - integer_bits)
    return act_lib.PACT(bits, init_clip=float(config.get("activation_clip", 6.0)),
                        signed=signed)
  except ValueError as e:
    raise ValueError(f"config.{field}={bits}: {e}") from None


def _activation_rule(config, pattern: str, value: str):
  """``'float'``, ``'<bits>'`` or ``'<bits>:signed'`` (PACT over [-clip, clip])."""
  if value.lower() == "float":
    return None
  bits, _, how = value.partition(":")
  if not bits.isdigit() or how not in ("", "signed") or int(bits) == 0:
    raise _rule_error("layer_activations", pattern, value,
                      "the value must be 'float', '<bits>' or '<bits>:signed'")
  try:
    return create_activation(config, int(bits), signed=how == "signed",
                             field="layer_activations")
  except ValueError as e:
    raise _rule_error("layer_activations", pattern, value, str(e)) from None


def create_policy(config) -> layers.LayerPolicy:
  """The layer policy of ``config``: its quantizer, full-precision layers, per-layer
  weight specs (``config.layer_quantizers``) and activation quantizers."""
  weight_rules = tuple(
      (p, _weight_rule(config, p, v))
      for p, v in policy_lib.parse_rules("config.layer_quantizers",
                                         config.get("layer_quantizers", "")))
  act_rules = tuple(
      (p, _activation_rule(config, p, v))
      for p, v in policy_lib.parse_rules("config.layer_activations",
                                         config.get("layer_activations", "")))
  activation = create_activation(config) if config.get("activation_bits", 0) else None
  return layers.LayerPolicy(create_quantizer(config), tuple(config.full_precision_layers),
                            weight_rules, activation, act_rules)


def layer_plan(config, model: nn.Module | None = None
               ) -> dict[str, interception.LayerRecord]:
  """``{layer path: LayerRecord}`` of every quantizable layer of ``config``'s model, with
  its weight and input specs: one traced call, nothing compiled. PolicyError when a rule
  of the policy matches no layer or gives a layer two specs."""
  spec = data_lib.get_spec(config.dataset)
  model = model or create_model(config, spec.num_classes)
  x = jax.ShapeDtypeStruct((1, *spec.image_shape), jnp.float32)
  with interception.record_calls() as record:
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    record.layers.clear()
    jax.eval_shape(functools.partial(model.apply, train=False), abstract, x)
  return record.layers


def layer_quantizers(plan: Mapping[str, interception.LayerRecord]
                     ) -> dict[str, qz.Quantizer]:
  """``{layer path: weight spec}`` of the quantized layers of a ``layer_plan``."""
  return {path: r.weight_spec for path, r in plan.items() if r.weight_spec is not None}


def describe_policy(config) -> str:
  """One line: the quantizer, and the per-layer and activation rules when there are."""
  parts = [config.quantizer if config.quantizer.lower() != "float" else "float"]
  if parts[0] != "float":
    parts[0] += f" {config.bits}-bit"
  if config.get("layer_quantizers"):
    parts.append(f"layers {config.layer_quantizers}")
  if config.get("activation_bits"):
    parts.append(f"{config.activation_bits}-bit {config.activation_quantizer} activations")
  if config.get("layer_activations"):
    parts.append(f"activations {config.layer_activations}")
  return ", ".join(parts)


def step_compiler_options(config) -> dict[str, str]:
  """Compiler options of the jitted train and eval steps (``config.eigen_convs``)."""
  return conv.eigen_conv_options() if config.get("eigen_convs", "auto") == "auto" else {}


def create_model(config, num_classes: int) -> nn.Module:
  """The ``config.model`` ResNet, quantized by ``config``'s layer policy (a float model
  when the policy quantizes nothing), with ``config``'s conv path."""
  kwargs = dict(num_classes=num_classes, policy=create_policy(config),
                fast_grad=FAST_GRAD[config.fast_grad])
  if config.model in ("resnet18", "resnet34", "resnet50"):
    return models.get(config.model, **kwargs)
  return models.get(config.model, width_multiplier=config.width_multiplier, **kwargs)


# ------------------------------------------------------------------------- state, optim


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 then cosine decay to 0 (or constant) over the run."""
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup, 1))
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def create_optimizer(config, lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """Coupled L2 weight decay (added to the gradient, as PyTorch SGD does) + optimizer,
  with the latents' updates scaled by ``config.latent_lr_scale``.

  The forward pass reads only which side of its thresholds a latent is on, and its
  gradient does not depend on its value, so scaling the latents' step by m acts as
  dividing their init's spread by m: it sets how soon, and how often, weights flip.
  """
  if config.optimizer == "sgd":
    opt = optax.sgd(lr_fn, momentum=config.momentum or None, nesterov=config.nesterov)
  elif config.optimizer == "radam":
    opt = optax.radam(lr_fn)
  else:
    opt = optax.adam(lr_fn)
  if config.weight_decay and config.weight_decay_on != "none":
    decay = optax.add_decayed_weights(
        config.weight_decay, mask=functools.partial(weight_decay_mask,
                                                    which=config.weight_decay_on))
    opt = optax.chain(decay, opt)
  return scale_latent_updates(opt, config.get("latent_lr_scale", 1.0))


def init_key(seed: int) -> jax.Array:
  """The run's root key ('rbg': see ``loop.fit``; ``fit`` initializes with the same)."""
  return jax.random.key(seed, impl="rbg")


def initialized(key, model: nn.Module, image_shape) -> tuple[Any, Any]:
  """``(params, batch_stats)`` of ``model`` initialized for images ``[H, W, C]``."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": key}, jnp.zeros((1, *image_shape), jnp.float32))
  return variables["params"], variables.get("batch_stats", {})


def create_train_state(key, config, model, image_shape, lr_fn) -> loop.TrainState:
  """A fresh ``loop.TrainState``: initialized variables and ``config``'s optimizer."""
  params, batch_stats = initialized(key, model, image_shape)
  return loop.TrainState(jnp.asarray(0, jnp.int32), params, {"batch_stats": batch_stats},
                         create_optimizer(config, lr_fn).init(params))


def abstract_checkpoint(config) -> dict:
  """Shapes and dtypes of what a checkpoint of ``config``'s run holds (``loop.checkpointed``
  of its train state, by ``jax.eval_shape``: nothing is compiled)."""
  spec = data_lib.get_spec(config.dataset)
  model = create_model(config, spec.num_classes)
  lr_fn = create_learning_rate_fn(config, 1, 1)
  return jax.eval_shape(lambda: loop.checkpointed(create_train_state(
      init_key(config.seed), config, model, spec.image_shape, lr_fn)))


def s3_weight(config, quantizers: Mapping[str, qz.Quantizer]) -> float:
  """``config.s3_regularizer`` when some layer is S3 (its sign latents' regularizer), else 0."""
  return (config.s3_regularizer if any(isinstance(q, qz.S3) for q in quantizers.values())
          else 0.0)


def step_function(config, model: nn.Module, lr_fn, *, teacher: Callable | None = None
                  ) -> Callable:
  """``loop.train_step`` with ``config``'s task, optimizer and S3 weight, as ``fit`` runs
  it in ``train_and_evaluate``: ``(state, batch, key) -> (state, metrics)``. For tests
  and benchmarks of one step; ``teacher(images)`` distills with ``config``'s weights."""
  quantizers = layer_quantizers(layer_plan(config, model))
  return functools.partial(
      loop.train_step, model=loop.functional(model), task=image_task(config),
      tx=create_optimizer(config, lr_fn), s3_alpha=s3_weight(config, quantizers),
      teacher=teacher, distillation=distillation(config) if teacher is not None else None)


def image_task(config) -> loop.Task:
  """Classification of ``config.dataset``: batches stay uint8 on the host and are
  normalized in the step; ``config.label_smoothing`` in the loss."""
  dataset = config.dataset
  classify = loop.classification(label_smoothing=config.get("label_smoothing", 0.0))
  return loop.Task(lambda batch: (data_lib.normalize(batch["image"], dataset),), classify.loss)


# ---------------------------------------------------------------- quantized-code tracking


def quantized_kernels(params) -> dict[str, Any]:
  """``{'stage1_block0/conv1': latents, ...}`` for every layer holding latents."""
  found = {}
  def visit(tree, path):
    for name, value in tree.items():
      if name == "kernel" and layers.is_latent_kernel(value):
        found["/".join(path)] = value
      elif hasattr(value, "items"):
        visit(value, path + (name,))
  visit(params, ())
  return found


def all_codes(params, quantizer) -> dict[str, jax.Array]:
  """``{layer path: uint8 codes}`` of every quantized kernel in ``params``; ``quantizer``
  is one spec or ``{layer path: spec}`` (mixed widths, ``layer_quantizers``)."""
  return {k: policy_lib.spec_of(quantizer, k).codes(v)
          for k, v in quantized_kernels(params).items()}


def code_changes(old: dict, new: dict, fmt) -> dict[str, jax.Array]:
  """Fractions of quantized weights whose sign bit / exponent index changed; ``fmt`` is
  one ``CodeFormat`` or ``{layer path: CodeFormat}``."""
  signs = exps = total = 0
  for key in new:
    layer_fmt = policy_lib.spec_of(fmt, key)
    old_sign, old_index = codes_lib.split(old[key], layer_fmt)
    new_sign, new_index = codes_lib.split(new[key], layer_fmt)
    signs += jnp.sum(old_sign != new_sign)
    exps += jnp.sum(old_index != new_index)
    total += new[key].size
  return {"sign_change_fraction": signs / max(total, 1),
          "exponent_change_fraction": exps / max(total, 1)}


# ------------------------------------------------------------------------ checkpoints


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """orbax manager of ``<workdir>/checkpoints`` keeping ``config.keep_checkpoints``."""
  return loop.checkpoint_manager(workdir, config.keep_checkpoints)


def restore_for_eval(workdir: str, config, state: loop.TrainState,
                     step: int | None = None) -> loop.TrainState:
  """``state`` with checkpoint ``step`` (default: the latest) of ``workdir`` restored."""
  manager = checkpoint_manager(workdir, config)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, loop.checkpointed(state))
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return loop.from_checkpoint(restored, state)


# ------------------------------------------------------------------------- weight sizes


def weight_bytes(params, batch_stats, quantizer) -> dict[str, int]:
  """Bytes of the inference weights: all float32, and with N-bit packed shift kernels.

  ``quantizer`` is one spec or ``{layer path: spec}`` (mixed widths). Packed shift
  kernels take exactly N bits per weight (the bit-plane layout of the packed file, in
  whole uint32 words); everything else stays float32.
  """
  latent = quantized_kernels(params)
  latent_leaves = {id(leaf) for tree in latent.values() for leaf in jax.tree.leaves(tree)}
  float_elems = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((params, batch_stats))
                    if id(x) not in latent_leaves)
  quant_elems = packed = 0
  for name, tree in latent.items():
    shape = tree["sign"].shape if "sign" in tree else next(iter(tree.values())).shape
    size = int(np.prod(shape))
    quant_elems += size
    bits = policy_lib.spec_of(quantizer, name).bits
    packed += 4 * math.ceil(size / codes_lib.WORD_BITS) * bits
  return {"float32_weight_bytes": 4 * (float_elems + quant_elems),
          "packed_weight_bytes": 4 * float_elems + packed,
          "quantized_weights": quant_elems, "float_weights": float_elems}


# --------------------------------------------------------------------------------- loop


def make_eval_dataset(config):
  """The full test split of ``config.dataset``, every example once (padded, masked)."""
  return data_lib.make_dataset(config.dataset, batch_size=config.eval_batch_size,
                               train=False, data_dir=config.data_dir or None,
                               image_size=config.get("image_size"))


def evaluate_test_split(config, model: nn.Module, state: loop.TrainState, mesh=None
                 ) -> dict[str, float]:
  """Loss and accuracy of ``state`` over every example of the test split (``test_loss``,
  ``test_accuracy``, ``test_examples``): ``loop.evaluate`` with ``config``'s task."""
  eval_fn = jax.jit(functools.partial(loop.eval_step, model=loop.functional(model),
                                      task=image_task(config)),
                    compiler_options=step_compiler_options(config))
  results = loop.evaluate(state, make_eval_dataset(config).iterator(), eval_fn,
                          mesh or loop.create_mesh())
  return {"test_loss": results["eval_loss"], "test_accuracy": results["eval_accuracy"],
          "test_examples": int(results["eval_examples"])}


class CodeChanges:
  """The log hook of quantized runs: the fractions of weights whose sign or exponent
  changed since the previous log (``loop.fit``'s ``on_log``), with the learning rate."""

  def __init__(self, quantizers: Mapping[str, qz.Quantizer], lr_fn, steps_per_epoch: int):
    self.lr_fn, self.steps_per_epoch = lr_fn, steps_per_epoch
    self.codes = (jax.jit(functools.partial(all_codes, quantizer=dict(quantizers)))
                  if quantizers else None)
    self.changes = (jax.jit(functools.partial(
        code_changes, fmt={k: q.code_format for k, q in quantizers.items()}))
                    if quantizers else None)
    self.previous = None

  def __call__(self, step: int, state: loop.TrainState) -> dict[str, float]:
    scalars = {"learning_rate": float(self.lr_fn(max(step - 1, 0))),
               "epoch": step / self.steps_per_epoch}
    if self.codes is not None:
      now = self.codes(state.params)
      if self.previous is not None:
        scalars.update({k: float(v) for k, v in self.changes(self.previous, now).items()})
      self.previous = now
    return scalars


def total_train_steps(config, steps_per_epoch: int) -> int:
  """``config.num_train_steps`` if positive, else ``ceil(num_epochs * steps_per_epoch)``."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None) -> dict:
  """Trains (resuming from ``workdir``), evaluates on the full test split, summarizes.

  Args:
    config: see ``experiments/configs/default.py`` for every field.
    workdir: checkpoints, metrics, curves and ``summary.json`` go here.
    stop_after_steps: stop (with a checkpoint) after this many steps of this call, as
      if interrupted; for tests of resumption.
  Returns:
    the summary dict (also written to ``workdir/summary.json``).
  """
  start_time = time.time()
  if config.get("distributed", False):
    jax.distributed.initialize()
  validate_config(config)
  spec = data_lib.get_spec(config.dataset)
  distilling = distillation(config)
  # A wrong teacher is an error before any data is read or anything compiled.
  teacher_model, teacher_variables = (load_teacher(config, spec.image_shape) if distilling
                                      else (None, None))
  data_dir = config.data_dir or None
  if config.dataset == "fashion_mnist" and config.prepare_offline_data:
    data_lib.prepare_fashion_mnist(data_dir)
  train_ds = data_lib.make_dataset(config.dataset, batch_size=config.batch_size, train=True,
                                   seed=config.seed, data_dir=data_dir,
                                   augment=training_augmentation(config),
                                   image_size=config.get("image_size"))
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = total_train_steps(config, steps_per_epoch)
  model = create_model(config, spec.num_classes)
  quantizers = layer_quantizers(layer_plan(config, model))  # {layer: its weight spec}
  quantizer = models.policy_of(model).quantizer
  lr_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  start_step = loop.latest_step(workdir) or 0
  # --config.init_from: a fresh run starts from a converted float checkpoint (a resumed
  # run keeps its own checkpoint).
  init_from = transfer.init_from_config(
      config, lambda: dict(zip(("params", "batch_stats"), jax.device_get(initialized(
          init_key(config.seed), model, spec.image_shape)))),
      quantizers or None, resuming=start_step > 0)
  if start_step:
    say(f"Resuming from the checkpoint at step {start_step}")
  if jax.process_index() == 0:
    say(str(summary_lib.summarize(model, jnp.zeros((1, *spec.image_shape), jnp.float32),
                                  train=False)))
  say(f"Training {config.model} ({describe_policy(config)}) on {config.dataset}: {total_steps} "
      f"steps ({steps_per_epoch}/epoch) on {jax.device_count()} device(s), from step "
      f"{start_step}" + (f", distilled from {config.distill_from} (weight "
                           f"{distilling.weight}, temperature {distilling.temperature})"
                           if distilling else ""))

  mesh = loop.create_mesh()
  teacher = None
  if distilling:
    teacher_variables = loop.replicate(teacher_variables, mesh)
    teacher = lambda images: teacher_model.apply(teacher_variables, images, train=False)
  result = loop.fit(
      model, train_ds.iterator, optimizer=create_optimizer(config, lr_fn),
      num_steps=total_steps, task=image_task(config), workdir=workdir, seed=config.seed,
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints, s3_alpha=s3_weight(config, quantizers),
      teacher=teacher,
      distillation=distilling or None, progress_bar=config.get("progress_bar"),
      stop_after_steps=stop_after_steps, init_variables=init_from,
      on_log=CodeChanges(quantizers, lr_fn, steps_per_epoch),
      compiler_options=step_compiler_options(config))
  state = result.state

  summary: dict[str, Any] = {"steps": int(state.step), "total_steps": total_steps}
  if int(state.step) >= total_steps:
    results = evaluate_test_split(config, model, state, mesh)
    writer = metrics_lib.MetricWriter(workdir, resume_step=int(state.step))
    writer.write(int(state.step), {k: v for k, v in results.items() if k != "test_examples"})
    writer.close()
    summary.update(results)
    summary.update(weight_bytes(state.params, state.state["batch_stats"], quantizers))
    summary.update({"model": config.model, "dataset": config.dataset,
                    "quantizer": repr(quantizer) if quantizer else "float",
                    "policy": describe_policy(config)})
    if distilling:
      summary["distilled_from"] = os.path.abspath(config.distill_from)
    if config.export_packed:
      summary.update(export_packed(config, workdir))
  summary["wall_seconds"] = time.time() - start_time
  # This invocation's peak: start-up, data preparation, compilation, training, export.
  summary["peak_rss_bytes"] = host_memory.peak_resident_bytes()
  # Evaluating a finished run again keeps the wall time of the invocation that trained it.
  previous = read_summary(workdir) if start_step >= total_steps else None
  summary["training_wall_seconds"] = (
      previous.get("training_wall_seconds", previous["wall_seconds"]) if previous
      else summary["wall_seconds"])
  if jax.process_index() == 0:
    metrics_lib.plot_curves(workdir)
    if "test_accuracy" in summary:
      write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
  return summary


def read_summary(workdir: str) -> dict | None:
  """The ``summary.json`` of a finished run in ``workdir``, None when there is none."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def export_packed(config, workdir: str) -> dict:
  """Writes the finished run's packed model (``<workdir>/model.shiftjax``) once.

  A file already there (a finished run started again) is kept, not overwritten.
  """
  path = os.path.join(workdir, "model" + deploy_lib.FILE_SUFFIX)
  if jax.process_index() == 0 and not os.path.exists(path):
    export_checkpoint(config, workdir, path)
  return {"packed_file": path, "packed_file_bytes": os.path.getsize(path)}


def restore_variables(config, workdir: str | os.PathLike, *, step: int | None = None
                      ) -> tuple[nn.Module, dict, int]:
  """``(model, {'params', 'batch_stats'}, step)`` of the (latest, or ``step``) checkpoint
  of a training run in ``workdir``; ``config`` is the run's config. Host numpy arrays."""
  validate_config(config)
  spec = data_lib.get_spec(config.dataset)
  model = create_model(config, spec.num_classes)
  lr_fn = create_learning_rate_fn(config, 1, 1)
  # Shapes only (eval_shape compiles nothing): the restore target of this module's layout.
  abstract = jax.eval_shape(lambda: create_train_state(
      init_key(config.seed), config, model, spec.image_shape, lr_fn))
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(
                                         jax.devices()[0])), abstract)
  state = restore_for_eval(os.fspath(workdir), config, abstract, step)
  variables = {"params": state.params, **state.state}
  return model, jax.device_get(variables), int(state.step)


def packed_from_checkpoint(config, workdir: str | os.PathLike, *, step: int | None = None,
                           float_dtype=jnp.float32) -> deploy_lib.PackedTree:
  """Exports the (latest, or ``step``) orbax checkpoint of a training run in ``workdir``
  (format version 4, ``shiftjax.export.export``).

  ``config`` is the run's config; the dataset's input normalization is kept in the
  metadata (the packed model takes normalized images, as the flax model does).
  """
  model, variables, step = restore_variables(config, workdir, step=step)
  spec = data_lib.get_spec(config.dataset)
  float_bytes = weight_bytes(variables["params"], variables.get("batch_stats", {}),
                             layer_quantizers(layer_plan(config, model)))
  metadata = {
      "source": {"model": config.model, "dataset": config.dataset, "step": step,
                 "float32_weight_bytes": float_bytes["float32_weight_bytes"]},
      "input": {"image_shape": list(spec.image_shape), "dtype": "uint8",
                "normalization": "(image / 255 - mean) / std",
                "mean": list(spec.mean), "std": list(spec.std)},
  }
  return export_lib.export(variables, model, float_dtype=float_dtype, metadata=metadata)


def export_checkpoint(config, workdir: str | os.PathLike, output: str | None = None, *,
                      overwrite: bool = False, step: int | None = None,
                      float_dtype=jnp.float32) -> dict[str, Any]:
  """``packed_from_checkpoint`` then ``save`` to ``output`` (default ``<workdir>/model.shiftjax``).

  Returns ``size_report()`` plus ``path`` and ``file_bytes``. Refuses (FileExistsError)
  to replace an existing file unless ``overwrite``, before reading the checkpoint.
  """
  output = os.fspath(output or os.path.join(os.fspath(workdir),
                                            "model" + deploy_lib.FILE_SUFFIX))
  if not overwrite and os.path.lexists(output):
    raise FileExistsError(f"{output} already exists; pass overwrite=True "
                          "(--overwrite) to replace it")
  packed = packed_from_checkpoint(config, workdir, step=step, float_dtype=float_dtype)
  packed.save(output, overwrite=overwrite)
  report = packed.size_report()
  source = packed.metadata["source"]
  # The trained network's float32 weights (every BatchNorm's four arrays, not the two a
  # folded one keeps), as train.weight_bytes counts them.
  report.update(path=output, file_bytes=os.path.getsize(output), step=source["step"],
                float32_weight_bytes=source["float32_weight_bytes"])
  return report


def format_export_report(report: Mapping[str, Any]) -> str:
  """Human-readable lines of an ``export_checkpoint`` report."""
  lines = [f"wrote                      {report['path']} (checkpoint step {report['step']})",
           f"file size                  {report['file_bytes'] / 1024:.1f} KiB",
           f"float32 weights            {report['float32_weight_bytes'] / 1024:.1f} KiB "
           f"({report['float32_weight_bytes'] / report['file_bytes']:.1f}x smaller)"]
  if report["quantized_weights"]:
    lines.append(f"bits per quantized weight  {report['bits_per_quantized_weight']:.2f} "
                 f"({report['quantized_weights']} quantized weights)")
  return "\n".join(lines)


def write_json_atomic(path: str, obj) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically, replacing it."""
  deploy_lib.write_atomic(path, json.dumps(obj, indent=2).encode(), overwrite=True)


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Restores a checkpoint of ``workdir`` and evaluates it on the full test split."""
  validate_config(config)
  spec = data_lib.get_spec(config.dataset)
  model = create_model(config, spec.num_classes)
  mesh = loop.create_mesh()
  lr_fn = create_learning_rate_fn(config, 1, 1)
  state = loop.replicate(create_train_state(init_key(config.seed), config, model,
                                            spec.image_shape, lr_fn), mesh)
  state = restore_for_eval(workdir, config, state, step)
  results = evaluate_test_split(config, model, state, mesh)
  results["step"] = int(state.step)
  return results


def format_summary(summary: dict, workdir: str) -> str:
  """A human-readable end-of-run report."""
  if "test_accuracy" not in summary:
    return (f"Stopped at step {summary['steps']}/{summary['total_steps']} "
            f"after {summary['wall_seconds']:.0f} s; rerun with --workdir={workdir} to resume.")
  lines = [
      f"model            {summary['model']} ({summary['quantizer']}) on {summary['dataset']}",
      f"test accuracy    {summary['test_accuracy']:.4f} "
      f"({summary['test_examples']} test examples)",
      f"steps            {summary['steps']}",
      f"wall time        {summary['wall_seconds']:.0f} s",
      f"peak memory      {summary['peak_rss_bytes'] / 2**30:.2f} GiB resident",
      f"weights float32  {summary['float32_weight_bytes'] / 1024:.1f} KiB",
      f"weights packed   {summary['packed_weight_bytes'] / 1024:.1f} KiB "
      f"({summary['float32_weight_bytes'] / summary['packed_weight_bytes']:.1f}x smaller)",
  ]
  if "packed_file" in summary:
    lines.append(f"packed file      {summary['packed_file']}: "
                 f"{summary['packed_file_bytes'] / 1024:.1f} KiB on disk")
  lines += [
      f"written to       {os.path.join(workdir, SUMMARY_FILE)}",
  ]
  return "\n".join(lines)
