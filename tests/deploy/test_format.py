"""The packed model file (``shiftjax.deploy.format``): round trip, size, refusal of
truncated, flipped, unsupported, inconsistent and foreign files, no code run on load,
atomic writes, the version 1 and 2 golden files and both code layouts.

The trained model and its file are conftest.py's session fixtures.
"""

import ast
import dataclasses
import glob
import hashlib
import json
import math
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest

import shiftjax as sj
from resnet_helpers import NO_RULES
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import models


# ------------------------------------------------------------------------------ helpers


def split_file(buf):
  """The documented layout (version 3, laid out as 2), parsed independently of
  shiftjax.deploy."""
  magic, version, header_len = struct.unpack_from("<8sIQ", buf, 0)
  assert magic == b"SHIFTJAX" and version == 3
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
  assert loaded.architecture == packed.architecture == "CifarResNet"
  assert loaded.config == packed.config == {
      "depth": 8, "num_classes": 10, "width_multiplier": 0.5, "in_channels": 1,
      "full_precision": ["stem", "head"], **NO_RULES}
  assert loaded.quantizer == packed.quantizer == sj.DenseShift(bits=3)
  assert loaded.layers == packed.layers
  assert loaded.float_dtype == "float32" and loaded.metadata == packed.metadata
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


def test_size_report_counts_bits_per_weight(packed, model_file, trained):
  # Bit planes: exactly 3 bits per weight (every kernel's size is a multiple of 32).
  report = packed.size_report()
  assert report["bits_per_quantized_weight"] == 3.0
  assert os.path.getsize(model_file) < report["float32_weight_bytes"] / 4
  # The kernels' word layout: 10 codes per word along K = kh*kw*I, the last word padded.
  words = ex.export(trained["variables"], trained["model"], code_layout="words")
  kernels = [l for l in words.layers if l.quantized]
  stored = sum(32 * -(-math.prod(l.shape[:-1]) // 10) * l.shape[-1] for l in kernels)
  assert words.size_report()["bits_per_quantized_weight"] == pytest.approx(
      stored / sum(math.prod(l.shape) for l in kernels))
  assert words.size_report()["bits_per_quantized_weight"] > 3.2


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
  """(end of the header, start of the data, {array name: (start, end)}) of a version 2 file."""
  _, header_len = struct.unpack_from("<IQ", buf, 8)
  head_end = 20 + header_len
  start = -(-(head_end + 32) // 64) * 64
  header = json.loads(buf[20:head_end])
  return head_end, start, {e["name"]: (start + e["offset"], start + e["offset"] + e["nbytes"])
                           for e in header["arrays"]}


@pytest.mark.parametrize("position", ["header", "header_digest", "kernel", "bias",
                                      "padding", "digest"])
def test_flipped_byte_is_refused_naming_where(model_file, tmp_path, position):
  buf = bytearray(open(model_file, "rb").read())
  head_end, _, spans = _layout(bytes(buf))
  kernel, bias = spans["stage2_block0/conv1/kernel"], spans["head/bias"]
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
      "kernel": f"array 'stage2_block0/conv1/kernel' is corrupted: its bytes "
                f"{kernel[0]}..{kernel[1]} do not match its CRC-32",
      "bias": f"array 'head/bias' is corrupted: its bytes {bias[0]}..{bias[1]}",
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


def _rewritten(model_file, tmp_path, edit):
  version, header, data = split_file(open(model_file, "rb").read())
  edit(header)
  path = tmp_path / "edited.shiftjax"
  path.write_bytes(join_file(version, header, data))
  return path


def _entry(header, name):
  return next(e for e in header["arrays"] if e["name"] == name)


@pytest.mark.parametrize("edit, message", [
    # An array's declared shape (same byte count) disagrees with the architecture.
    (lambda h: _entry(h, "stage2_block0/conv1/kernel").update(
        shape=_entry(h, "stage2_block0/conv1/kernel")["shape"][::-1]),
     "layer 'stage2_block0/conv1' kernel has shape (3, 36), expected (36, 3)"),
    # The config says 11 classes; the stored head has 10.
    (lambda h: h["architecture"]["config"].update(num_classes=11),
     "layer 'head' has shape [32, 10], expected [32, 11]"),
    # A layer entry says another shape than the architecture.
    (lambda h: h["layers"][1].update(shape=[3, 3, 8, 9]),
     "layer 'stage1_block0/conv1' has shape [3, 3, 8, 9], expected [3, 3, 8, 8]"),
    (lambda h: _entry(h, "stem/bias").update(dtype="float64"),
     "array 'stem/bias' has dtype 'float64'; allowed: uint32, float32, bfloat16"),
    (lambda h: _entry(h, "stem/bias").update(dtype="object"),
     "array 'stem/bias' has dtype 'object'"),
    (lambda h: _entry(h, "head/bias").update(offset=-(-h["data_bytes"] // 64) * 64),
     "occupies bytes"),
    (lambda h: _entry(h, "head/bias").update(offset=0),
     "overlap"),
    (lambda h: h["arrays"].pop(),
     "array 'head/bias' is missing"),
    (lambda h: h["quantizer"].update(name="Ternary"),
     "unknown quantizer 'Ternary'"),
    (lambda h: h["architecture"].update(name="VisionTransformer"),
     "unknown architecture 'VisionTransformer'"),
    (lambda h: h["architecture"]["config"].update(depth=10**9),
     "depth must be an integer in 8..1202"),
    (lambda h: h["architecture"].update(name="SpeechResNet"),
     "SpeechResNet config must have exactly the fields"),
])
def test_inconsistent_header_is_refused_with_a_clear_message(model_file, tmp_path, edit,
                                                             message):
  path = _rewritten(model_file, tmp_path, edit)
  with pytest.raises(deploy.PackedModelError) as info:
    deploy.load(path)
  assert message in str(info.value)
  assert str(path) in str(info.value)


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
  dataclasses.replace(packed, metadata={"note": "second"}).save(path, overwrite=True)
  assert deploy.load(path).metadata == {"note": "second"}
  assert sorted(os.listdir(tmp_path)) == ["m.shiftjax"]  # no temporary files left


def test_an_invalid_model_writes_nothing(packed, tmp_path):
  arrays = dict(packed.arrays)
  arrays["head/bias"] = np.zeros(11, np.float32)
  bad = deploy.PackedModel(packed.architecture, packed.config, packed.quantizer, packed.layers,
                       arrays)
  with pytest.raises(deploy.PackedModelError, match="layer 'head' bias has shape"):
    bad.save(tmp_path / "bad.shiftjax")
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------- version 1 files (the 'words' layout)

V1_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "golden")
V1_MODELS = ("resnet8_denseshift3", "resnet8_s3")  # tests/golden/make_v1_files.py wrote them


def _v1(name):
  path = os.path.join(V1_DIR, f"{name}.v1.shiftjax")
  return (path, np.load(os.path.join(V1_DIR, f"{name}.images.npy")),
          np.load(os.path.join(V1_DIR, f"{name}.logits.npy")))


@pytest.mark.parametrize("name", V1_MODELS)
def test_version1_file_loads_and_gives_its_logits(name, tmp_path):
  path, images, logits = _v1(name)
  assert struct.unpack_from("<I", open(path, "rb").read(), 8) == (1,)
  packed = deploy.load(path)
  assert packed.code_layout == "words"
  got = np.asarray(deploy.packed_apply(packed, images))
  # The logits the writing version computed (same ops; 1e-6 of the scale covers a jax
  # upgrade's rounding), and the same predictions.
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))
  # Rewritten at exactly 3 bits per weight (version 2): the same codes, identical logits.
  planes = sj.deploy.with_code_layout(packed, "bitplanes")
  assert planes.size_report()["bits_per_quantized_weight"] < (
      packed.size_report()["bits_per_quantized_weight"])
  planes.save(tmp_path / "v2.shiftjax")
  reloaded = deploy.load(tmp_path / "v2.shiftjax")
  assert reloaded.code_layout == "bitplanes"
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(reloaded, images)), got)
  back = sj.deploy.with_code_layout(reloaded, "words")
  for k, a in packed.arrays.items():
    np.testing.assert_array_equal(back.arrays[k], a)


