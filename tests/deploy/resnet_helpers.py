"""What the packed-ResNet tests under tests/deploy share (conftest.py's fixtures too)."""

import jax

EVAL_BATCH = 1000

# The policy fields of an architecture config with one quantizer and float activations.
NO_RULES = {"layer_quantizers": [], "activation": None, "layer_activations": []}


def rbg_key(seed):
  return jax.random.key(seed, impl="rbg")
