"""The launchers' config and flag errors: one line on stderr, exit status 2, nothing written.

Each case runs a launcher in a subprocess (a few seconds each: it imports jax), as a
user would, and fails before anything is compiled: no data is read and no model trained.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "--config=experiments/configs/fashion_mnist.py"


def launch(launcher: str, *args: str, traceback_env: bool = False
           ) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "SHIFTJAX_TRACEBACK"}
  env["JAX_PLATFORMS"] = "cpu"
  if traceback_env:
    env["SHIFTJAX_TRACEBACK"] = "1"
  return subprocess.run([sys.executable, "-m", f"experiments.{launcher}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(run: subprocess.CompletedProcess, *names: str) -> None:
  lines = run.stderr.strip().splitlines()
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
  for name in names:
    assert name in lines[0], (name, lines[0])


# (launcher, flags, what the line must name: the field, the value, what is allowed)
CONFIG_ERRORS = {
    "bits_out_of_range": ("train", ["--config.bits=9"], ["bits", "9", "2..5"]),
    "unknown_model": ("evaluate", ["--config.model=resnet7"],
                      ["config.model", "'resnet7'", "resnet8"]),
    "unknown_dataset": ("export", ["--config.dataset=cifar11"],
                        ["dataset", "'cifar11'", "cifar10, fashion_mnist"]),
    "rule_matching_no_layer": ("train", ["--config.layer_quantizers=nomatch*=4"],
                               ["layer_quantizers", "'nomatch*'", "stage1_block0/conv1"]),
    "malformed_rule": ("train", ["--config.layer_quantizers=stage1_*/*"],
                       ["layer_quantizers", "'stage1_*/*'", "pattern=value"]),
    "flag_that_does_not_parse": ("train", ["--config.bits=three"],
                                 ["--config.bits=three", "int"]),
    "unknown_config_field": ("train", ["--config.bitz=3"], ["bitz"]),
    "unexpected_argument": ("train", ["extra"], ["extra"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_and_exit_status_2_before_anything_is_written(
    case, tmp_path):
  launcher, args, names = CONFIG_ERRORS[case]
  workdir = tmp_path / "run"
  run = launch(launcher, CONFIG, f"--workdir={workdir}", *args)
  assert_one_line_error(run, *names)
  assert not workdir.exists()


def test_missing_data_directory_names_the_field_and_the_directory(tmp_path):
  missing = tmp_path / "no_such_dir"
  run = launch("train", CONFIG, f"--workdir={tmp_path / 'run'}",
               "--config.prepare_offline_data=False", f"--config.data_dir={missing}")
  assert_one_line_error(run, "config.data_dir", str(missing), "no such directory")


@pytest.mark.parametrize("config, names", [
    ("experiments/configs/no_such_config.py",
     ["--config", "No such file or directory", "no_such_config.py"]),
    ("experiments/configs/cifar10.py:resnet21,denseshift,3",
     ["config string 'resnet21,denseshift,3'", "unknown model 'resnet21'", "resnet20"]),
], ids=["missing_file", "bad_recipe_string"])
def test_config_file_error_is_one_line(config, names, tmp_path):
  run = launch("train", f"--config={config}", f"--workdir={tmp_path / 'run'}")
  assert_one_line_error(run, *names)
  assert "Traceback" not in run.stderr


def test_missing_required_flag_is_one_line():
  run = launch("export", CONFIG)
  assert_one_line_error(run, "--workdir")


@pytest.fixture(scope="module")
def quarter_width_workdir(tmp_path_factory):
  """A workdir holding a checkpoint of the main job's model at width 1/4 (zeros: its
  shapes are what matter; nothing is trained or compiled)."""
  from experiments.configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  from shiftjax import train  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config()
  config.width_multiplier = 0.25
  abstract = train.abstract_checkpoint(config)
  workdir = tmp_path_factory.mktemp("quarter_width")
  manager = train.checkpoint_manager(str(workdir), config)
  manager.save(7, args=train.ocp.args.StandardSave(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)))
  manager.wait_until_finished()
  manager.close()
  return workdir


@pytest.mark.parametrize("launcher", ["train", "evaluate", "export"])
def test_workdir_of_another_config_is_one_line(launcher, quarter_width_workdir):
  before = sorted(os.listdir(quarter_width_workdir))
  run = launch(launcher, CONFIG, f"--workdir={quarter_width_workdir}",
               "--config.width_multiplier=0.5")
  assert_one_line_error(run, f"--workdir={quarter_width_workdir}", "step 7",
                        "another config", "width_multiplier 0.5", "has shape")
  assert sorted(os.listdir(quarter_width_workdir)) == before


def test_checkpoint_of_other_bits_names_the_differing_latents(quarter_width_workdir):
  run = launch("export", CONFIG, f"--workdir={quarter_width_workdir}",
               "--config.width_multiplier=0.25", "--config.bits=4")
  assert_one_line_error(run, "another config", "DenseShift 4-bit", "kernel")


@pytest.mark.parametrize("how", ["--verbose", "SHIFTJAX_TRACEBACK=1"])
def test_verbose_or_environment_keeps_the_traceback(how, tmp_path):
  extra = ["--verbose"] if how == "--verbose" else []
  run = launch("train", CONFIG, f"--workdir={tmp_path / 'run'}", "--config.bits=9", *extra,
               traceback_env=how != "--verbose")
  assert run.returncode != 0
  assert "Traceback (most recent call last)" in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("ValueError: ") and "9" in last, last
