"""The packed model file (``shiftjax.deploy.format``): round trip, size, refusal of
truncated, flipped, unsupported, inconsistent and foreign files, no code run on load,
atomic writes, and the golden files of versions 1-3, which load, become version 4 and
give their logits through the ResNet's flax module.

The trained model and its file are conftest.py's session fixtures.
"""

import ast
import glob
import hashlib
import json
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest

import shiftjax as sj
from resnet_helpers import NO_RULES, packed_logits_fn
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import models


# ------------------------------------------------------------------------------ helpers


def split_file(buf):
  """The documented layout (version 4, laid out as 2 and 3), parsed independently of
  shiftjax.deploy."""
  magic, version, header_len = struct.unpack_from("<8sIQ", buf, 0)
  assert magic == b"SHIFTJAX" and version in (2, 3, 4)
  header = json.loads(buf[20:20 + header_len])
  head_end = 20 + header_len
  assert buf[head_end:head_end + 32] == hashlib.sha256(buf[:head_end]).digest()
  start = -(-(head_end + 32) // 64) * 64
  assert buf[head_end + 32:start] == b"\0" * (start - head_end - 32)
  data = buf[start:len(buf) - 32]
  for e in header["arrays"]:
    raw = data[e["offset"]:e["offset"] + e["nbytes"]]
    assert zlib.crc32(raw) == e["crc32"]
  return version, header, data


def join_file(version, header, data):
  head = json.dumps(header, separators=(",", ":")).encode()  # compact, as save writes
  body = struct.pack("<8sIQ", b"SHIFTJAX", version, len(head)) + head
  body += hashlib.sha256(body).digest()
  body += b"\0" * (-len(body) % 64) + data
  return body + hashlib.sha256(body).digest()


# ------------------------------------------------------------------------- file format


def test_round_trip_keeps_arrays_and_metadata_exactly(packed, model_file):
  loaded = deploy.load(model_file)
  assert loaded.framework == "linen" and loaded.model == (
      "shiftjax.models.resnet_cifar.CifarResNet")
  assert loaded.layers == packed.layers and loaded.metadata == packed.metadata
  assert loaded.metadata["architecture"] == {
      "name": "CifarResNet", "quantizer": loaded.metadata["architecture"]["quantizer"],
      "config": {"depth": 8, "num_classes": 10, "width_multiplier": 0.5, "in_channels": 1,
                 "full_precision": ["stem", "head"], **NO_RULES}}
  module = ex.flax_module(loaded)
  assert isinstance(module, models.CifarResNet)
  assert (module.depth, module.width_multiplier) == (8, 0.5)
  assert models.policy_of(module) == sj.LayerPolicy(sj.DenseShift(3), ("stem", "head"))
  assert list(loaded.arrays) == list(packed.arrays)
  for name, a in packed.arrays.items():
    b = loaded.arrays[name]
    assert b.dtype == a.dtype and b.shape == a.shape, name
    np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))
  buf = open(model_file, "rb").read()
  assert buf == packed.to_bytes()
  assert join_file(*split_file(buf)) == buf  # the module docstring's layout is the file's


def test_size_report_counts_bits_per_weight(packed, model_file):
  # Bit planes: exactly 3 bits per weight (every kernel's size is a multiple of 32).
  report = packed.size_report()
  assert report["bits_per_quantized_weight"] == 3.0
  assert report["quantized_weights"] == sum(
      np.prod(e.kernel_shape) for e in packed.quantized_layers.values())
  assert os.path.getsize(model_file) < report["float32_weight_bytes"] / 4


@pytest.mark.parametrize("where", ["data", "header", "prefix", "checksum"])
def test_truncated_file_is_refused(model_file, tmp_path, where):
  buf = open(model_file, "rb").read()
  _, header, _ = split_file(buf)
  cut = {"data": len(buf) - 100, "header": 200, "prefix": 10,
         "checksum": len(buf) - 5}[where]
  path = tmp_path / "cut.shiftjax"
  path.write_bytes(buf[:cut])
  expected = f"truncated at byte {cut} (expected {len(buf)})" if where in (
      "data", "checksum") else f"truncated at byte {cut} (expected at least"
  with pytest.raises(deploy.PackedModelError, match=re.escape(expected)):
    deploy.load(path)
  assert header["data_bytes"] > 0


