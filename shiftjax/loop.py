"""The training loop of any Flax model (linen or NNX) on any data: ``sj.fit(model, data, ...)``.

The loop the launcher's ResNets get, for a user's own model and batches:

* the model: a linen ``nn.Module`` (initialized here from the first batch) or an
  ``nnx.Module`` (already initialized); shift-quantized or float (``quantize_model``).
  Both run as one pure function of ``(params, state, inputs)``: NNX through
  ``nnx.split``/``nnx.merge``, so the step, the optimizer and the checkpoints are one.
* the data: a function ``start_step -> iterator of batches`` (exact resume for any data),
  a dict of equally long arrays (shuffled per epoch by seed, batched here), a
  random-access source (``len`` and ``[i]``, e.g. a grain or ``tfds.data_source``
  source: shuffled per epoch by seed, batched here), a tfds dataset name, or any iterable
  of batches (on resume its first ``start_step`` batches are skipped). A batch is a dict
  of numpy or jax arrays.
* what is learned: ``task`` turns a batch into the model's inputs and its outputs into
  a loss and metrics (``classification`` and ``next_token`` are given).
* what is kept: an orbax checkpoint every ``checkpoint_every`` steps in ``workdir``
  (``checkpointed``: the step, the optimizer state and the model's variables, a linen
  model's by collection) and a run that finds one resumes from it bit for bit; metrics as JSON lines and TensorBoard events; a progress bar; batches
  sharded over every device (data parallelism); a stop without saving when the loss or
  a parameter stops being finite; optional distillation from a teacher function; the
  latents' learning-rate scale; a hook that adds the caller's scalars to each log.

The absl launcher (``shiftjax.train``) runs its ResNets through ``fit`` too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from shiftjax import distill as distill_lib
from shiftjax import metrics as metrics_lib
from shiftjax import optim
from shiftjax import quantizers as qz
from shiftjax import trees

CHECKPOINT_DIR = "checkpoints"
Batch = Mapping[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The training loss or a parameter became NaN or inf; the last good checkpoint is kept."""


# -------------------------------------------------------------------------------- task


@dataclasses.dataclass(frozen=True)
class Task:
  """How a batch is learned: ``inputs(batch)`` is the model's positional arguments,
  ``loss(outputs, batch)`` a scalar mean loss and a dict of scalar metrics (means over
  the batch's real examples: a ``'mask'`` in the batch marks padding)."""
  inputs: Callable[[Batch], tuple]
  loss: Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def _masked_mean(values, batch):
  mask = batch.get("mask")
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype).reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask * jnp.ones_like(values)), 1)


def classification(image_key: str = "image", label_key: str = "label", *,
                   label_smoothing: float = 0.0) -> Task:
  """Softmax cross-entropy of logits ``[B, C]`` against int labels; metric accuracy.

  ``label_smoothing`` (eps) learns ``(1 - eps) * one_hot + eps / C`` instead of the
  one-hot labels (Szegedy et al. 2016); 0 is the plain loss.
  """
  def loss(logits, batch):
    labels = batch[label_key]
    if label_smoothing:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
      losses = optax.softmax_cross_entropy(logits, targets)
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return _masked_mean(losses, batch), {"accuracy": _masked_mean(correct, batch)}
  return Task(lambda batch: (batch[image_key],), loss)


def next_token(inputs_key: str = "inputs", targets_key: str = "targets") -> Task:
  """A language model on ``inputs [B, T]`` and ``targets [B, T]`` (the next tokens, as
  ``shiftjax.data.text`` makes them); metrics bits per token (``loss / ln 2``) and
  next-token accuracy."""
  def loss(logits, batch):
    targets = batch[targets_key]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    mean = _masked_mean(losses, batch)
    return mean, {"bits_per_token": mean / math.log(2), "accuracy": _masked_mean(correct, batch)}
  return Task(lambda batch: (batch[inputs_key],), loss)


