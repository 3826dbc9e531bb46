"""The methods, runs and statistics the accuracy benchmarks print over seeds
(shiftjax.benchmarking.method_comparison)."""

import math
import os

import ml_collections
import pytest

from shiftjax.benchmarking import method_comparison


def test_mean_and_sample_std():
  mean, std = method_comparison.mean_and_std([0.90, 0.92, 0.97])
  assert mean == pytest.approx(0.93)
  # Sample (n - 1) standard deviation: squares 0.0009 + 0.0001 + 0.0016 over 2.
  assert std == pytest.approx(math.sqrt(0.0026 / 2))
  assert method_comparison.mean_and_std([0.5]) == (0.5, 0.0)


def test_gap_and_its_standard_error():
  gap, se = method_comparison.gap_to([0.90, 0.92], [0.91, 0.95, 0.96])
  assert gap == pytest.approx(0.94 - 0.91)
  # sqrt(s_ref^2 / 2 + s^2 / 3) with s_ref^2 = 0.0002, s^2 = (0.0009 + 0.0001 + 0.0004) / 2.
  assert se == pytest.approx(math.sqrt(0.0002 / 2 + 0.0007 / 3))


def test_table_prints_every_seed_and_the_gap(capsys):
  runs = lambda accs: [{"test_accuracy": a, "steps": 10, "training_wall_seconds": 5.0,
                        "packed_weight_bytes": 2048} for a in accs]
  method_comparison.print_table({"float": runs([0.90, 0.92]), "shift": runs([0.88, 0.89])},
                                "float", {"packed KiB": lambda s: s["packed_weight_bytes"] / 1024})
  out = capsys.readouterr().out.splitlines()
  shift = next(l for l in out if l.startswith("shift"))
  assert "0.8800  0.8900" in shift and "0.8850" in shift
  assert "-2.50 +- " in shift and shift.rstrip().endswith("2.0")


