"""What the packed-ResNet tests under tests/deploy share (conftest.py's fixtures too)."""

import jax

EVAL_BATCH = 1000

# The policy fields of an architecture config with one quantizer and float activations.
NO_RULES = {"layer_quantizers": [], "activation": None, "layer_activations": []}


def rbg_key(seed):
  return jax.random.key(seed, impl="rbg")


def packed_logits_fn(source):
  """A jitted ``images -> logits`` of a packed ResNet file (any version, or its tree),
  run through the ResNet's own flax code (``shiftjax.export.load``) with the convs'
  epilogues fused (``deploy.fuse_conv_epilogues``)."""
  from shiftjax import deploy, export  # pylint: disable=import-outside-toplevel
  model, variables = export.load(source)
  return jax.jit(deploy.fuse_conv_epilogues(
      lambda x: model.apply(variables, x, train=False)))
