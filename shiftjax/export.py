"""Packed files of the zoo's ResNets: export (format version 4) and loading of every version.

A zoo ResNet is a flax model like any other: ``export`` packs it with
``deploy.pack_model`` (BatchNorm folded into each quantized conv's epilogue, codes at
exactly N bits) and records the constructor arguments in the file's metadata
(``'architecture'``), so that ``load`` rebuilds the module and runs the file through the
ResNet's own code. Packed ResNets of format versions 1-3 (a flax-free description of
the network in the file) are read by ``deploy.load`` and turned into version 4 by
``upgrade``, which maps their arrays onto the same module's variables: the flax module is
the one description of each ResNet.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shiftjax import interception
from shiftjax.deploy import resnet_config
from shiftjax.deploy import spec_json
from shiftjax.deploy import norm_folding
from shiftjax.deploy import packed_layers
from shiftjax.deploy.format import PackedModel, PackedModelError, load as load_file
from shiftjax.deploy.packed_tree import CODES, VARIABLES, LayerEntry, PackedTree
from shiftjax.models import quantization
from shiftjax.models import resnet_speech
from shiftjax.models.resnet_cifar import CifarResNet
from shiftjax.models.resnet_imagenet import ImageNetResNet
from shiftjax.models.resnet_speech import SpeechResNet

# Spatial size of the input a ResNet is traced with to find its layers (any size above
# the network's total stride of 32 gives the same layers).
_TRACE_SIZE = 64


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
    raise PackedModelError(f"export supports {', '.join(resnet_config.ARCHITECTURES)} "
                           f"modules, got {type(model).__name__} (any other model: "
                           "shiftjax.deploy.pack_model and save_model)")


def architecture_config(model: nn.Module, in_channels: int) -> tuple[str, dict]:
  """(name, config) of a shiftjax ResNet module for inputs of ``in_channels``."""
  _check_module(model)
  common = {"num_classes": int(model.num_classes), "in_channels": int(in_channels),
            **resnet_config.policy_to_config(quantization.policy_of(model))}
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
  return name, resnet_config.check_architecture(name, config)


def _example_input(in_channels: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, _TRACE_SIZE, _TRACE_SIZE, in_channels), jnp.float32)


def export(variables: Mapping[str, Any], model: nn.Module, *, float_dtype=jnp.float32,
           metadata: Mapping[str, Any] | None = None) -> PackedTree:
  """Packs a trained shiftjax ResNet as a format version 4 file's contents.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of ``model`` (jax or numpy).
    model: the quantized ``CifarResNet``, ``ImageNetResNet`` or ``SpeechResNet`` module
      (``quantize_model``'s) the variables belong to.
    float_dtype: storage of the float layers' kernels (the stem's, the head's): float32
      or bfloat16.
    metadata: JSON-serializable facts to keep in the file.
  Returns:
    the checked ``PackedTree``; its metadata's ``'architecture'`` rebuilds the module.
  """
  name, config = architecture_of(model, variables["params"])
  float_dtype = jnp.dtype(float_dtype)
  if float_dtype not in (jnp.float32, jnp.bfloat16):
    raise PackedModelError(f"float_dtype must be float32 or bfloat16, got {float_dtype}")
  x = jnp.zeros(_example_input(config["in_channels"]).shape)
  packed, packed_variables = packed_layers.pack_model(model, jax.device_get(variables), x,
                                                      train=False)
  tree = packed_layers.to_tree(packed, packed_variables, metadata={
      **(metadata or {}),
      "architecture": _architecture_json(name, config, quantization.policy_of(model).quantizer)})
  if float_dtype != jnp.float32:
    tree.arrays.update({k: np.asarray(v, float_dtype) for k, v in tree.arrays.items()
                        if k.startswith(VARIABLES + "params/") and k.endswith("/kernel")})
  tree.check()
  return tree


def _architecture_json(name: str, config: Mapping[str, Any], quantizer) -> dict:
  """The metadata ``flax_module`` rebuilds a ResNet from."""
  return {"name": name, "config": dict(config),
          "quantizer": spec_json.quantizer_to_json(quantizer)}


def flax_module(source: PackedModel | PackedTree) -> nn.Module:
  """The quantized flax ResNet a packed file was exported from: a version 1-3
  ``PackedModel``, or a ``PackedTree`` that ``export`` wrote."""
  if isinstance(source, PackedTree):
    arch = source.metadata.get("architecture")
    if not isinstance(arch, dict) or set(arch) != {"name", "config", "quantizer"}:
      raise PackedModelError(
          f"the file holds a {source.model} without a zoo ResNet's 'architecture' "
          "metadata: build the model and load it with shiftjax.deploy.load_model")
    name = arch["name"]
    config = resnet_config.check_architecture(name, arch["config"])
    quantizer = spec_json.quantizer_from_json(arch["quantizer"])
  else:
    name, config, quantizer = source.architecture, source.config, source.quantizer
  policy = resnet_config.policy_from_config(config, quantizer)
  if name == "CifarResNet":
    model = CifarResNet(depth=config["depth"], width_multiplier=config["width_multiplier"],
                        num_classes=config["num_classes"])
  elif name == "SpeechResNet":
    model = SpeechResNet(stage_sizes=tuple(config["stage_sizes"]),
                         widths=tuple(config["widths"]),
                         stem_strides=tuple(config["stem_strides"]),
                         first_stride=config["first_stride"], pooling=config["pooling"],
                         num_classes=config["num_classes"])
  else:
    model = ImageNetResNet(stage_sizes=tuple(config["stage_sizes"]), block=config["block"],
                           num_classes=config["num_classes"])
  return quantization.shift_model(model, policy=policy)


def load(source) -> tuple[nn.Module, dict]:
  """A packed ResNet file of any version (path, ``PackedModel`` or ``PackedTree``) as
  ``(packed_module, variables)``: ``packed_module.apply(variables, images, train=False)``
  gives its logits, through the ResNet's own code on the packed codes."""
  packed = load_file(source) if not isinstance(source, (PackedModel, PackedTree)) else source
  tree = upgrade(packed) if isinstance(packed, PackedModel) else packed
  return packed_layers.load_model(tree, flax_module(tree))


# ---------------------------------------------------------------- versions 1-3 -> 4


def upgrade(packed: PackedModel) -> PackedTree:
  """A packed ResNet of format version 1-3 as a version 4 ``PackedTree`` with the same
  codes, folded scales and biases: identical logits, through the flax module.

  The file's layers are checked against the module's (paths, kernel shapes, weight and
  input specs); which BatchNorm each conv folded is found by tracing the module, as
  ``pack_model`` finds it.
  """
  model = flax_module(packed)
  x = _example_input(packed.config["in_channels"])
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  with interception.record_calls() as record:
    jax.eval_shape(functools.partial(model.apply, train=False), abstract, x)
  file_layers = {l.name: l for l in packed.layers}
  _check_same_layers(file_layers, record.layers)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  folds, _ = norm_folding.find_foldable(model, zeros, list(file_layers),
                                        (jnp.zeros(x.shape),), {"train": False})
  norm_of = {f.layer: f for f in folds}
  missing = sorted(n for n, l in file_layers.items() if l.op == "conv" and n not in norm_of)
  if missing:
    raise PackedModelError(f"convs {missing} have no BatchNorm to carry their folded "
                           "scale and bias in the flax module")
  layers, arrays = {}, {}
  for name, layer in file_layers.items():
    get = lambda suffix, name=name: np.asarray(packed.arrays[f"{name}/{suffix}"])  # pylint: disable=cell-var-from-loop
    if layer.activation is not None:
      for param in layer.activation.param_shapes():
        arrays[f"{VARIABLES}params/{name}/activation/{param}"] = get(f"activation_{param}")
    fold = norm_of.get(name)
    kind = "Conv" if layer.op == "conv" else "Dense"
    if layer.quantized:
      arrays[CODES + name] = _bitplanes(packed, layer)
    else:  # the file's float kernel has its BatchNorm's scale in it already
      arrays[f"{VARIABLES}params/{name}/kernel"] = get("kernel")
    if fold:
      scale = get("scale") if layer.quantized else np.ones_like(get("bias"))
      arrays[f"{VARIABLES}{norm_folding.FOLDED_COLLECTION}/{name}/scale"] = scale
      arrays[f"{VARIABLES}{norm_folding.FOLDED_COLLECTION}/{name}/bias"] = get("bias")
    else:
      arrays[f"{VARIABLES}params/{name}/bias"] = get("bias")
    if layer.quantized or fold or layer.activation is not None:
      layers[name] = LayerEntry(kind, layer.quantizer, layer.shape, layer.activation,
                                fold.norm if fold else None)
  tree = PackedTree("linen", packed_layers.class_name(interception.user_class(type(model))),
                    layers, arrays, {**packed.metadata, "architecture": _architecture_json(
                        packed.architecture, packed.config, packed.quantizer)})
  tree.check()
  return tree


def _check_same_layers(file_layers, traced) -> None:
  if set(file_layers) != set(traced):
    raise PackedModelError(
        f"the file's layers {sorted(set(file_layers) - set(traced))} are not in the "
        f"module, and its layers {sorted(set(traced) - set(file_layers))} not in the file")
  for name, layer in file_layers.items():
    record = traced[name]
    if (tuple(layer.shape), layer.quantizer, layer.activation) != (
        tuple(record.kernel_shape), record.weight_spec, record.input_spec):
      raise PackedModelError(
          f"layer {name!r} is {list(layer.shape)}, {layer.quantizer}, input "
          f"{layer.activation} in the file but {list(record.kernel_shape)}, "
          f"{record.weight_spec}, input {record.input_spec} in the module")


def _bitplanes(packed: PackedModel, layer) -> np.ndarray:
  """A quantized layer's codes as bit planes: version 2-3 files hold them so already,
  version 1 files in the kernels' words (``packed_layers.kernel_words``' layout)."""
  words = np.asarray(packed.arrays[f"{layer.name}/kernel"])
  if packed.code_layout == "bitplanes":
    return words
  return packed_layers.bitplanes(words, LayerEntry("", layer.quantizer, layer.shape))
