"""Where a ResNet-20 CPU training step spends its time, by kind of XLA op (issue 7).

    python benchmarks/profile_train_step.py                # DenseShift 3-bit, fast path
    python benchmarks/profile_train_step.py --plain --float --top=30

Traces ``--steps`` calls of the jitted step ``benchmarks/train_step.py`` times
(``shiftjax.benchmarking.resnet20_step``) with ``jax.profiler`` and sums the duration of
every XLA:CPU thunk, grouped by the op's kind (convolution, dot, copy/pad/concatenate,
reduction, elementwise fusion, loop) and by forward/backward pass (the op's source name).
Milliseconds are per step and summed over threads. Convolutions and dots run
asynchronously on Eigen's thread pool: their events time only the launch, so their share
is what the total CPU time leaves after the rest. Use it to see what a change moved, next
to the interleaved timings of ``train_step.py``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app
from absl import flags
import jax

import shiftjax as sj
from shiftjax import host_memory
from shiftjax.benchmarking import resnet20_step
from shiftjax.kernels.training import conv

FLAGS = flags.FLAGS
flags.DEFINE_bool("float", False, "Float model, not DenseShift 3-bit.")
flags.DEFINE_bool("plain", False, "XLA's own gradients and libraries.")
flags.DEFINE_integer("steps", 5, "Steps traced.")
flags.DEFINE_integer("top", 15, "Also list the N slowest ops.")


def _category(op: str) -> str:
  """The kind of an XLA:CPU thunk from its HLO instruction name."""
  kind = re.sub(r"\.\d+$", "", op)
  if kind.startswith("conv"):
    return "convolution (launch only)"
  if kind.startswith("dot"):
    return "dot (launch only)"
  if kind.startswith(("custom-call", "ffi_call")):
    return "native kernel (shiftjax FFI call)"
  if kind.startswith(("while", "call", "conditional")):
    return "loop/control"
  if "ynn" in kind or "reduce" in kind:
    return "reduction"
  if any(k in kind for k in ("concatenate", "pad", "slice", "copy", "transpose")):
    return "copy/pad/concatenate/slice"
  return "elementwise fusion"


def _hlo_op_names(compiled_text: str) -> dict[str, str]:
  """{instruction name: jax op_name metadata} of a compiled HLO module."""
  names = {}
  for line in compiled_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = .*op_name="([^"]*)"', line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def _thunk_events(trace_dir: str):
  """(name, microseconds) of every XLA op event in the perfetto trace under trace_dir."""
  path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name \
        and "PjRt" not in name and "PjitFunction" not in name:
      yield name, e["dur"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  host_memory.reuse_freed_memory()  # as experiments/train.py does
  quantizer = None if args.float else sj.DenseShift(bits=3)
  options = None if args.plain else conv.eigen_conv_options()
  step = resnet20_step.Resnet20Step(quantizer, not args.plain, resnet20_step.random_batch(128),
                                    options)
  for _ in range(3):  # compile, then steps on donated state
    step()
  op_names = _hlo_op_names(step.step.as_text())

  wall, cpu = time.perf_counter(), time.process_time()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        step()
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    events = list(_thunk_events(trace_dir))

  by_kind, by_op = collections.Counter(), collections.Counter()
  for name, us in events:
    source = op_names.get(name, "")
    pass_ = "backward" if "transpose(" in source else "forward"
    by_kind[(_category(name), pass_)] += us / 1e3 / args.steps
    by_op[name] += us / 1e3 / args.steps
  print(f"{'float' if args.float else 'DenseShift 3-bit'} ResNet-20 step, batch 128, "
        f"{'plain' if args.plain else 'fast'}: {wall / args.steps * 1e3:.0f} ms wall, "
        f"{cpu / args.steps * 1e3:.0f} ms CPU per step (traced)")
  print(f"\n{'thread-ms per step':>20}  kind of op, pass")
  for (kind, pass_), ms in by_kind.most_common():
    print(f"{ms:20.1f}  {kind}, {pass_}")
  print(f"{sum(by_kind.values()):20.1f}  all traced ops")
  print(f"\n{'thread-ms per step':>20}  slowest ops (jax source)")
  for name, ms in by_op.most_common(args.top):
    print(f"{ms:20.2f}  {name}  {op_names.get(name, '')[-70:]}")


if __name__ == "__main__":
  app.run(main)
