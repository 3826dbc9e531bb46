"""Knowledge distillation: a shift network trained toward a float network's predictions.

The student's loss mixes the labels' cross-entropy with the KL divergence from the
teacher's softened predictions (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge
in a Neural Network"):

    loss = (1 - weight) * CE(labels, s) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

(``CE`` is the run's usual loss, label smoothing included.)
``T^2`` keeps the soft term's gradients at the scale of the hard one's as ``T`` grows.
The teacher is a finished float run of the same model (``config.distill_from``): it sees
the same augmented batch in inference mode (BatchNorm's running statistics), and no
gradient reaches it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shiftjax import transfer


@dataclasses.dataclass(frozen=True)
class Distillation:
  """How much the soft targets count (``weight`` in (0, 1]) and how soft they are."""
  weight: float = 0.5
  temperature: float = 4.0

  def __post_init__(self):
    if not 0.0 < self.weight <= 1.0:
      raise ValueError(f"weight must be in (0, 1], got {self.weight}")
    if not self.temperature > 0.0:
      raise ValueError(f"temperature must be positive, got {self.temperature}")

  def objective(self, hard_loss, student_logits, teacher_logits):
    """``(1 - weight) * hard_loss + weight * soft_target_loss``; the teacher's logits are
    constants (no gradient reaches the teacher)."""
    soft = soft_target_loss(student_logits, jax.lax.stop_gradient(teacher_logits),
                            self.temperature)
    return (1.0 - self.weight) * hard_loss + self.weight * soft


def soft_target_loss(student_logits, teacher_logits, temperature: float):
  """Mean over the batch of ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``."""
  log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(log_student, log_teacher)
  return temperature ** 2 * jnp.mean(kl)


def _shapes(variables: Mapping) -> dict[str, tuple[int, ...]]:
  return {"/".join(path): tuple(np.shape(leaf))
          for path, leaf in transfer.flatten(variables).items()}


def load_teacher(path: str | os.PathLike, expected: Mapping[str, Any]) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of the float run at ``path`` (its workdir or a
  checkpoint directory), checked against ``expected`` (the teacher model's variables or
  their shapes, ``jax.eval_shape`` of its init).

  Raises FileNotFoundError when ``path`` holds no checkpoint, and ValueError when the run
  is not float (a teacher's predictions must not depend on a quantizer's latents) or
  its variables do not fit the model (another model, width or dataset).
  """
  loaded = transfer.load_float_params(path, field="distill_from")
  variables = {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
  latent = transfer.latent_layers(loaded["params"])
  if latent:
    raise ValueError(f"distill_from: {path} is a quantized run (layer "
                     f"{'/'.join(latent[0])} holds latents); the teacher must be a float "
                     "run of the same model")
  want = _shapes({k: expected.get(k, {}) for k in variables})
  have = _shapes(variables)
  if want != have:
    differing = sorted(set(want.items()) ^ set(have.items()))[0][0]
    raise ValueError(f"distill_from: {path} does not fit the teacher model: variable "
                     f"{differing} is {have.get(differing, 'missing')} in the run, "
                     f"{want.get(differing, 'absent')} in the model (same model, width "
                     "and dataset needed)")
  return variables

