"""Model zoo: CIFAR, ImageNet and speech ResNets whose convs are shift convs; and plain
float models that are not ResNets (a linen ViT, an NNX byte-level transformer LM), which
become shift models through rule-based quantization of their standard Flax layers."""

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
  """Builds a model by name, e.g. ``get('resnet20', num_classes=10, quantizer=q)``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
  return MODELS[name](**kwargs)
