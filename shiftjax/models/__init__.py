"""Model zoo: float CIFAR, ImageNet and speech ResNets, a linen ViT and an NNX
byte-level transformer LM. All are plain flax models that become shift models through
rule-based quantization of their standard layers (``sj.quantize_model``); the ResNet
factories do it for you (``resnet20(quantizer=...)``, ``get(name, policy=...)``)."""

from shiftjax.models.quantization import policy_of, shift_model
from shiftjax.models.resnet_cifar import (CifarResNet, resnet8, resnet14, resnet20, resnet32,
                                          resnet44, resnet56, resnet110)
from shiftjax.models.resnet_imagenet import ImageNetResNet, resnet18, resnet34, resnet50
from shiftjax.models.resnet_speech import SpeechResNet, speech_resnet, speech_resnet14
from shiftjax.models.vit import ViT, ViTConfig, vit_tiny
from shiftjax.models.language_model import (
    LMConfig, TransformerLM, bits_per_byte, evaluate_bits_per_byte, generate,
    next_byte_loss)

MODELS = {f.__name__: f for f in (resnet8, resnet14, resnet20, resnet32, resnet44, resnet56,
                                  resnet110, resnet18, resnet34, resnet50, speech_resnet,
                                  speech_resnet14)}


def get(name: str, **kwargs):
  """Builds a model by name, e.g. ``get('resnet20', num_classes=10, quantizer=q)`` or
  ``get('resnet20', policy=sj.LayerPolicy(...))``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
  return MODELS[name](**kwargs)
