"""Times packed inference against float inference of the same ResNet-20 on the CPU.

    python benchmarks/packed_inference.py [--bits=3] [--reps=N]    (absl flags)

One randomly initialized DenseShift ResNet-20 (CIFAR-10, 32x32x3), three ways, each one
jitted call with its weights as arguments (nothing decoded ahead of time is cached):

  float     the flax model in eval mode with float32 kernels equal to the decoded codes
            (``resnet20()``, a float model: conv on the native CPU kernel, unfolded
            BatchNorm, relu, each a pass of its own)
  folded    the packed forward pass with float32 kernels and BatchNorm folded
            (``export`` of that float model): ``kernels.fused_conv``, the native conv
            with scale, bias, residual and relu applied in its registers
  words     ``packed_apply``: N-bit codes in uint32 words of floor(32/N) codes, unpacked
            and decoded inside every call (``shiftjax.kernels.pow2_conv``'s XLA path on
            CPU), then ``fused_conv``
  planes    ``packed_apply`` of the bit-plane layout (exactly N bits per weight, the
            export default): decoded inside every call, then ``fused_conv``

Batch 1 and 128; the variants run interleaved, in a rotating order
(``shiftjax.benchmarking.timing``), so that load from other processes hits all alike;
medians (and 10th/90th percentiles) and the median's ratio to float are printed.
The goal: packed (either layout) <= 1.0x float while the weights stay packed.
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
  float_vars = float_twin(variables, quantizer)
  packed = {layout: ex.export(variables, model, code_layout=layout)
            for layout in sj.deploy.CODE_LAYOUTS}
  folded = ex.export(float_vars, float_model)

  float_fn = jax.jit(functools.partial(float_model.apply, train=False))
  variants = {
      "float": lambda x: float_fn(float_vars, x),
      "folded": lambda x: deploy.packed_apply(folded, x),
      "words": lambda x: deploy.packed_apply(packed["words"], x),
      "planes": lambda x: deploy.packed_apply(packed["bitplanes"], x),
  }
  float_vars = jax.device_put(float_vars)
  weight_bytes = {
      "float": sum(np.asarray(a).nbytes for a in jax.tree.leaves(float_vars)),
      "folded": sum(a.nbytes for a in folded.arrays.values()),
      "words": sum(a.nbytes for a in packed["words"].arrays.values()),
      "planes": sum(a.nbytes for a in packed["bitplanes"].arrays.values()),
  }
  print(f"ResNet-20, DenseShift {args.bits}-bit, CPU ({jax.device_count()} device, "
        f"{jax.devices()[0].device_kind}); weights held: " + ", ".join(
            f"{k} {v / 1024:.0f} KiB" for k, v in weight_bytes.items()))
  for layout, model_ in packed.items():
    fmt, quantized = model_.code_format, [l for l in model_.layers if l.quantized]
    decode_all = jax.jit(lambda arrays: [deploy.decode_kernel(  # pylint: disable=cell-var-from-loop
        arrays[f"{l.name}/kernel"], fmt, l.shape, layout) for l in quantized])
    decode = timing.interleaved(
        {"decode": functools.partial(decode_all, model_.device_arrays)}, 200, counters={})
    print(f"unpack + decode of all {len(quantized)} packed kernels alone, {layout}: median "
          f"{decode['decode'].median * 1e3:.3f} ms")
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