def test_damaged_version1_file_is_refused(tmp_path):
  path, _, _ = _v1(V1_MODELS[0])
  buf = bytearray(open(path, "rb").read())
  (tmp_path / "cut.shiftjax").write_bytes(bytes(buf[:-100]))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"truncated at byte {len(buf) - 100} (expected {len(buf)})")):
    deploy.load(tmp_path / "cut.shiftjax")
  buf[len(buf) // 2] ^= 1
  (tmp_path / "flipped.shiftjax").write_bytes(bytes(buf))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"checksum mismatch: the file is corrupted (SHA-256 of bytes 0..{len(buf) - 32}")):
    deploy.load(tmp_path / "flipped.shiftjax")


@pytest.mark.parametrize("name", V1_MODELS)
def test_version2_file_loads_and_gives_its_logits(name, tmp_path):
  # tests/golden/make_v2_files.py wrote them with commit 4b7ef77 (the same models as v1).
  path = os.path.join(V1_DIR, f"{name}.v2.shiftjax")
  _, images, logits = _v1(name)
  assert struct.unpack_from("<I", open(path, "rb").read(), 8) == (2,)
  packed = deploy.load(path)
  assert packed.code_layout == "bitplanes"
  assert packed.config["layer_quantizers"] == [] and packed.config["activation"] is None
  assert all(l.activation is None and l.quantizer in (None, packed.quantizer)
             for l in packed.layers)
  got = np.asarray(deploy.packed_apply(packed, images))
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  np.testing.assert_array_equal(got.argmax(-1), logits.argmax(-1))
  # Saved again it is a version 3 file with the same arrays and identical logits.
  packed.save(tmp_path / "v3.shiftjax")
  buf = open(tmp_path / "v3.shiftjax", "rb").read()
  assert struct.unpack_from("<I", buf, 8) == (3,)
  reloaded = deploy.load(tmp_path / "v3.shiftjax")
  for k, a in packed.arrays.items():
    np.testing.assert_array_equal(reloaded.arrays[k], a)
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(reloaded, images)), got)


