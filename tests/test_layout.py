"""The package's structure: no import cycles, and deployment without the training stack.

Import cycles are found in the source (``ast``), so that an import inside a function
counts as surely as one at the top: it closes the circle later, at run time. The
deployment test runs in a subprocess whose import system refuses the training stack.
"""

import ast
import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import shiftjax as sj
from shiftjax import export as ex
from shiftjax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a training run needs and deployment must not (flax included: a packed model runs
# on jax alone).
TRAINING_STACK = ("flax", "optax", "orbax", "tensorflow_datasets", "ml_collections",
                  "absl", "grain", "tensorflow", "tensorboardX")

# The modules (and packages) the deployment package may import, directly or not.
DEPLOY_MAY_IMPORT = ("shiftjax", "shiftjax.activations", "shiftjax.codes",
                     "shiftjax.quantizers", "shiftjax.policy",
                     "shiftjax.pooling", "shiftjax.kernels", "shiftjax.kernels.inference",
                     "shiftjax.kernels.cpu", "shiftjax.deploy")


def package_modules() -> dict[str, str]:
  """``{module name: source file}`` of ``shiftjax`` and every module below it.

  ``shiftjax.kernels`` lives in the top-level ``kernels/`` folder (setup.cfg maps it), so
  it is walked from its own path.
  """
  modules = {}
  for package in (sj, importlib.import_module("shiftjax.kernels")):
    modules[package.__name__] = package.__file__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
      modules[info.name] = importlib.util.find_spec(info.name).origin
  return modules


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
  """The modules of ``known`` that ``source`` (module ``module``) imports, at any depth.

  ``from P import x`` imports module ``P.x`` when there is one, else package ``P``. A
  submodule's implicit import of its parent package is not an edge: Python has already
  begun the parent when it imports the child.
  """
  package = module if is_package else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: ``from . import x``, ``from ..pipeline import y``
        parts = package.split(".")
        anchor = ".".join(parts[:len(parts) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
      for alias in node.names:
        name = f"{base}.{alias.name}"
        found.add(name if name in known else base)
  return found & known


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      source = f.read()
    graph[module] = imported_modules(source, module, path.endswith("__init__.py"),
                                     set(modules))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of ``graph`` as ``[a, b, ..., a]``, None when it has none (depth first)."""
  done, path = set(), []

  def visit(node):
    if node in path:
      return path[path.index(node):] + [node]
    if node in done:
      return None
    path.append(node)
    for successor in sorted(graph.get(node, ())):
      cycle = visit(successor)
      if cycle:
        return cycle
    path.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    cycle = visit(node)
    if cycle:
      return cycle
  return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo.extend(graph.get(node, ()))
  return seen


def test_find_cycle_and_imported_modules():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"a"}}) == ["a", "a"]
  known = {"shiftjax.data", "shiftjax.data.pipeline", "shiftjax.data.imagenet",
           "shiftjax.data.slu", "shiftjax.data.slu.fsc", "shiftjax.train",
           "shiftjax.export"}
  # The old circles: pipeline importing imagenet, export importing train, in a function.
  source = ("import numpy\n"
            "def make_dataset():\n"
            "  from shiftjax.data import imagenet  # pylint: disable=g-import-not-at-top\n"
            "  from shiftjax import train\n")
  assert imported_modules(source, "shiftjax.data.pipeline", False, known) == {
      "shiftjax.data.imagenet", "shiftjax.train"}
  source = ("import shiftjax.data.pipeline as p\nfrom shiftjax.data import SPECS\n"
            "from . import fsc\nfrom ..imagenet import NAME\n")
  assert imported_modules(source, "shiftjax.data.slu", True, known) == {
      "shiftjax.data.pipeline", "shiftjax.data", "shiftjax.data.slu.fsc",
      "shiftjax.data.imagenet"}


def test_package_has_no_import_cycle():
  graph = import_graph()
  # The walk saw every part (an empty graph has no cycle either).
  assert {"shiftjax.train", "shiftjax.deploy.format", "shiftjax.kernels.cpu.native",
          "shiftjax.data.readers", "shiftjax.data.slu.synthetic"} <= set(graph)
  assert "shiftjax.export" in graph["shiftjax.train"]
  assert "shiftjax.data.pipeline" in graph["shiftjax.data.imagenet"]
  assert "shiftjax.data.imagenet" in graph["shiftjax.data.readers"]
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# Running a model of any architecture packed runs its own flax code: those modules (the
# packed layers and the BatchNorm folding they apply) may also reach the interception
# glue (flax, not the training stack).
# glue (flax, not the training stack); shiftjax.export runs the zoo's ResNets packed
# through their flax modules.
FLAX_DEPLOY = ("shiftjax.deploy.packed_layers", "shiftjax.deploy.norm_folding",
               "shiftjax.export")
FLAX_DEPLOY_MAY_IMPORT = ("shiftjax.interception", "shiftjax.trees", "shiftjax.transfer",
                          "shiftjax.models", "shiftjax.layers", "shiftjax.batch_norm",
                          "shiftjax.kernels.training")
SHIFTJAX_TRAINING = ("shiftjax.train", "shiftjax.loop", "shiftjax.optim", "shiftjax.metrics",
                     "shiftjax.data", "shiftjax.distill")
# What running a packed file must not need: the training stack but flax, which runs the
# model's own code, and what flax itself imports (absl; optax, from flax.nnx.helpers).
NOT_NEEDED_TO_RUN_PACKED = tuple(m for m in TRAINING_STACK
                                 if m not in ("flax", "absl", "optax"))


def test_deploy_imports_only_codes_quantizers_and_inference_kernels():
  graph = import_graph()
  deploy = [m for m in graph if (m == "shiftjax.deploy" or m.startswith("shiftjax.deploy."))
            and m not in FLAX_DEPLOY]
  assert len(deploy) >= 5
  for flax_module in FLAX_DEPLOY:
    flax_side = {m for m in reachable(graph, flax_module)
                 if not any(m == a or m.startswith(a + ".")
                            for a in DEPLOY_MAY_IMPORT + FLAX_DEPLOY_MAY_IMPORT + FLAX_DEPLOY)}
    assert not flax_side, f"{flax_module} imports {sorted(flax_side)}"
    assert not {m for m in reachable(graph, flax_module) if m.startswith(SHIFTJAX_TRAINING)}
  for module in deploy:
    outside = {m for m in reachable(graph, module)
               if not any(m == a or m.startswith(a + ".") for a in DEPLOY_MAY_IMPORT)
               or m.startswith("shiftjax.kernels.training")}
    assert not outside, f"{module} imports {sorted(outside)}"


def test_convolution_code_has_one_home():
  # Differentiable training convs, inference kernels and the native CPU kernels both run
  # on, each under its own folder.
  modules = package_modules()
  conv_modules = sorted(m for m in modules if m.rpartition(".")[2] in ("conv", "native"))
  assert conv_modules == ["shiftjax.kernels.cpu.native", "shiftjax.kernels.inference.conv",
                          "shiftjax.kernels.training.conv"]
  cc = sorted(os.path.relpath(os.path.join(root, f), REPO)
        for root, _, files in os.walk(os.path.join(REPO, "kernels")) for f in files
        if f.endswith(".cc"))
  assert cc == [os.path.join("kernels", "cpu", "cpu_conv.cc"),
                os.path.join("kernels", "cpu", "cpu_pow2_matmul.cc")]


# Runs in the subprocess: refuses every module of the training stack, then loads the
# packed files named in argv and writes their logits of the saved images.
DEPLOY_ONLY = r"""
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is not available in a deployment-only environment")
    return None

sys.meta_path.insert(0, Refuse())
import numpy as np
import shiftjax as sj
from shiftjax import export
out = {}
for path in sys.argv[3:]:
  name = sj.deploy.load(path).metadata["architecture"]["name"]
  model, variables = export.load(path)
  images = np.load(sys.argv[2] + "." + name + ".npy")
  np.save(path + ".logits.npy", np.asarray(model.apply(variables, images, train=False)))
  out[path] = name
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT " + json.dumps({"models": out, "loaded": loaded}))
"""


def _packed_models():
  """Small initialized (untrained) models of each architecture, zero-free and with a
  zero code, one at mixed widths with quantized activations, with batch statistics made
  up so that folding is not the identity."""
  rng = np.random.default_rng(0)
  cases = [
      # Mixed widths and PACT activations: both run on plain jax too.
      (models.resnet8(num_classes=10, width_multiplier=1.0, policy=sj.LayerPolicy(
          sj.DenseShift(bits=3), ("stem", "head"),
          layer_quantizers=(("stage3_*/*", sj.DenseShift(bits=4)),),
          activation=sj.activations.PACT(4))), (2, 16, 16, 3)),
      (models.shift_model(models.ImageNetResNet(stage_sizes=(1, 1), block="basic",
                                                num_classes=7), sj.S3(bits=3)), (2, 32, 32, 3)),
      (models.speech_resnet(num_classes=5, quantizer=sj.DenseShift(bits=2),
                            stage_sizes=(1, 1), widths=(16, 32)), (2, 24, 16, 1)),
  ]
  for model, shape in cases:
    images = rng.standard_normal(shape).astype(np.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                         variables["batch_stats"])
    yield ex.export({"params": variables["params"], "batch_stats": stats}, model), images


def test_packed_file_runs_without_the_training_stack(tmp_path):
  paths, expected = [], {}
  for packed, images in _packed_models():
    name = packed.metadata["architecture"]["name"]
    path = str(tmp_path / f"{name}.shiftjax")
    packed.save(path)
    np.save(str(tmp_path / "images") + f".{name}.npy", images)
    model, variables = ex.load(packed)
    expected[path] = np.asarray(model.apply(variables, images, train=False))
    paths.append(path)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-c", DEPLOY_ONLY, json.dumps(NOT_NEEDED_TO_RUN_PACKED),
       str(tmp_path / "images"), *paths],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["loaded"] == []
  assert sorted(result["models"].values()) == ["CifarResNet", "ImageNetResNet",
                                               "SpeechResNet"]
  for path in paths:
    np.testing.assert_array_equal(np.load(path + ".logits.npy"), expected[path])


def test_the_refusing_import_system_does_refuse(tmp_path):
  # The subprocess's guard works: a deployment program that imports orbax fails.
  script = DEPLOY_ONLY.replace("from shiftjax import export", "import orbax.checkpoint")
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(NOT_NEEDED_TO_RUN_PACKED),
                         str(tmp_path / "images")], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert "orbax is not available in a deployment-only environment" in proc.stderr