def _layout(buf):
  """(end of the header, start of the data, {array name: (start, end)}) of a file."""
  _, header_len = struct.unpack_from("<IQ", buf, 8)
  head_end = 20 + header_len
  start = -(-(head_end + 32) // 64) * 64
  header = json.loads(buf[20:head_end])
  return head_end, start, {e["name"]: (start + e["offset"], start + e["offset"] + e["nbytes"])
                           for e in header["arrays"]}


CODES, BIAS = "codes/stage2_block0/conv1", "variables/params/head/bias"


@pytest.mark.parametrize("position", ["header", "header_digest", "kernel", "bias",
                                      "padding", "digest"])
def test_flipped_byte_is_refused_naming_where(model_file, tmp_path, position):
  buf = bytearray(open(model_file, "rb").read())
  head_end, _, spans = _layout(bytes(buf))
  kernel, bias = spans[CODES], spans[BIAS]
  ordered = sorted(spans.values())
  gap = next(end for (_, end), (start, _) in zip(ordered, ordered[1:]) if end < start)
  index = {"header": 40, "header_digest": head_end + 7, "kernel": kernel[0] + 5,
           "bias": bias[1] - 1, "padding": gap, "digest": len(buf) - 1}[position]
  buf[index] ^= 0x10
  path = tmp_path / "flipped.shiftjax"
  path.write_bytes(bytes(buf))
  expected = {
      "header": f"header corrupted: the SHA-256 of bytes 0..{head_end} differs",
      "header_digest": f"header corrupted: the SHA-256 of bytes 0..{head_end} differs",
      "kernel": f"array '{CODES}' is corrupted: its bytes "
                f"{kernel[0]}..{kernel[1]} do not match its CRC-32",
      "bias": f"array '{BIAS}' is corrupted: its bytes {bias[0]}..{bias[1]}",
      "padding": f"corrupted padding: byte {index} is 16, expected 0",
      "digest": f"checksum corrupted: bytes {len(buf) - 32}..{len(buf)}",
  }[position]
  with pytest.raises(deploy.PackedModelError, match=re.escape(expected)):
    deploy.load(path)


def test_unsupported_version_is_refused(model_file, tmp_path):
  _, header, data = split_file(open(model_file, "rb").read())
  path = tmp_path / "v5.shiftjax"
  path.write_bytes(join_file(5, header, data))
  with pytest.raises(deploy.PackedModelError,
                     match="unsupported format version 5 at byte 8 .* reads versions 1, 2, 3, 4"):
    deploy.load(path)


def test_not_a_model_file_is_refused(tmp_path):
  path = tmp_path / "other.shiftjax"
  path.write_bytes(b"PK\x03\x04" + bytes(100))
  with pytest.raises(deploy.PackedModelError, match="not a shiftjax packed model"):
    deploy.load(path)


def _rewritten(source, tmp_path, edit):
  version, header, data = split_file(open(source, "rb").read())
  edit(header)
  path = tmp_path / "edited.shiftjax"
  path.write_bytes(join_file(version, header, data))
  return path


def _entry(header, name):
  return next(e for e in header["arrays"] if e["name"] == name)


@pytest.mark.parametrize("edit, message", [
    # An array's declared shape (same byte count) disagrees with its layer.
    (lambda h: _entry(h, CODES).update(shape=_entry(h, CODES)["shape"][::-1]),
     "layer 'stage2_block0/conv1' codes have shape (3, 36) of uint32, expected (36, 3)"),
    (lambda h: h["layers"]["stage2_block0/conv1"].update(kernel_shape=[3, 3, 8, 9]),
     "expected (21, 3) of uint32 (3-bit planes of [3, 3, 8, 9])"),
    (lambda h: _entry(h, BIAS).update(dtype="float64"),
     f"array '{BIAS}' has dtype 'float64'; allowed: uint32, float32, bfloat16"),
    (lambda h: _entry(h, BIAS).update(dtype="object"),
     f"array '{BIAS}' has dtype 'object'"),
    (lambda h: _entry(h, BIAS).update(offset=-(-h["data_bytes"] // 64) * 64),
     "occupies bytes"),
    (lambda h: _entry(h, BIAS).update(offset=0),
     "overlap"),
    (lambda h: _entry(h, CODES).update(name="codes/stage9"),
     "layer 'stage2_block0/conv1' has no codes"),
    (lambda h: h["layers"]["stage2_block0/conv1"]["weight_spec"].update(name="Ternary"),
     "unknown quantizer 'Ternary'"),
    (lambda h: h["layers"]["stage2_block0/conv1"].update(kind="Conv3D"),
     "layer 'stage2_block0/conv1' has kind 'Conv3D'"),
    (lambda h: h.update(framework="torch"),
     "framework must be one of ('linen', 'nnx'), got 'torch'"),
])
def test_inconsistent_header_is_refused_with_a_clear_message(model_file, tmp_path, edit,
                                                             message):
  path = _rewritten(model_file, tmp_path, edit)
  with pytest.raises(deploy.PackedModelError) as info:
    deploy.load(path)
  assert message in str(info.value)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(name="VisionTransformer"), "unknown architecture 'VisionTransformer'"),
    (lambda a: a["config"].update(depth=10**9), "depth must be an integer in 8..1202"),
    (lambda a: a.update(name="SpeechResNet"), "SpeechResNet config must have exactly"),
])
def test_a_bad_architecture_in_the_metadata_is_refused_by_export_load(
    model_file, tmp_path, edit, message):
  path = _rewritten(model_file, tmp_path, lambda h: edit(h["metadata"]["architecture"]))
  with pytest.raises(deploy.PackedModelError, match=message):
    ex.load(path)


