"""Distillation from a float run: the soft-target loss and its gradient by hand, the
teacher's checks, and a distilled run's step against the objective written out."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs import default
from shiftjax import data as data_lib
from shiftjax import distill
from shiftjax import train


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


STUDENT = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]], np.float32)
TEACHER = np.array([[4.0, 0.0, -2.0], [-1.0, 3.0, 0.0]], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_loss_is_t_squared_kl_by_hand(temperature):
  p_t, p_s = _softmax(TEACHER / temperature), _softmax(STUDENT / temperature)
  expected = temperature ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
  np.testing.assert_allclose(distill.soft_target_loss(STUDENT, TEACHER, temperature),
                             expected, rtol=1e-5)
  # d/ds of T^2 KL(p_t || softmax(s / T)) is T (p_s - p_t); the mean divides by B.
  grad = jax.grad(distill.soft_target_loss)(jnp.asarray(STUDENT), TEACHER, temperature)
  np.testing.assert_allclose(grad, temperature * (p_s - p_t) / len(STUDENT), atol=1e-6)
  assert float(distill.soft_target_loss(TEACHER, TEACHER, temperature)) == pytest.approx(
      0.0, abs=1e-6)


def test_objective_mixes_the_two_losses_and_leaves_the_teacher_constant():
  d = distill.Distillation(weight=0.25, temperature=2.0)
  hard = 0.7
  expected = 0.75 * hard + 0.25 * distill.soft_target_loss(STUDENT, TEACHER, 2.0)
  np.testing.assert_allclose(d.objective(hard, STUDENT, TEACHER), expected, rtol=1e-6)
  teacher_grad = jax.grad(lambda t: d.objective(hard, STUDENT, t))(jnp.asarray(TEACHER))
  np.testing.assert_array_equal(teacher_grad, np.zeros_like(TEACHER))


@pytest.mark.parametrize("weight, temperature, message", [
    (0.0, 4.0, "distill_weight must be in \\(0, 1\\], got 0.0"),
    (1.5, 4.0, "distill_weight must be in \\(0, 1\\], got 1.5"),
    (0.5, 0.0, "distill_temperature must be positive, got 0.0"),
])
def test_bad_distillation_settings_are_refused(weight, temperature, message):
  with pytest.raises(ValueError, match=message.replace("distill_", "")):
    distill.Distillation(weight, temperature)
  config = tiny_config(distill_from="/nowhere", distill_weight=weight,
                       distill_temperature=temperature)
  with pytest.raises(ValueError, match="config." + message):
    train.validate_config(config)


# ------------------------------------------------------------------------------ runs


def tiny_config(**overrides):
  c = default.get_config()
  c.model = "resnet8"
  c.width_multiplier = 0.25
  c.dataset = "fashion_mnist"
  c.batch_size = 16
  c.eval_batch_size = 40
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.progress_bar = False
  c.update(overrides)
  return c


def mocked():
  return tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  with mocked():
    train.train_and_evaluate(tiny_config(quantizer="float"), workdir)
  return workdir


def test_a_distilled_step_minimizes_the_written_out_objective(float_run):
  config = tiny_config(quantizer="DenseShift", distill_from=float_run, distill_weight=0.5,
                       distill_temperature=3.0)
  spec = data_lib.get_spec(config.dataset)
  teacher_model, teacher = train.load_teacher(config, spec.image_shape)
  model = train.create_model(config, spec.num_classes)
  lr_fn = train.create_learning_rate_fn(config, 1, 4)
  state = train.create_train_state(train.init_key(0), config, model, spec.image_shape, lr_fn)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  step = train.step_function(
      config, model, lr_fn, teacher=lambda x: teacher_model.apply(teacher, x, train=False))
  # The logged loss is the objective at the step's parameters, written out here.
  images = data_lib.normalize(batch["image"], config.dataset)
  student_logits, _ = model.apply({"params": state.params, **state.state}, images,
                                  train=True, mutable=["batch_stats"])
  teacher_logits = teacher_model.apply(teacher, images, train=False)
  log_p = jax.nn.log_softmax(student_logits)
  hard = -np.mean(np.take_along_axis(np.asarray(log_p), batch["label"][:, None], 1))
  expected = 0.5 * hard + 0.5 * distill.soft_target_loss(student_logits, teacher_logits, 3.0)
  _, metrics = step(state, batch, jax.random.key(1))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # Without a teacher the same step logs the plain cross-entropy.
  _, plain_metrics = train.step_function(config, model, lr_fn)(state, batch, jax.random.key(1))
  np.testing.assert_allclose(plain_metrics["loss"], hard, rtol=1e-5)


@pytest.mark.slow  # a launcher end to end, three times (the step's objective is tested above)
def test_a_distilled_run_trains_resumes_bit_for_bit_and_names_its_teacher(float_run,
                                                                          tmp_path):
  config = tiny_config(quantizer="DenseShift", distill_from=float_run)
  with mocked():
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    train.train_and_evaluate(config, str(tmp_path / "split"), stop_after_steps=2)
    resumed = train.train_and_evaluate(config, str(tmp_path / "split"))
  assert whole["distilled_from"] == resumed["distilled_from"] == float_run
  assert whole["test_accuracy"] == resumed["test_accuracy"]
  whole_params = train.restore_variables(config, str(tmp_path / "whole"))[1]
  resumed_params = train.restore_variables(config, str(tmp_path / "split"))[1]
  for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(resumed_params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_quantized_or_mismatched_teacher_is_refused_before_training(float_run, tmp_path):
  quantized = str(tmp_path / "quantized")
  with mocked():
    train.train_and_evaluate(tiny_config(quantizer="DenseShift", num_train_steps=2),
                             quantized)
  with pytest.raises(ValueError, match="is a quantized run \\(layer .* holds latents\\)"):
    train.train_and_evaluate(tiny_config(distill_from=quantized), str(tmp_path / "a"))
  wider = tiny_config(distill_from=float_run, width_multiplier=0.5)
  with pytest.raises(ValueError, match="does not fit the teacher model: variable .* is "
                                       "\\(.*\\) in the run, \\(.*\\) in the model"):
    train.train_and_evaluate(wider, str(tmp_path / "b"))
  with pytest.raises(FileNotFoundError, match="distill_from: .* is not a directory"):
    train.train_and_evaluate(tiny_config(distill_from=str(tmp_path / "none")),
                             str(tmp_path / "c"))
  # Nothing was written for the refused runs.
  assert not any((tmp_path / name).exists() for name in "abc")
