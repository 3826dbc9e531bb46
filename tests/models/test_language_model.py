"""The byte-level NNX transformer LM: paths, causality, KV-cache decoding, loss, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shiftjax.data import text
from shiftjax.models import language_model as lm

TINY = lm.LMConfig(context_length=16, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)


def tiny_model(seed=0):
  return lm.TransformerLM(TINY, rngs=nnx.Rngs(seed))


def random_tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=shape), jnp.int32)


def module_paths(model, kind):
  return {"/".join(map(str, path)) for path, m in nnx.iter_graph(model)
          if isinstance(m, kind)}


def test_logits_shape_and_dtype():
  logits = nnx.jit(lambda m, s: m(s))(tiny_model(), random_tokens((3, 11)))
  assert logits.shape == (3, 11, 256) and logits.dtype == jnp.float32


def test_every_weight_matmul_is_an_nnx_linear_at_a_documented_path():
  model = tiny_model()
  linears = {f"blocks/{i}/{name}" for i in range(2)
             for name in ("attention/query", "attention/key", "attention/value",
                          "attention/out", "mlp/fc1", "mlp/fc2")} | {"head"}
  assert module_paths(model, nnx.Linear) == linears
  assert module_paths(model, nnx.Embed) == {"embed"}
  # Nothing else holds a weight matrix: the rest are norms and the position table.
  params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  others = {p.rsplit("/", 1)[0] for p in params} - linears - {"embed", "pos_embed"}
  assert others == {"norm", "blocks/0/norm1", "blocks/0/norm2", "blocks/1/norm1",
                    "blocks/1/norm2"}


def test_default_config_size():
  model = nnx.eval_shape(lambda: lm.TransformerLM(rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == 1_927_552


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
  forward = nnx.jit(lambda m, s: m(s))
  model = tiny_model()
  tokens = random_tokens((2, 12))
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_token_by_token_decoding_matches_the_full_forward():
  model = tiny_model()
  tokens = random_tokens((2, 16))
  full = model(tokens)
  step = jax.jit(lambda state, t, cache, pos: nnx.merge(graphdef, state).decode_step(
      t, cache, pos))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2)
  for position in range(16):
    logits, cache = step(state, tokens[:, position], cache, position)
    np.testing.assert_allclose(logits, full[:, position], rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_matches_the_full_forward():
  @nnx.jit  # one compilation instead of seconds of op-by-op dispatch
  def full_and_cached(model, tokens):
    cache = model.init_cache(3, max_len=10)
    prefill, cache = model.extend(tokens[:, :6], cache, 0)
    chunk, cache = model.extend(tokens[:, 6:9], cache, 6)
    step, _ = model.decode_step(tokens[:, 9], cache, 9)
    return model(tokens), prefill, chunk, step

  full, prefill, chunk, step = full_and_cached(tiny_model(), random_tokens((3, 10)))
  np.testing.assert_allclose(prefill, full[:, :6], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chunk, full[:, 6:9], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step, full[:, 9], rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_argmax_rollouts_of_the_full_forward():
  model = tiny_model(seed=1)
  prompt = random_tokens((2, 5), seed=2)
  generated = lm.generate(model, prompt, num_tokens=8)
  assert generated.shape == (2, 8) and generated.dtype == jnp.int32
  # The model is causal (tested above), so one compiled forward over a zero-padded
  # sequence of the final length gives every rollout step's logits.
  forward = nnx.jit(lambda m, s: m(s))
  sequence = jnp.zeros((2, 13), jnp.int32).at[:, :5].set(prompt)
  for t in range(5, 13):
    next_token = jnp.argmax(forward(model, sequence)[:, t - 1], axis=-1)
    sequence = sequence.at[:, t].set(next_token)
  np.testing.assert_array_equal(generated, sequence[:, 5:])


@pytest.mark.parametrize("call, message", [
    (lambda m: m(random_tokens((1, 17))), "length 17 exceeds context_length 16"),
    (lambda m: m.init_cache(1, 20), "length 20 exceeds context_length 16"),
    (lambda m: lm.generate(m, random_tokens((1, 10)), 7), "length 17 exceeds"),
    (lambda m: lm.generate(m, random_tokens((4,)), 2), r"\[B, P\].*got shape \(4,\)"),
    (lambda m: lm.generate(m, random_tokens((1, 3)), 0), "num_tokens must be >= 1, got 0"),
])
def test_bad_lengths_are_rejected_with_the_value(call, message):
  with pytest.raises(ValueError, match=message):
    call(tiny_model())


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30, num_heads=4), "num_heads 4 does not divide d_model 30"),
    (dict(num_layers=0), "num_layers must be >= 1, got 0"),
])
def test_bad_config_is_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lm.LMConfig(**kwargs)


def test_uniform_logits_cost_eight_bits_per_byte():
  logits = jnp.zeros((2, 5, 256))
  nats = lm.next_byte_loss(logits, random_tokens((2, 5)))
  np.testing.assert_allclose(nats, math.log(256), rtol=1e-6)
  np.testing.assert_allclose(lm.bits_per_byte(nats), 8.0, rtol=1e-6)


def test_evaluate_bits_per_byte_weighs_every_target_once():
  model = tiny_model()
  data = np.random.default_rng(0).integers(0, 256, size=180).astype(np.uint8)
  batches = list(text.sequential_windows(data, batch_size=4, seq_len=16))
  assert batches[-1]["inputs"].shape[0] < 4  # a partial last batch is weighed by size
  inputs = np.concatenate([b["inputs"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  logits = nnx.jit(lambda m, s: m(s))(model, jnp.asarray(inputs))
  expected = lm.bits_per_byte(lm.next_byte_loss(logits, targets))
  np.testing.assert_allclose(lm.evaluate_bits_per_byte(model, batches), expected,
                             rtol=1e-5)


def test_a_few_adam_steps_reduce_the_loss_on_a_tiny_batch():
  model = tiny_model()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  batch = next(text.random_windows(np.frombuffer(b"the cat sat on the mat. " * 20,
                                                 np.uint8), 4, 16, seed=0))

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(
        lambda m: lm.next_byte_loss(m(inputs), targets))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, batch["inputs"], batch["targets"]))
            for _ in range(5)]
  assert losses[-1] < losses[0] - 0.5, losses


def test_one_generated_token_is_the_argmax_after_the_prompt():
  model = tiny_model(seed=3)
  prompt = random_tokens((1, 4), seed=4)
  expected = jnp.argmax(nnx.jit(lambda m, s: m(s))(model, prompt)[:, -1], axis=-1)
  np.testing.assert_array_equal(lm.generate(model, prompt, 1), expected[:, None])


def test_cache_has_one_key_and_value_array_per_layer():
  cache = tiny_model().init_cache(batch_size=3, max_len=12)
  assert len(cache) == 2
  for layer in cache:
    assert layer["key"].shape == layer["value"].shape == (3, 4, 12, 8)  # [B, H, S, Dh]
