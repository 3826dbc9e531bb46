"""Times a ResNet-20 training step on CPU: float and DenseShift, fast conv gradients on/off,
and a plain PyTorch ResNet-20 (issue 7).

    python benchmarks/train_step.py                 # batch 128, 15 repetitions
    python benchmarks/train_step.py --reps=31 --notorch

(absl flags: ``--notorch`` or ``--torch=false`` and ``--noreuse_freed_memory`` are what
argparse's ``--no-torch`` and ``--no-reuse-freed-memory`` were.)

Our step is ``shiftjax.loop.train_step`` (``shiftjax.benchmarking.resnet20_step``: what
training runs: uint8 images normalized on device, SGD momentum 0.9 + coupled weight decay
1e-4, BatchNorm statistics updated), jitted with the state donated as
``train_and_evaluate`` does, on CIFAR shapes (32x32x3, 10 classes). Variants: float and
DenseShift 3-bit (stem and head float, as the recipe), each "plain" (XLA's own gradients
and convolution libraries: ``fast_grad='off'``, ``eigen_convs='off'``) and "fast" (what
training runs on CPU by default: our conv and BatchNorm gradients,
``shiftjax.kernels.training.conv`` and ``shiftjax.batch_norm``, convs and kernel gradients
on the native C++ kernels, ``shiftjax.kernels.cpu.native``, and the remaining XLA
convolutions on Eigen, ``conv.eigen_conv_options``); "DenseShift3 fast grad" has our
gradients on XLA's default libraries and "DenseShift3 fast no native" everything but the
native kernels, to show each part's share. This process keeps freed host memory for reuse
as the launcher does (``shiftjax.host_memory``, off with ``--noreuse_freed_memory``);
"DenseShift3 fast malloc default" runs in a child process that does not, stepped in turn
with the others, to show what that saves (the page faults column counts the kernel mapping
XLA's scratch buffer in again). The PyTorch step is the same architecture (3x3 stem 16,
three stages of three basic blocks 16/32/64, 1x1 conv + BN projection shortcuts, global
average pool, fc), float, SGD momentum + weight decay, run with
``torch.set_num_threads(2)`` and (1): on a machine loaded by other jobs, PyTorch's OpenMP
threads spin at every barrier while the other thread waits for a core, so its 2-thread CPU
time counts spinning; the 1-thread CPU time is the work itself. torch is optional (``pip
install -e .[bench]``); without it that part is skipped.

Repetitions alternate between all variants (``shiftjax.benchmarking.timing``) and each
number is a median, so the ratios hold on a machine shared with other jobs; the absolute
times do not. Both wall time and the process's CPU time (all threads) are printed: on a
loaded machine, CPU time is the steadier of the two, wall time is what a user waits for.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax

import shiftjax as sj
from shiftjax import host_memory
from shiftjax.benchmarking import resnet20_step
from shiftjax.benchmarking import timing
from shiftjax.kernels.training import conv
from shiftjax.kernels.cpu import native

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("reps", 15, "Repetitions per variant.")
flags.DEFINE_bool("torch", True, "Time the PyTorch step too; --notorch skips it.")
flags.DEFINE_bool("reuse_freed_memory", True,
                  "Keep freed host memory for reuse (see shiftjax.host_memory); "
                  "--noreuse_freed_memory leaves glibc's malloc as it is.")
flags.DEFINE_bool("worker", False, "Internal: serve steps to the parent process.")


class WorkerStep:
  """``DenseShift3 fast`` in a child process started without
  ``host_memory.reuse_freed_memory()`` (glibc's default malloc), stepped on demand so it
  interleaves with the steps of this process; reports the child's CPU time and faults."""

  def __init__(self, batch_size: int):
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", f"--batch={batch_size}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.native = self._read() == "native"

  def _read(self) -> str:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError("the train_step.py --worker child exited")
    return line.strip()

  def __call__(self) -> timing.Reported:
    self.process.stdin.write("step\n")
    self.process.stdin.flush()
    cpu, faults = self._read().split()
    return timing.Reported({"cpu": float(cpu), "faults": int(faults)})

  def close(self):
    self.process.stdin.close()
    self.process.wait()


def _serve_worker(batch_size: int):
  """The child of WorkerStep: one step per "step" line on stdin."""
  step = resnet20_step.Resnet20Step(sj.DenseShift(bits=3), True,
                                    resnet20_step.random_batch(batch_size),
                                    conv.eigen_conv_options())
  print("native" if step.native else "xla", flush=True)
  for _ in sys.stdin:
    cpu, faults = time.process_time(), _minor_faults()
    step()
    print(time.process_time() - cpu, _minor_faults() - faults, flush=True)


def _torch_steps(batch: dict, threads=(2, 1)) -> dict:
  """{name: PyTorch ResNet-20 float train step on n threads}, or {} without torch."""
  try:
    import torch
    from torch import nn
  except ImportError:
    return {}
  torch.manual_seed(0)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  class ResNet20(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for i, width in enumerate((16, 32, 64)):
        for j in range(3):
          blocks.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, resnet20_step.NUM_CLASSES)

    def forward(self, x):
      x = self.blocks(torch.relu(self.bn(self.stem(x))))
      return self.fc(x.mean((2, 3)))

  model = ResNet20().train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  spec = sj.data.get_spec("cifar10")
  mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
  std = torch.tensor(spec.std).view(1, 3, 1, 1)
  images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  labels = torch.from_numpy(batch["label"]).long()

  def step(num_threads):
    torch.set_num_threads(num_threads)
    x = (images.float() / 255 - mean) / std  # as our step: normalized in the step
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    return loss.item()
  return {f"PyTorch float {n}t": functools.partial(step, n) for n in threads}


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.worker:
    return _serve_worker(args.batch)
  # As experiments/train.py does, before JAX's first computation.
  reused = args.reuse_freed_memory and host_memory.reuse_freed_memory()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
        f"device(s), {os.cpu_count()} CPUs, shiftjax {sj.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, freed host memory reused: {reused}")
  batch = resnet20_step.random_batch(args.batch)
  fns, step = {}, resnet20_step.Resnet20Step
  eigen = conv.eigen_conv_options()
  print(f"eigen_conv_options: {eigen or 'not available (not CPU, or unknown to jaxlib)'}")
  for qname, quantizer in (("float", None), ("DenseShift3", sj.DenseShift(bits=3))):
    fns[f"{qname} plain"] = step(quantizer, False, batch)
    fns[f"{qname} fast"] = step(quantizer, True, batch, eigen)
  fns["DenseShift3 fast grad"] = step(sj.DenseShift(bits=3), True, batch)
  if native.available():
    fns["DenseShift3 fast no native"] = step(sj.DenseShift(bits=3), True, batch, eigen,
                                             native_kernels=False)
  if reused:
    fns["DenseShift3 fast malloc default"] = WorkerStep(args.batch)
  torch_steps = _torch_steps(batch) if args.torch else {}
  if torch_steps:
    import torch
    fns.update(torch_steps)
    print(f"torch {torch.__version__} (PyTorch float Nt: torch.set_num_threads(N))")
  elif args.torch:
    print("torch is not installed (pip install -e .[bench]): PyTorch step skipped")

  # Warm-up: compile, then one step on a donated state. The pause lets idle OpenMP
  # threads of the previous variant stop spinning.
  timings = timing.interleaved(fns, args.reps, warmup=2, pause=0.05,
                               counters={**timing.CPU_TIME, "faults": _minor_faults})
  t = {name: (x.median, x.median_of("cpu"), x.median_of("faults"))
       for name, x in timings.items()}
  for fn in fns.values():
    if isinstance(fn, WorkerStep):
      fn.close()
  print(f"\nResNet-20 train step, batch {args.batch}, {args.reps} interleaved repetitions: "
        "median ms wall (cpu), page faults")
  for name, (wall, cpu, faults) in t.items():
    uses = " native kernels" if getattr(fns[name], "native", False) else ""
    print(f"  {name:31s} {wall * 1e3:5.0f} ({cpu * 1e3:4.0f}) {faults:6.0f}  "
          f"{args.batch / wall:5.1f} img/s  cores busy {cpu / wall:4.2f}{uses}")

  rows = [("DenseShift fast / DenseShift plain", "DenseShift3 fast", "DenseShift3 plain", "<= 0.5"),
          ("float fast / float plain", "float fast", "float plain", ""),
          ("DenseShift / float, fast", "DenseShift3 fast", "float fast", "< 1.05"),
          ("DenseShift / float, plain", "DenseShift3 plain", "float plain", "< 1.05")]
  rows.append(("DenseShift fast grad only / plain", "DenseShift3 fast grad",
               "DenseShift3 plain", ""))
  rows.append(("Eigen convs: DenseShift fast / fast grad", "DenseShift3 fast",
               "DenseShift3 fast grad", ""))
  if "DenseShift3 fast no native" in t:
    rows.append(("native kernels: DenseShift fast / without", "DenseShift3 fast",
                 "DenseShift3 fast no native", ""))
  if "DenseShift3 fast malloc default" in t:
    rows.append(("freed memory reused: DenseShift fast / not", "DenseShift3 fast",
                 "DenseShift3 fast malloc default", ""))
  for name in torch_steps:
    rows += [(f"ours float fast / {name}", "float fast", name, "<= 1.0"),
             (f"ours DenseShift fast / {name}", "DenseShift3 fast", name, "<= 1.0")]
  print(f"\n{'ratios':46s}  wall    cpu")
  for label, a, b, goal in rows:
    print(f"  {label:44s} {t[a][0] / t[b][0]:5.2f}  {t[a][1] / t[b][1]:5.2f}"
          + (f"   (goal {goal})" if goal else ""))


if __name__ == "__main__":
  app.run(main)