def test_load_runs_no_code_from_the_file(model_file, monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("load must not unpickle or np.load")
  for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                       (np, "load")):
    monkeypatch.setattr(module, name, forbidden)
  deploy.load(model_file)
  # And no module of the deployment package imports a deserializer that can run code.
  for path in glob.glob(os.path.join(os.path.dirname(sj.deploy.__file__), "*.py")):
    tree = ast.parse(open(path).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}, path
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"np.load", "eval", "exec", "compile", "__import__"}, path


def test_save_refuses_to_overwrite(packed, tmp_path):
  path = tmp_path / "m.shiftjax"
  packed.save(path)
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match=str(path)):
    packed.save(path)
  assert path.read_bytes() == before
  deploy.PackedTree(packed.framework, packed.model, packed.layers, packed.arrays,
                    {"note": "second"}).save(path, overwrite=True)
  assert deploy.load(path).metadata == {"note": "second"}
  assert sorted(os.listdir(tmp_path)) == ["m.shiftjax"]  # no temporary files left


def test_an_invalid_model_writes_nothing(packed, tmp_path):
  arrays = dict(packed.arrays)
  arrays[CODES] = np.zeros((7, 3), np.uint32)
  bad = deploy.PackedTree(packed.framework, packed.model, packed.layers, arrays,
                          packed.metadata)
  with pytest.raises(deploy.PackedModelError, match="layer 'stage2_block0/conv1' codes"):
    bad.save(tmp_path / "bad.shiftjax")
  assert os.listdir(tmp_path) == []


# ------------------------------------------- versions 1-3: golden files, read and upgraded

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
# tests/golden/make_v{1,2,3}_files.py wrote them, with the last commit writing each version.
GOLDEN_FILES = [("resnet8_denseshift3", 1), ("resnet8_s3", 1), ("resnet8_denseshift3", 2),
                ("resnet8_s3", 2), ("resnet8_mixed_pact", 3), ("speech_s3_fixed", 3)]


def _golden(name, version):
  path = os.path.join(GOLDEN, f"{name}.v{version}.shiftjax")
  return (path, np.load(os.path.join(GOLDEN, f"{name}.images.npy")),
          np.load(os.path.join(GOLDEN, f"{name}.logits.npy")))