# -------------------------------------------------------------------- model as a function


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. ``state`` is the model's non-parameter variables
  (linen's ``batch_stats``...; NNX's batch statistics and RNG counters)."""
  step: jax.Array
  params: Any
  state: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """A linen or NNX model as pure functions of ``(params, state)``."""
  init: Callable[[jax.Array, tuple], tuple[Any, Any]]
  apply: Callable[..., tuple[Any, Any]]  # (params, state, inputs, train, key) -> (out, state)
  rebuild: Callable[[Any, Any], Any]  # trained (params, state) -> the user's kind of model


def functional(model) -> FunctionalModel:
  """``model`` (linen or NNX) as a ``FunctionalModel``."""
  if isinstance(model, nn.Module):
    return _linen_functional(model)
  if isinstance(model, nnx.Module):
    return _nnx_functional(model)
  raise TypeError(f"fit takes a flax.linen or flax.nnx Module, got {type(model).__name__}")


def _takes_train(model: nn.Module) -> bool:
  return "train" in inspect.signature(type(model).__call__).parameters


def _linen_functional(model: nn.Module) -> FunctionalModel:
  train_kw = _takes_train(model)

  def init(key, inputs):
    kwargs = {"train": False} if train_kw else {}
    variables = model.init({"params": key, "dropout": key}, *inputs, **kwargs)
    variables = dict(variables)
    return variables.pop("params"), variables

  def apply(params, state, inputs, train, key):
    kwargs = {"train": train} if train_kw else {}
    rngs = {"dropout": key, "rounding": key}
    if train and state:
      out, updates = model.apply({"params": params, **state}, *inputs, rngs=rngs,
                                 mutable=list(state), **kwargs)
      return out, dict(updates)
    return model.apply({"params": params, **state}, *inputs, rngs=rngs, **kwargs), state

  return FunctionalModel(init, apply, lambda params, state: {"params": params, **state})


def _nnx_functional(model: nnx.Module) -> FunctionalModel:
  graphdef, params, state = nnx.split(model, nnx.Param, ...)

  def apply(params, state, inputs, train, key):
    del key  # an NNX model carries its own RNG streams in its state
    module = nnx.merge(graphdef, params, state)
    module.train() if train else module.eval()  # pylint: disable=expression-not-assigned
    out = module(*inputs)
    return out, nnx.split(module, nnx.Param, ...)[2]

  return FunctionalModel(lambda key, inputs: (params, state), apply,
                         lambda params, state: nnx.merge(graphdef, params, state))


# ------------------------------------------------------------------------------- data


def batches_from(data, *, batch_size: int | None, seed: int, split: str = "train",
                 data_dir: str | None = None) -> Callable[[int], Iterator[Batch]]:
  """``data`` as a function ``start_step -> iterator of batches`` (module docstring)."""
  if isinstance(data, str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data = tfds.data_source(data, split=split, data_dir=data_dir)
  if callable(data) and not hasattr(data, "__getitem__"):
    return data
  if isinstance(data, Mapping):
    if not batch_size:
      raise ValueError("arrays need batch_size (examples per step)")
    return functools.partial(_array_batches, dict(data), batch_size, seed)
  if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
      data, (list, tuple)):
    if not batch_size:
      raise ValueError("a random-access data source needs batch_size (examples per step)")
    return functools.partial(_source_batches, data, batch_size, seed)
  if isinstance(data, Iterable):
    return lambda start: itertools.islice(iter(data), start, None)
  raise TypeError(f"data must be a function of the start step, a random-access source, a "
                  f"tfds name or an iterable of batches; got {type(data).__name__}")


def _source_batches(source, batch_size: int, seed: int, start: int) -> Iterator[Batch]:
  """Batches of a random-access source, shuffled per epoch (a function of seed and epoch,
  so any step can be the first); the last partial batch of an epoch is dropped."""
  steps_per_epoch = len(source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"the source has {len(source)} examples, fewer than batch_size "
                     f"{batch_size}")
  for step in itertools.count(start):
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(source))
    examples = [source[int(i)] for i in order[index * batch_size:(index + 1) * batch_size]]
    yield {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def _array_batches(arrays: dict, batch_size: int, seed: int, start: int) -> Iterator[Batch]:
  """Batches of equally long arrays, shuffled per epoch as ``_source_batches``."""
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"the arrays differ in length: {lengths}")
  n = next(iter(lengths.values()))
  steps_per_epoch = n // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"the arrays have {n} examples, fewer than batch_size {batch_size}")
  for step in itertools.count(start):
    epoch, index = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    chosen = np.sort(order[index * batch_size:(index + 1) * batch_size])
    yield {k: v[chosen] for k, v in arrays.items()}


def create_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every host."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def shard_batch(batch: Batch, mesh: Mesh) -> dict:
  """This host's slice of the global batch -> arrays sharded over the 'data' axis."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  """``tree`` placed on every device of ``mesh`` (replicated)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ------------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: Batch, key, *, model: FunctionalModel, task: Task,
               tx: optax.GradientTransformation, s3_alpha: float = 0.0,
               teacher: Callable | None = None,
               distillation: distill_lib.Distillation | None = None):
  """One optimizer step; returns the new state and the batch's metrics (loss included)."""
  inputs = task.inputs(batch)
  key = jax.random.fold_in(key, state.step)
  teacher_out = teacher(*inputs) if teacher is not None else None

  def objective(params):
    out, new_state = model.apply(params, state.state, inputs, True, key)
    loss, metrics = task.loss(out, batch)
    if teacher is not None:
      loss = distillation.objective(loss, out, teacher_out)
    if s3_alpha:
      loss = loss + s3_alpha * qz.s3_regularizer(params)
    return loss, (metrics, new_state)

  (loss, (metrics, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss)  # the parameters are checked when logged or saved
  state = state.replace(step=state.step + 1, params=params, state=new_state,
                        opt_state=opt_state)
  return state, {"loss": loss, **metrics, "finite": finite.astype(jnp.float32)}


def eval_step(state: TrainState, batch: Batch, *, model: FunctionalModel, task: Task):
  """The task's metrics of one batch and its number of real examples (its weight)."""
  out, _ = model.apply(state.params, state.state, task.inputs(batch), False,
                       jax.random.key(0))
  loss, metrics = task.loss(out, batch)
  weight = (jnp.sum(batch["mask"]) if "mask" in batch
            else jnp.asarray(jax.tree.leaves(batch)[0].shape[0]))
  return {"loss": loss, **metrics}, weight.astype(jnp.float32)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def evaluate(state: TrainState, data: Iterable[Batch], eval_fn, mesh) -> dict[str, float]:
  """Example-weighted means of the task's metrics over every batch of ``data``
  (``eval_loss``, ``eval_accuracy``, ...) and ``eval_examples``, their number."""
  totals, count = None, 0.0
  for batch in data:
    metrics, weight = eval_fn(state, shard_batch(batch, mesh))
    metrics = {k: v * weight for k, v in metrics.items()}
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
    count += float(weight)
  if totals is None:
    raise ValueError("the evaluation data gave no batch")
  means = {f"eval_{k}": float(v) / count for k, v in jax.device_get(totals).items()}
  return {**means, "eval_examples": count}


# ------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class FitResult:
  """The trained model (an NNX module, or linen variables), its final ``TrainState`` and
  the last logged and evaluated metrics."""
  model: Any
  state: TrainState
  metrics: dict[str, float]


def checkpoint_manager(workdir: str, keep: int, create: bool = True
                       ) -> ocp.CheckpointManager:
  """orbax's manager of ``<workdir>/checkpoints``, keeping the latest ``keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options)


_OWN_KEYS = ("step", "opt_state")


def checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds: ``step``, ``opt_state`` and the model's variables. A linen
  model's are its collections by name (``params``, ``batch_stats``, ...: the launcher's
  layout since its first version, so every old workdir resumes); an NNX model's are
  ``params`` and its other state under ``state``."""
  collections = state.state if isinstance(state.state, dict) else {"state": state.state}
  clash = set(collections) & {"params", *_OWN_KEYS}
  if clash:
    raise ValueError(f"the model has variable collections named {sorted(clash)}, which a "
                     "checkpoint keeps for the training state; rename them")
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          **collections}


