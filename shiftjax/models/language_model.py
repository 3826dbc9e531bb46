"""A small byte-level causal transformer language model: plain float Flax NNX.

No shiftjax layer and no quantization here: every weight matmul is an ``nnx.Linear`` so
that a rule-based quantizer can take the model as a user's own and swap them by module
path. The paths (``TransformerLM(LMConfig())``, 4 blocks):

  embed                                        nnx.Embed, table [256, d]
  blocks/{i}/attention/{query,key,value,out}   nnx.Linear, kernel [d, d]
  blocks/{i}/mlp/fc1, blocks/{i}/mlp/fc2       nnx.Linear, [d, mlp_dim] and [mlp_dim, d]
  head                                         nnx.Linear, [d, 256] (untied from embed)

Besides them: ``pos_embed`` (learned positions [context_length, d]), LayerNorms
``blocks/{i}/norm1``, ``blocks/{i}/norm2`` and ``norm``. The attention's score and value
products multiply activations by activations, not weights: they stay float.

Decoding keeps a key/value cache of fixed size (per layer [B, heads, max_len, head_dim]
each), written in place with ``lax.dynamic_update_slice``, so one compiled step serves
every position. The layout is the one the attention products read (heads before
positions) and each layer has its own arrays: a [B, max_len, heads, head_dim] cache, or
one stacked over layers, made XLA copy the whole cache on every step (at batch 8, more
bytes than the weights). At batch 1-8 each decode step reads every weight once for a few rows of
activations: the memory-bound regime where packed low-bit weights pay.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB_SIZE = 256  # bytes

# A cache: one {'key': [B, heads, max_len, head_dim], 'value': same} per layer.
Cache = list[dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes of a ``TransformerLM``. The defaults train on a 2-core CPU.

  The defaults hold 1,927,552 parameters (7.7 MB of float32). Measured on the shared
  2-core machine (other jobs running, load 3-6): an adam step on 2,048 tokens (B 16 x T
  128, or B 8 x T 256) 0.47-1.2 s; 170 s of adam at 2e-3 (B 16, T 128, 319 steps) went
  from 8 to 3.31 bits per byte (validation 3.36), while a smaller model (d 128, 2 layers,
  MLP 512, T 64, B 32, lr 3e-3) reached 2.07 (validation 2.25) in 829 steps. A greedy
  decode step over a 236-token cache: 0.31 ms at batch 1 (25 GB/s of weights), 0.86 ms
  at batch 8.

  Attributes:
    context_length: longest sequence (positions learned up to it).
    d_model: token width d.
    num_layers: transformer blocks.
    num_heads: attention heads; must divide ``d_model``.
    mlp_dim: hidden width of each block's MLP.
    vocab_size: 256 for bytes.
  """
  context_length: int = 256
  d_model: int = 192
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 768
  vocab_size: int = VOCAB_SIZE

  def __post_init__(self):
    for name in ("context_length", "d_model", "num_layers", "num_heads", "mlp_dim",
                 "vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} does not divide d_model {self.d_model}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
            k_positions: jax.Array) -> jax.Array:
  """Causal attention: q [B, H, T, Dh], k/v [B, H, S, Dh] -> [B, H, T, Dh].

  Query at position p sees the keys at positions <= p (so unwritten cache slots, at
  positions past every query, are never seen).
  """
  scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
  visible = k_positions[None, :] <= q_positions[:, None]  # [T, S]
  # finfo.min, not -inf: a fully masked row cannot occur, but -inf would turn one into NaN.
  scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(scores, axis=-1), v)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with ``nnx.Linear`` query/key/value/out."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.num_heads = config.num_heads
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    """[B, T, d] -> [B, H, T, Dh]."""
    return x.reshape(x.shape[:2] + (self.num_heads, -1)).transpose(0, 2, 1, 3)

  def __call__(self, x: jax.Array, cache_kv: tuple[jax.Array, jax.Array] | None = None,
               start: jax.Array | int = 0):
    """x [B, T, d] at positions ``start .. start + T - 1``.

    Without a cache the keys are x's own (``start`` must be 0); returns [B, T, d]. With
    ``cache_kv`` (key, value [B, H, S, Dh]) x's keys and values are written at ``start``
    and the queries attend the whole cache; returns ([B, T, d], updated (key, value)).
    """
    q, k, v = (self._heads(f(x)) for f in (self.query, self.key, self.value))
    q_positions = start + jnp.arange(x.shape[1])
    if cache_kv is None:
      y = _attend(q, k, v, q_positions, q_positions)
    else:
      at = (0, 0, start, 0)
      cache_kv = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), at)
                       for c, new in zip(cache_kv, (k, v)))
      y = _attend(q, *cache_kv, q_positions, jnp.arange(cache_kv[0].shape[2]))
    y = self.out(y.transpose(0, 2, 1, 3).reshape(x.shape[:2] + (-1,)))
    return y if cache_kv is None else (y, cache_kv)