def test_every_method_and_seed_trains_in_its_own_directory(monkeypatch, tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(method_comparison.train, "train_and_evaluate",
                      lambda config, workdir: calls.append((config, workdir)) or {})
  base = ml_collections.ConfigDict({"quantizer": "float", "bits": 3, "seed": 7,
                                    "export_packed": True})
  methods = {"float": {"quantizer": "float"},
             "DenseShift 2-bit": {"quantizer": "DenseShift", "bits": 2},
             "DenseShift 3-bit": {"quantizer": "DenseShift", "bits": 3}}
  summaries = method_comparison.train_each(base, methods, str(tmp_path), seeds=(0, 1))
  assert [len(s) for s in summaries.values()] == [2, 2, 2]
  names = [os.path.basename(w) for _, w in calls]
  assert names == ["float", "denseshift_2-bit", "denseshift_3-bit",
                   "float_seed1", "denseshift_2-bit_seed1", "denseshift_3-bit_seed1"]
  assert [(c.quantizer, c.bits, c.seed) for c, _ in calls[3:]] == [
      ("float", 3, 1), ("DenseShift", 2, 1), ("DenseShift", 3, 1)]
  assert not any(c.export_packed for c, _ in calls) and base.seed == 7


def test_predictions_are_the_top1_of_every_batch():
  import numpy as np  # pylint: disable=g-import-not-at-top
  labels = np.arange(2500) % 7
  images = labels.astype(np.float32)[:, None]
  seen = []
  def one_hot(x):
    seen.append(len(x))
    return np.eye(7)[x[:, 0].astype(int)]
  got = method_comparison.predictions(one_hot, images, batch=1000)
  np.testing.assert_array_equal(got, labels)
  assert seen == [1000, 1000, 500]
  assert method_comparison.directory_name("S3 3-bit dense init", 2) == "s3_3-bit_dense_init_seed2"


def test_long_method_names_keep_the_columns_aligned(capsys):
  runs = lambda accs: [{"test_accuracy": a, "steps": 10, "training_wall_seconds": 5.0}
                       for a in accs]
  long_name = "DenseShift 3-bit latents not decayed"
  method_comparison.print_table({"float": runs([0.90]), long_name: runs([0.88])}, "float")
  header, float_row, long_row = capsys.readouterr().out.splitlines()[:3]
  # Every row's accuracy column starts where the header's does.
  column = header.index("accuracy per seed") + len("accuracy per seed")
  assert float_row[:column].endswith("0.9000") and long_row[:column].endswith("0.8800")


def test_a_long_reference_name_keeps_the_gap_column_aligned(capsys):
  runs = lambda accs: [{"test_accuracy": a, "steps": 10, "training_wall_seconds": 5.0}
                       for a in accs]
  method_comparison.print_table({"DenseShift 3-bit": runs([0.90, 0.92]),
                                 "distilled": runs([0.93, 0.93])}, "DenseShift 3-bit")
  header, reference_row, row = capsys.readouterr().out.splitlines()[:3]
  end = header.index("gap to DenseShift 3-bit") + len("gap to DenseShift 3-bit")
  assert reference_row[:end].endswith("+0.00 +- 1.41")
  assert row[:end].endswith("+2.00 +- 1.00")


def test_select_methods_puts_the_reference_first_and_names_the_unknown():
  methods = {"float": {"quantizer": "float"}, "S3 3-bit": {"quantizer": "S3"}}
  variants = {"S3 3-bit he init": {"quantizer": "S3", "init_method": "he"}}
  assert method_comparison.select_methods(None, methods, variants) == methods
  chosen = method_comparison.select_methods(["S3 3-bit he init"], methods, variants)
  assert list(chosen) == ["float", "S3 3-bit he init"]
  assert chosen["S3 3-bit he init"] == {"quantizer": "S3", "init_method": "he"}
  with pytest.raises(ValueError, match=r"unknown methods \['S4'\]; known: \['float', "
                                       r"'S3 3-bit', 'S3 3-bit he init'\]"):
    method_comparison.select_methods(["S4"], methods, variants)


def test_float_warm_start_splits_the_epochs_between_two_stages(monkeypatch, tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  calls = []
  def fake_train(config, workdir):
    calls.append((config.copy_and_resolve_references(), workdir))
    return {"test_accuracy": 0.9, "training_wall_seconds": 10.0 * config.num_epochs,
            "steps": int(100 * config.num_epochs)}
  monkeypatch.setattr(method_comparison.train, "train_and_evaluate", fake_train)
  base = ml_collections.ConfigDict({"quantizer": "float", "bits": 3, "seed": 0,
                                    "num_epochs": 6.0, "init_from": "",
                                    "export_packed": True})
  methods = {"warm": {"quantizer": "DenseShift", "float_start_epochs": 2}}
  summary, = method_comparison.train_each(base, methods, str(tmp_path))["warm"]
  (start, start_dir), (shift, shift_dir) = calls
  assert (start.quantizer, start.num_epochs, start.init_from) == ("float", 2.0, "")
  assert start_dir == str(tmp_path / "warm_float_start")
  assert (shift.quantizer, shift.num_epochs, shift.init_from) == (
      "DenseShift", 4.0, start_dir)
  assert shift_dir == str(tmp_path / "warm") and "float_start_epochs" not in shift
  assert summary["training_wall_seconds"] == 60.0 and summary["steps"] == 600
  with pytest.raises(ValueError, match=r"float_start_epochs must be in \(0, 6.0\), got 6"):
    method_comparison.train_each(base, {"warm": {"float_start_epochs": 6}}, str(tmp_path))


def test_finished_runs_lists_the_runs_with_a_summary(tmp_path):
  for name in ("denseshift_3-bit", "denseshift_3-bit_seed2", "float"):
    (tmp_path / name).mkdir()
    (tmp_path / name / method_comparison.train.SUMMARY_FILE).write_text("{}")
  (tmp_path / "s3_3-bit").mkdir()  # interrupted: no summary
  got = list(method_comparison.finished_runs(str(tmp_path)))
  assert got == [("float", 0, str(tmp_path / "float")),
                 ("DenseShift 3-bit", 0, str(tmp_path / "denseshift_3-bit")),
                 ("DenseShift 3-bit", 2, str(tmp_path / "denseshift_3-bit_seed2"))]


def test_method_config_applies_the_overrides_and_seed_and_never_exports():
  base = ml_collections.ConfigDict({"quantizer": "float", "bits": 3, "seed": 0,
                                    "learning_rate": 0.1, "export_packed": True})
  config = method_comparison.method_config(
      base, {"quantizer": "DenseShift", "learning_rate": 0.01, "float_start_epochs": 2}, 3)
  assert (config.quantizer, config.learning_rate, config.seed) == ("DenseShift", 0.01, 3)
  assert not config.export_packed and "float_start_epochs" not in config
  assert base.quantizer == "float" and base.export_packed  # the base is not changed


def test_a_distilled_method_learns_from_the_same_seeds_earlier_run(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(method_comparison.train, "train_and_evaluate",
                      lambda config, workdir: calls.append((config.distill_from, workdir))
                      or {"test_accuracy": 0.9})
  base = ml_collections.ConfigDict({"quantizer": "float", "bits": 3, "seed": 0,
                                    "distill_from": "", "export_packed": True})
  methods = {"float": {}, "student": {"quantizer": "DenseShift",
                                      "distill_from_method": "float"}}
  method_comparison.train_each(base, methods, str(tmp_path), seeds=(0, 1))
  assert calls == [("", str(tmp_path / "float")),
                   (str(tmp_path / "float"), str(tmp_path / "student")),
                   ("", str(tmp_path / "float_seed1")),
                   (str(tmp_path / "float_seed1"), str(tmp_path / "student_seed1"))]
  # A teacher that is not trained first is refused before anything trains.
  calls.clear()
  with pytest.raises(ValueError, match="student distills from 'float', which must be one "
                                       "of the methods trained before it: \\[\\]"):
    method_comparison.train_each(base, dict(reversed(methods.items())), str(tmp_path))
  assert not calls
