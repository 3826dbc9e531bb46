"""How the zoo's float ResNets become shift networks: through ``sj.quantize_model``.

The ResNets are plain float flax models (``nn.Conv``, ``nn.Dense``); their factories
(``resnet20(quantizer=...)``, ``models.get(name, policy=...)``) quantize them by rules
over module paths like any user's model. ``quantizer=`` is the papers' recipe: every
conv quantized but the stem, and the classifier float (``DEFAULT_FULL_PRECISION``);
``policy=`` says anything else (mixed widths, activation specs, other float layers).
"""

from __future__ import annotations

import flax.linen as nn

from shiftjax import interception
from shiftjax import quantizers as qz
from shiftjax.policy import DEFAULT_FULL_PRECISION, LayerPolicy


def shift_model(model: nn.Module, quantizer: qz.Quantizer | None = None,
                policy: LayerPolicy | None = None) -> nn.Module:
  """``model`` quantized by ``policy``, or by ``quantizer`` with the stem and head float;
  ``model`` itself when neither quantizes anything (a float model)."""
  if quantizer is not None and policy is not None:
    raise ValueError(f"give a quantizer or a policy, not both (got quantizer={quantizer!r} "
                     f"and policy={policy!r}); a policy's default spec is its quantizer")
  if policy is None:
    policy = LayerPolicy(quantizer, DEFAULT_FULL_PRECISION)
  return model if policy.is_float else interception.quantize_model(model, policy)


def policy_of(model: nn.Module) -> LayerPolicy:
  """The layer policy of a zoo model (a float model's: no quantizer, stem and head float)."""
  return interception.policy_of(model) or LayerPolicy(None, DEFAULT_FULL_PRECISION)
