"""Times packed inference against float inference of the same ResNet-20 on the CPU.

    python benchmarks/packed_inference.py [--bits=3] [--reps=N]    (absl flags)

One randomly initialized DenseShift ResNet-20 (CIFAR-10, 32x32x3; BatchNorm statistics
set to non-trivial values, as after training), two ways, each one jitted call with its
variables as arguments (nothing decoded ahead of time is cached):

  float     the flax model in eval mode with float32 kernels equal to the decoded codes
            (``resnet20()``, a float model: each conv on the native CPU conv, then
            BatchNorm and relu)
  packed    the packed file (format version 4) run by the ResNet's own flax code:
            ``export.export`` -> ``PackedTree.to_bytes`` -> ``deploy.from_bytes`` ->
            ``export.load`` -> ``packed_module.apply(variables, x, train=False)``. Each
            quantized conv holds its N-bit codes in uint32 words (floor(32/N) codes per
            word, made from the file's bit planes once, at load), decodes them by bit
            assembly inside every call and runs the native conv with its BatchNorm
            folded into a per-channel scale and bias applied in its registers
            (``kernels.fused_conv``)
  fused     packed, through ``deploy.fuse_conv_epilogues``: the residual add and relu
            that the ResNet's blocks apply after each conv move into that native call

It also times decoding all packed kernels alone (every quantized conv's words to float32
weights, one jitted call). Batch 1 and 128; the variants run interleaved, in a rotating
order (``shiftjax.benchmarking.timing``), so that load from other processes hits both
alike; medians (and 10th/90th percentiles) and the median's ratio to float are printed.
Both must agree to a relative error below 1e-4 first.

The goal: packed <= 1.0x float at batch 1 and 128, while the weights stay packed.
"""

from __future__ import annotations

import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import shiftjax as sj
from shiftjax import deploy
from shiftjax import export as ex
from shiftjax import models
from shiftjax.benchmarking import timing
from shiftjax.deploy import packed_layers

FLAGS = flags.FLAGS
flags.DEFINE_integer("bits", 3, "DenseShift code width.")
flags.DEFINE_integer("reps", 0, "Repetitions per variant; 0: 200 at batch 1, 30 at 128.")


def float_twin(variables, quantizer):
  """The float model's variables: every latent kernel replaced by its decoded weight."""
  def visit(tree):
    out = {}
    for k, v in tree.items():
      if k == "kernel" and hasattr(v, "keys"):
        out[k] = np.asarray(quantizer.weight(v))
      elif hasattr(v, "items"):
        out[k] = visit(v)
      else:
        out[k] = v
    return out
  return {"params": visit(variables["params"]), "batch_stats": variables["batch_stats"]}


def decode_all(packed_module, packed_variables):
  """A jitted call that decodes every packed kernel of ``packed_module`` to float32."""
  table = type(packed_module).packed_layers  # ((path, LayerEntry), ...)
  codes = packed_variables[packed_layers.CODES_COLLECTION]

  def words_of(tree, path):
    for part in path.split("/"):
      tree = tree[part]
    return tree["kernel"]

  words = {path: words_of(codes, path) for path, _ in table}
  fn = jax.jit(lambda words: [packed_layers.decode_words(
      words[path], entry.weight_spec, entry.kernel_shape) for path, entry in table])
  return len(table), functools.partial(fn, words)


def nbytes(tree) -> int:
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS

  quantizer = sj.DenseShift(bits=args.bits, init_method="he")
  model = models.resnet20(num_classes=10, quantizer=quantizer)
  float_model = models.resnet20(num_classes=10)
  variables = jax.device_get(jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3))))
  # Non-trivial BatchNorm statistics, as after training.
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda x: np.asarray(rng.uniform(0.5, 2.0, x.shape), np.float32), variables["batch_stats"])
  float_vars = jax.device_put(float_twin(variables, quantizer))

  tree = ex.export(variables, model)  # format version 4
  file_bytes = len(tree.to_bytes())
  packed_module, packed_vars = ex.load(deploy.from_bytes(tree.to_bytes()))

  float_fn = jax.jit(functools.partial(float_model.apply, train=False))
  packed_fn = jax.jit(functools.partial(packed_module.apply, train=False))
  fused_fn = jax.jit(deploy.fuse_conv_epilogues(functools.partial(packed_module.apply,
                                                                  train=False)))
  variants = {
      "float": lambda x: float_fn(float_vars, x),
      "packed": lambda x: packed_fn(packed_vars, x),
      "fused": lambda x: fused_fn(packed_vars, x),
  }
  print(f"ResNet-20, DenseShift {args.bits}-bit, CPU ({jax.device_count()} device, "
        f"{jax.devices()[0].device_kind}); weights held: float {nbytes(float_vars) / 1024:.0f} "
        f"KiB, packed {nbytes(packed_vars) / 1024:.0f} KiB (codes in words); file "
        f"{file_bytes / 1024:.0f} KiB (codes in bit planes)")
  n_layers, decode = decode_all(packed_module, packed_vars)
  times = timing.interleaved({"decode": decode}, 200, counters={})
  print(f"unpack + decode of all {n_layers} packed kernels alone: median "
        f"{times['decode'].median * 1e3:.3f} ms")
  for batch in (1, 128):
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    reference = np.asarray(variants["float"](x))
    for name, fn in variants.items():  # compile, and check they agree
      out = np.asarray(fn(x))
      err = np.max(np.abs(out - reference)) / np.max(np.abs(reference))
      assert err < 1e-4, (name, err)
    reps = args.reps or (200 if batch == 1 else 30)
    # Already compiled above; the order rotates so that no variant always follows the same.
    calls = {name: functools.partial(fn, x) for name, fn in variants.items()}
    times = timing.interleaved(calls, reps, warmup=0, rotate=True, counters={})
    base = times["float"].median
    for name, t in times.items():
      med = t.median
      print(f"batch {batch:3d}  {name:7s} median {med * 1e3:8.3f} ms  "
            f"({batch / med:8.0f} img/s)  {med / base:5.2f}x float  "
            f"[p10 {t.p10 * 1e3:.3f}, p90 {t.p90 * 1e3:.3f} ms]")


if __name__ == "__main__":
  app.run(main)
