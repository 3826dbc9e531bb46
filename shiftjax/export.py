"""Trained flax ResNets <-> packed models: the bridge between ``shiftjax.models`` and
``shiftjax.deploy``.

``export(variables, model)`` reads a CIFAR, ImageNet or speech ResNet's architecture off
its module fields (``architecture_of``) and packs the variables (``deploy.pack``: BatchNorm
folded, N-bit codes in uint32 words). ``flax_module(packed)`` rebuilds the module a
packed model came from, for comparisons and fine-tuning. A training run's checkpoint is
exported by ``shiftjax.train.export_checkpoint`` (the ``experiments/export.py`` launcher).

Reading, writing and running packed models is ``shiftjax.deploy`` (``sj.deploy.load``,
``sj.deploy.packed_apply``), which needs neither flax nor the training stack.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from shiftjax.deploy import architecture
from shiftjax.deploy import folding
from shiftjax.deploy import PackedModel, PackedModelError
from shiftjax.models import quantization
from shiftjax.models import resnet_speech
from shiftjax.models.resnet_cifar import CifarResNet
from shiftjax.models.resnet_imagenet import ImageNetResNet
from shiftjax.models.resnet_speech import SpeechResNet


def _leaf_shape(tree) -> tuple[int, ...]:
  return tuple(jax.tree.leaves(tree)[0].shape)


def architecture_of(model: nn.Module, params) -> tuple[str, dict]:
  """(name, config) of a shiftjax ResNet module; ``params`` give the input channels."""
  _check_module(model)
  try:
    stem = params["stem"]["kernel"]
  except (KeyError, TypeError):
    raise PackedModelError("params have no 'stem/kernel': pass the variables of a "
                           "shiftjax ResNet ({'params': ..., 'batch_stats': ...})") from None
  # Every latent of a kernel, stacked or not, ends in (..., I, O).
  return architecture_config(model, _leaf_shape(stem)[-2])


def _check_module(model) -> None:
  if not isinstance(model, (CifarResNet, ImageNetResNet, SpeechResNet)):
    raise PackedModelError(f"export supports {', '.join(architecture.ARCHITECTURES)} "
                           f"modules, got {type(model).__name__}")


def architecture_config(model: nn.Module, in_channels: int) -> tuple[str, dict]:
  """(name, config) of a shiftjax ResNet module for inputs of ``in_channels``."""
  _check_module(model)
  common = {"num_classes": int(model.num_classes), "in_channels": int(in_channels),
            **architecture.policy_to_config(quantization.policy_of(model))}
  if isinstance(model, CifarResNet):
    name, config = "CifarResNet", dict(common, depth=int(model.depth),
                                       width_multiplier=float(model.width_multiplier))
  elif isinstance(model, SpeechResNet):
    name, config = "SpeechResNet", dict(
        common, stage_sizes=list(model.stage_sizes),
        widths=resnet_speech.stage_widths(model.widths, model.width_multiplier),
        stem_strides=list(model.stem_strides), first_stride=int(model.first_stride),
        pooling=model.pooling)
  else:
    name, config = "ImageNetResNet", dict(common, stage_sizes=list(model.stage_sizes),
                                          block=model.block)
  return name, architecture.check_architecture(name, config)


def export(variables: Mapping[str, Any], model: nn.Module, *, float_dtype=jnp.float32,
           metadata: Mapping[str, Any] | None = None,
           code_layout: str = "bitplanes") -> PackedModel:
  """Packs a trained shiftjax ResNet.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of ``model`` (jax or numpy).
    model: the ``CifarResNet``, ``ImageNetResNet`` or ``SpeechResNet`` module the
      variables belong to; its fields give the architecture, and the policy it was
      quantized with (``quantize_model``) the layers' weight and input specs.
    float_dtype: storage of the full-precision kernels: float32 or bfloat16.
    metadata: JSON-serializable facts to keep in the file.
    code_layout: ``'bitplanes'`` (exactly N bits per quantized weight) or ``'words'``
      (the layout ``shiftjax.kernels`` reads, ``floor(32 / N)`` codes per word).
  Returns:
    a checked ``PackedModel``.
  """
  name, config = architecture_of(model, variables["params"])
  return folding.pack(variables, name, config, quantization.policy_of(model).quantizer,
                      float_dtype=float_dtype,
                      metadata=metadata, code_layout=code_layout)


def flax_module(packed: PackedModel) -> nn.Module:
  """The flax module ``packed`` was exported from (for comparisons and fine-tuning)."""
  c = packed.config
  policy = architecture.policy_from_config(c, packed.quantizer)
  if packed.architecture == "CifarResNet":
    model = CifarResNet(depth=c["depth"], width_multiplier=c["width_multiplier"],
                        num_classes=c["num_classes"])
  elif packed.architecture == "SpeechResNet":
    model = SpeechResNet(stage_sizes=tuple(c["stage_sizes"]), widths=tuple(c["widths"]),
                         stem_strides=tuple(c["stem_strides"]),
                         first_stride=c["first_stride"], pooling=c["pooling"],
                         num_classes=c["num_classes"])
  else:
    model = ImageNetResNet(stage_sizes=tuple(c["stage_sizes"]), block=c["block"],
                           num_classes=c["num_classes"])
  return quantization.shift_model(model, policy=policy)