class MLP(nnx.Module):
  """``fc2(gelu(fc1(x)))``: [..., d] -> [..., d]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(config.d_model, config.mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(config.mlp_dim, config.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LayerNorm decoder block: [B, T, d] -> [B, T, d] (and the cache, given one)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.attention = CausalSelfAttention(config, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, cache_kv=None, start=0):
    y = self.attention(self.norm1(x), cache_kv, start)
    if cache_kv is not None:
      y, cache_kv = y
    x = x + y
    x = x + self.mlp(self.norm2(x))
    return x if cache_kv is None else (x, cache_kv)


class TransformerLM(nnx.Module):
  """Decoder-only causal transformer over bytes.

  ``model(tokens)``: tokens int [B, T] (T <= context_length) -> logits [B, T, vocab],
  where position t sees tokens 0..t. ``init_cache`` and ``extend``/``decode_step`` decode
  incrementally with the same logits.
  """

  def __init__(self, config: LMConfig = LMConfig(), *, rngs: nnx.Rngs):
    self.config = config
    d = config.d_model
    self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (config.context_length, d)))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, config.vocab_size, rngs=rngs)

  def _check_length(self, end: int) -> None:
    if end > self.config.context_length:
      raise ValueError(f"sequence of length {end} exceeds context_length "
                       f"{self.config.context_length}")

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens int [B, T] -> logits [B, T, vocab] (float32)."""
    self._check_length(tokens.shape[1])
    x = self.embed(tokens) + self.pos_embed[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))

  def init_cache(self, batch_size: int, max_len: int | None = None,
                 dtype=jnp.float32) -> Cache:
    """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens
    (default: context_length): per layer ``{'key', 'value'}`` each [B, H, max_len, Dh]."""
    max_len = self.config.context_length if max_len is None else max_len
    self._check_length(max_len)
    c = self.config
    shape = (batch_size, c.num_heads, max_len, c.head_dim)
    return [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
            for _ in range(c.num_layers)]

  def extend(self, tokens: jax.Array, cache: Cache, position: jax.Array | int
             ) -> tuple[jax.Array, Cache]:
    """Feeds tokens int [B, T] at positions ``position .. position + T - 1`` (a traced
    scalar is fine) after the ``position`` tokens already in ``cache``.

    Returns logits [B, T, vocab] and the cache holding the new keys and values. The
    caller keeps ``position + T <= max_len``: under ``jit`` it cannot be checked, and a
    write past the end is clamped by ``dynamic_update_slice`` (wrong, not an error).
    """
    positions = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], position, tokens.shape[1])
    x = self.embed(tokens) + positions
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, (k, v) = block(x, (layer_cache["key"], layer_cache["value"]), position)
      new_cache.append({"key": k, "value": v})
    return self.head(self.norm(x)), new_cache

  def decode_step(self, tokens_t: jax.Array, cache: Cache, position: jax.Array | int
                  ) -> tuple[jax.Array, Cache]:
    """One token per sequence, tokens_t int [B], at ``position`` -> (logits [B, vocab],
    cache)."""
    logits, cache = self.extend(tokens_t[:, None], cache, position)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _generate(graphdef, state, prompt, num_tokens):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + num_tokens)
  logits, cache = model.extend(prompt, cache, 0)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, position):
    token, cache = carry
    logits, cache = model.decode_step(token, cache, position)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (token, cache), token

  positions = prompt.shape[1] + jnp.arange(num_tokens - 1)
  _, rest = jax.lax.scan(step, (first, cache), positions)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: TransformerLM, prompt_tokens, num_tokens: int) -> jax.Array:
  """Greedy decoding: prompt int [B, P] (P >= 1) -> the next ``num_tokens`` tokens [B,
  num_tokens] (int32), each the argmax after the prompt and the tokens before it.

  One compiled call per (model structure, shapes): the prompt runs through ``extend`` at
  once (prefill), then a ``lax.scan`` of ``decode_step`` over a cache of P + num_tokens.
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be [B, P] with P >= 1, got shape {prompt.shape}")
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  model._check_length(prompt.shape[1] + num_tokens)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, num_tokens)


def next_byte_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte cross entropy in nats: logits [B, T, V], targets int [B, T] -> []."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


def bits_per_byte(nats: jax.Array | float) -> jax.Array | float:
  """Cross entropy per byte in nats -> bits per byte."""
  return nats / math.log(2)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _summed_loss(graphdef, state, inputs, targets):
  logits = nnx.merge(graphdef, state)(inputs)
  return next_byte_loss(logits, targets) * targets.size


def evaluate_bits_per_byte(model: TransformerLM, batches: Iterable[dict]) -> float:
  """Bits per byte over every target of ``batches`` (dicts with ``'inputs'`` and
  ``'targets'`` [B, T], e.g. ``shiftjax.data.text.sequential_windows``)."""
  graphdef, state = nnx.split(model)
  nats, count = 0.0, 0
  for batch in batches:
    nats += float(_summed_loss(graphdef, state, jnp.asarray(batch["inputs"]),
                               jnp.asarray(batch["targets"])))
    count += np.size(batch["targets"])
  if not count:
    raise ValueError("evaluate_bits_per_byte got no batches")
  return bits_per_byte(nats / count)
