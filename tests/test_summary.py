"""summarize: per-layer specs, sizes and multiply-accumulates of a quantized model."""

from flax import nnx
import jax.numpy as jnp
import pytest

import shiftjax as sj
from shiftjax.policy import LayerPolicy
from tiny_models import X, LinenMLP, NnxMLP, LinenTinyViT, IMAGES

POLICY = LayerPolicy(sj.DenseShift(3), full_precision=("head",),
                     layer_quantizers=(("fc1", sj.DenseShift(2)),))


@pytest.mark.parametrize("model", [LinenMLP(), NnxMLP(nnx.Rngs(0))], ids=["linen", "nnx"])
def test_mlp_summary_counts_by_hand(model):
  summary = sj.summarize(sj.quantize_model(model, POLICY), X)
  fc1, head = sorted(summary.layers, key=lambda l: l.path)
  # fc1: 5x16 weights at 2 bits = 20 bytes, 16 float32 biases; 4 rows x 5 x 16 MACs.
  assert (fc1.path, fc1.kind, fc1.weight_spec, fc1.bits) == ("fc1", "Dense", "DenseShift 2-bit", 2)
  assert (fc1.params, fc1.stored_bytes, fc1.macs) == (96, 20 + 64, 4 * 5 * 16)
  assert (head.weight_spec, head.bits, head.params, head.stored_bytes, head.macs) == (
      "float", 32, 51, 4 * 51, 4 * 16 * 3)
  assert summary.other_params == 32  # LayerNorm scale and bias
  assert summary.float32_bytes == 4 * (96 + 51 + 32)
  assert summary.packed_bytes == 84 + 204 + 128
  assert summary.shift_mac_share == pytest.approx(320 / (320 + 192))
  text = str(summary)
  assert "fc1" in text and "DenseShift 2-bit" in text and "62.5 % of them shift-adds" in text


def test_conv_attention_and_einsum_macs_and_a_float_model():
  summary = sj.summarize(LinenTinyViT(), IMAGES)  # float: every layer 32 bits
  by_path = {l.path: l for l in summary.layers}
  assert set(by_path) == {"patch_embed", "attention/query", "attention/key",
                          "attention/value", "attention/out", "mix", "head"}
  # patch conv: 2 images x 2x2 positions x 8 channels, each 2x2x3 MACs.
  assert by_path["patch_embed"].macs == 2 * 4 * 8 * 12
  # query: 2 x 4 tokens x (2 heads x 4) outputs, each 8 MACs; Einsum btd,de->bte likewise.
  assert by_path["attention/query"].macs == by_path["mix"].macs == 2 * 4 * 8 * 8
  assert summary.shift_mac_share == 0 and summary.compression == 1


def test_zoo_resnets_explicit_shift_layers_are_summarized():
  model = sj.models.resnet8(num_classes=10, quantizer=sj.DenseShift(3))
  summary = sj.summarize(model, jnp.zeros((1, 28, 28, 1)), train=False)
  by_path = {l.path: l for l in summary.layers}
  assert by_path["stem"].bits == 32 and by_path["head"].bits == 32  # the reference's float ends
  conv = by_path["stage1_block0/conv1"]
  assert (conv.kind, conv.bits, conv.params, conv.stored_bytes) == ("Conv", 3, 2304, 864)
  assert conv.macs == 28 * 28 * 16 * 9 * 16