@pytest.mark.parametrize("name, version", GOLDEN_FILES)
def test_old_file_loads_and_gives_its_logits_through_the_flax_module(name, version,
                                                                     tmp_path):
  path, images, logits = _golden(name, version)
  assert struct.unpack_from("<I", open(path, "rb").read(), 8) == (version,)
  old = deploy.load(path)
  assert isinstance(old, deploy.PackedModel)
  assert old.code_layout == ("words" if version == 1 else "bitplanes")
  got = np.asarray(packed_logits_fn(old)(images))
  # The logits the writing version computed with its flax-free forward pass (a fused
  # conv; here the flax module's conv, then the folded epilogue: 1e-6 of the scale),
  # and the same predictions.
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))
  # Upgraded to version 4: the same codes, each quantized conv's scale and bias as its
  # folded epilogue, identical logits after a file round trip.
  tree = ex.upgrade(old)
  reloaded = deploy.load(tree.save(tmp_path / "v4.shiftjax"))
  assert isinstance(reloaded, deploy.PackedTree)
  for layer in old.layers:
    if layer.quantized:
      np.testing.assert_array_equal(
          reloaded.kernel_codes(layer.name),
          np.asarray(sj.codes.unpack_bitplanes(ex._bitplanes(old, layer),  # pylint: disable=protected-access
                                               layer.quantizer.bits, layer.shape)))
      if layer.op == "conv":
        np.testing.assert_array_equal(
            reloaded.arrays[f"variables/folded_norms/{layer.name}/scale"],
            old.arrays[f"{layer.name}/scale"])
  np.testing.assert_array_equal(np.asarray(packed_logits_fn(reloaded)(images)), got)
  assert reloaded.metadata["architecture"]["config"] == old.config


def test_a_version3_file_keeps_each_layers_width_and_input_spec():
  old = deploy.load(_golden("resnet8_mixed_pact", 3)[0])
  widths = {l.name: (l.quantizer.bits if l.quantized else None) for l in old.layers}
  assert widths["stem"] is None and widths["head"] is None
  assert widths["stage1_block0/conv1"] == 4 and widths["stage3_block0/conv2"] == 2
  assert {l.activation for l in old.layers if l.quantized} == {sj.PACT(4)}
  tree = ex.upgrade(old)
  assert {p: e.weight_spec.bits for p, e in tree.quantized_layers.items()} == {
      n: b for n, b in widths.items() if b}
  assert tree.layers["stem"].weight_spec is None  # float, with its folded BatchNorm
  assert tree.layers["stem"].folded_norm == "stem_bn"


def test_damaged_old_files_are_refused():
  for name, version in (("resnet8_denseshift3", 1), ("resnet8_denseshift3", 2)):
    buf = bytearray(open(_golden(name, version)[0], "rb").read())
    with pytest.raises(deploy.PackedModelError, match=re.escape(
        f"truncated at byte {len(buf) - 100} (expected {len(buf)})")):
      deploy.from_bytes(bytes(buf[:-100]))
    if version == 1:  # one digest for the whole file
      buf[len(buf) // 2] ^= 1
      expected = f"checksum mismatch: the file is corrupted (SHA-256 of bytes 0..{len(buf) - 32}"
    else:
      header_len = struct.unpack_from("<Q", buf, 12)[0]
      buf[20 + header_len // 2] ^= 1
      expected = f"header corrupted: the SHA-256 of bytes 0..{20 + header_len}"
    with pytest.raises(deploy.PackedModelError, match=re.escape(expected)):
      deploy.from_bytes(bytes(buf))


@pytest.mark.parametrize("edit, message", [
    # A layer entry disagrees with its arrays, or with the module the config builds.
    (lambda h: h["layers"][1].update(shape=[3, 3, 8, 9]),
     "layer 'stage1_block0/conv1' kernel has shape (18, 3), expected (21, 3)"),
    (lambda h: h["architecture"]["config"].update(num_classes=11),
     "layer 'head' is [32, 10], None, input None in the file but [32, 11]"),
    (lambda h: h["quantizer"].update(name="Ternary"), "unknown quantizer 'Ternary'"),
    (lambda h: h["architecture"].update(name="VisionTransformer"),
     "unknown architecture 'VisionTransformer'"),
    (lambda h: h["architecture"]["config"].update(depth=10**9),
     "depth must be an integer in 8..1202"),
    (lambda h: h["layers"][1].update(op="attention"), "layer 1 must be an object with an op"),
])
def test_an_inconsistent_old_file_is_refused(tmp_path, edit, message):
  path = _rewritten(_golden("resnet8_denseshift3", 2)[0], tmp_path, edit)
  with pytest.raises(deploy.PackedModelError, match=re.escape(message)):
    ex.load(path)