def test_damaged_version2_file_is_refused(tmp_path):
  path = os.path.join(V1_DIR, f"{V1_MODELS[0]}.v2.shiftjax")
  buf = bytearray(open(path, "rb").read())
  (tmp_path / "cut.shiftjax").write_bytes(bytes(buf[:-100]))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"truncated at byte {len(buf) - 100} (expected {len(buf)})")):
    deploy.load(tmp_path / "cut.shiftjax")
  header_len = struct.unpack_from("<Q", buf, 12)[0]
  buf[20 + header_len // 2] ^= 1
  (tmp_path / "header.shiftjax").write_bytes(bytes(buf))
  with pytest.raises(deploy.PackedModelError, match=re.escape(
      f"header corrupted: the SHA-256 of bytes 0..{20 + header_len}")):
    deploy.load(tmp_path / "header.shiftjax")


def test_bitplanes_and_words_files_give_identical_logits(trained, fashion_mnist):
  model, variables = trained["model"], trained["variables"]
  images = fashion_mnist["test_images"][:256]
  planes = ex.export(variables, model)
  words = ex.export(variables, model, code_layout="words")
  assert planes.code_layout == "bitplanes" and words.code_layout == "words"
  np.testing.assert_array_equal(np.asarray(deploy.packed_apply(planes, images)),
                                np.asarray(deploy.packed_apply(words, images)))
  # Both layouts hold the same codes.
  converted = sj.deploy.with_code_layout(words, "bitplanes")
  for k, a in planes.arrays.items():
    np.testing.assert_array_equal(converted.arrays[k], a)
  with pytest.raises(deploy.PackedModelError, match="code_layout must be one of"):
    ex.export(variables, model, code_layout="nibbles")