def from_checkpoint(stored: Mapping[str, Any], like: TrainState) -> TrainState:
  """The ``TrainState`` of a checkpoint's dict (``checkpointed``'s inverse; also of
  ``fit``'s first layout, which kept a linen model's collections under ``state``)."""
  if isinstance(like.state, dict) and "state" not in stored:
    model_state = {k: stored[k] for k in like.state}
  else:
    model_state = stored["state"]
  return TrainState(stored["step"], stored["params"], model_state, stored["opt_state"])


def _first_layout(state: TrainState) -> dict | None:
  """``fit``'s first checkpoint layout of a linen model (its collections under
  ``state``), which workdirs written before the launcher moved onto ``fit`` have."""
  if not isinstance(state.state, dict):
    return None
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "state": state.state}


def latest_step(workdir: str) -> int | None:
  """The step of the latest checkpoint in ``workdir`` (None: none; nothing is created)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  manager = checkpoint_manager(workdir, keep=1, create=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _restore(manager: ocp.CheckpointManager, state: TrainState, workdir: str) -> TrainState:
  step = manager.latest_step()
  if step is None:
    return state
  layouts = [checkpointed(state), _first_layout(state)]
  error = None
  for layout in filter(None, layouts):
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, layout)
    try:
      return from_checkpoint(manager.restore(step, args=ocp.args.StandardRestore(target)),
                             state)
    except (ValueError, KeyError) as e:
      error = error or e
  raise ValueError(f"the checkpoint at step {step} in {workdir} is not of this model and "
                   f"optimizer (another run's workdir?); use a new workdir. ({error})") from error


def load_variables(workdir: str, step: int | None = None) -> dict[str, Any]:
  """A linen model's variables (``{'params': ..., **state}``) from ``fit``'s checkpoint
  in ``workdir`` (the latest step by default), read without knowing the optimizer."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):  # reading never creates a workdir
    raise FileNotFoundError(f"no checkpoint in {directory}")
  manager = checkpoint_manager(workdir, keep=1, create=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  # A linen model's collections by name; an NNX model's (and fit's first layout) under 'state'.
  return {**{k: v for k, v in restored.items() if k not in (*_OWN_KEYS, "state")},
          **(restored.get("state") or {})}


def _without_value_key(name: str) -> str:
  """A checkpointed NNX state path without the ``value`` key orbax stores under each
  variable (its last ``value`` component: a module may be named ``value`` too)."""
  parts = name.split("/")
  if "value" in parts:
    del parts[len(parts) - 1 - parts[::-1].index("value")]
  return "/".join(parts)


def load_into(model: nnx.Module, workdir: str, step: int | None = None) -> nnx.Module:
  """A clone of the NNX ``model`` with the parameters of ``fit``'s checkpoint in
  ``workdir`` (the latest step by default); ValueError naming a path the two disagree on."""
  stored = {_without_value_key(k): v
            for k, v in trees.flatten(load_variables(workdir, step)["params"]).items()}
  model = nnx.clone(model)
  state = nnx.state(model, nnx.Param)

  def restore(path, leaf):
    name = "/".join(trees.path_names(path))
    if name not in stored or np.shape(stored[name]) != np.shape(leaf):
      raise ValueError(f"parameter {name!r} {np.shape(leaf)} is not in the checkpoint of "
                       f"{workdir} as such (it has {np.shape(stored.get(name))})")
    return jnp.asarray(stored[name], jnp.asarray(leaf).dtype)
  nnx.update(model, jax.tree_util.tree_map_with_path(restore, state))
  return model


def fit(model, train_data, *, optimizer: optax.GradientTransformation, num_steps: int,
        task: Task | None = None, batch_size: int | None = None,
        eval_data: Iterable[Batch] | Callable[[], Iterable[Batch]] | None = None,
        workdir: str | None = None, seed: int = 0, log_every: int = 100,
        checkpoint_every: int = 1000, keep_checkpoints: int = 2,
        eval_every: int | None = None, latent_lr_scale: float = 1.0,
        s3_alpha: float = 0.0, teacher: Callable | None = None,
        distillation: distill_lib.Distillation | None = None,
        progress_bar: bool | None = None, stop_after_steps: int | None = None,
        init_variables: Mapping[str, Any] | None = None,
        on_log: Callable[[int, TrainState], Mapping[str, float]] | None = None,
        compiler_options: Mapping[str, str] | None = None) -> FitResult:
  """Trains ``model`` on ``train_data`` for ``num_steps`` optimizer steps.

  Args:
    model: a linen or NNX module (see the module docstring); NNX modules are not modified.
    train_data: batches (see ``batches_from``); a tfds name reads its ``'train'`` split.
    optimizer: an optax transformation (its schedule counts optimizer steps).
    num_steps: total steps of the run (a resumed run continues to the same total).
    task: inputs, loss and metrics; default ``classification()``.
    batch_size: examples per step, for a random-access source or a tfds name.
    eval_data: batches (or a function returning fresh ones) evaluated at the end and
      every ``eval_every`` steps; a ``'mask'`` marks padding.
    workdir: checkpoints and metrics; None keeps nothing (no resume).
    seed: model initialization (linen), data order and the step keys.
    latent_lr_scale: multiplies the updates of quantizer latents (``shiftjax.optim``).
    s3_alpha: weight of S3's sign-latent regularizer.
    teacher, distillation: ``teacher(*inputs)`` gives logits the student is distilled
      towards with ``distillation``'s weight and temperature (both or neither).
    stop_after_steps: stop (checkpointed) after this many steps of this call, as if
      interrupted; for tests of resumption.
    init_variables: linen only: the variables a fresh run starts from instead of an
      initialization (e.g. ``shiftjax.ptq.quantize_trained``'s); a resumed run keeps its
      checkpoint's. (An NNX model starts from the values it holds.)
    on_log: ``on_log(step, state)`` gives more scalars for each log line (the launcher's
      learning rate and code-change fractions). It is also called once with the state
      training starts from (fresh or restored), whose scalars are not logged: a hook that
      reports changes since the previous log starts from it.
    compiler_options: ``jax.jit`` compiler options of the train and eval steps.
  Returns:
    a ``FitResult``.
  Raises:
    NonFiniteLossError: the loss or a parameter stopped being finite (nothing saved).
    ValueError/TypeError: bad arguments, before anything is compiled.
  """
  for name, value in (("num_steps", num_steps), ("log_every", log_every),
                      ("checkpoint_every", checkpoint_every)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if (teacher is None) != (distillation is None):
    raise ValueError("distillation needs both teacher and distillation (or neither)")
  task = task or classification()
  functional_model = functional(model)
  make_batches = batches_from(train_data, batch_size=batch_size, seed=seed)
  tx = optim.scale_latent_updates(optimizer, latent_lr_scale)
  mesh = create_mesh()
  # 'rbg' rather than threefry: compiling the init of a ResNet whose every conv draws
  # several latent tensors took 45 s with threefry and 4 s with rbg here.
  key = jax.random.key(seed, impl="rbg")

  batches = make_batches(0)
  first = next(batches)
  manager = checkpoint_manager(workdir, keep_checkpoints) if workdir else None
  # Resuming (or reading a finished run) needs the state's shapes only: nothing is
  # initialized or compiled for values the checkpoint replaces.
  resuming = manager is not None and manager.latest_step() is not None
  if init_variables is not None and not isinstance(model, nn.Module):
    raise ValueError("init_variables is for linen models; an NNX model holds its values")
  if init_variables is not None and not resuming:
    init_variables = dict(init_variables)
    params, model_state = init_variables.pop("params"), init_variables
  elif resuming:
    params, model_state = jax.eval_shape(functional_model.init, key, task.inputs(first))
  else:
    params, model_state = jax.jit(functional_model.init)(key, task.inputs(first))
  opt_state = jax.eval_shape(tx.init, params) if resuming else tx.init(params)
  state = TrainState(jnp.asarray(0, jnp.int32), params, model_state, opt_state)
  if manager is not None:
    state = _restore(manager, state, workdir)
  state = replicate(state, mesh)
  start = int(state.step)
  if start:
    batches = make_batches(start)
  else:
    batches = itertools.chain([first], batches)

  step_fn = jax.jit(functools.partial(
      train_step, model=functional_model, task=task, tx=tx, s3_alpha=s3_alpha,
      teacher=teacher, distillation=distillation), donate_argnums=0,
      compiler_options=compiler_options)
  eval_fn = jax.jit(functools.partial(eval_step, model=functional_model, task=task),
                    compiler_options=compiler_options)
  params_finite = jax.jit(all_finite)
  eval_batches = (eval_data if callable(eval_data) else (lambda: eval_data)) if eval_data \
      is not None else None
  writer = metrics_lib.MetricWriter(workdir, resume_step=start) if workdir else None
  progress = metrics_lib.Progress(num_steps, start, progress_bar)
  end = num_steps if stop_after_steps is None else min(num_steps, start + stop_after_steps)
  step_key = jax.random.fold_in(key, 1)
  if on_log is not None:
    on_log(start, state)
  logged: dict[str, float] = {}
  window: list[dict] = []
  window_start = time.time()
  try:
    for step in range(start + 1, end + 1):
      state, metrics = step_fn(state, shard_batch(next(batches), mesh), step_key)
      window.append(metrics)
      should_log = step % log_every == 0 or step == end
      should_save = manager is not None and (step % checkpoint_every == 0 or step == end)
      if should_log or should_save:
        means = jax.device_get(jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *window))
        if means.pop("finite") < 1 or not bool(params_finite(state.params)):
          last = manager.latest_step() if manager is not None else None
          raise NonFiniteLossError(
              f"training diverged between steps {step - len(window) + 1} and {step} "
              f"(mean loss {means['loss']}); stopped without saving. The last good "
              f"checkpoint (step {last}) is kept" + (f" in {workdir}" if workdir else "")
              + ". Try a lower learning rate.")
        logged = {f"train_{k}": float(v) for k, v in means.items()}
        logged["steps_per_second"] = len(window) / (time.time() - window_start)
        if on_log is not None:
          logged.update(on_log(step, state))
        if eval_batches is not None and eval_every and step % eval_every == 0:
          logged.update(evaluate(state, eval_batches(), eval_fn, mesh))
        if writer is not None:
          writer.write(step, logged)
        progress.update(step, logged)
        window, window_start = [], time.time()
      if should_save:
        manager.save(step, args=ocp.args.StandardSave(checkpointed(state)))
    if eval_batches is not None and int(state.step) >= num_steps:
      logged.update(evaluate(state, eval_batches(), eval_fn, mesh))
      if writer is not None:
        writer.write(int(state.step), {k: v for k, v in logged.items()
                                       if k.startswith("eval_")})
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    progress.close()
    if writer is not None:
      writer.close()
    if hasattr(batches, "close"):
      batches.close()
  trained = functional_model.rebuild(state.params, state.state)
  return FitResult(trained, state, logged)
