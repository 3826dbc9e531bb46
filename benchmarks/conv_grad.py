"""Times conv gradients on CPU: XLA's autodiff against ``shiftjax.kernels.training.conv``'s fast path (issue 7).

    python benchmarks/conv_grad.py               # all five parts, batch 128
    python benchmarks/conv_grad.py --parts=convs --reps=21
    python benchmarks/conv_grad.py --parts=kgrad

(absl flags; ``--parts`` is comma-separated.)

1. convs: each ResNet-20 conv shape alone (inputs already in memory): the forward, XLA's
   gradient (input + kernel, ``jax.vjp`` of ``lax.conv_general_dilated``) and the fast
   gradient (``conv2d(..., fast_grad=True)``).
2. scan: the same gradient summed over 2 micro-batches in ``lax.scan`` (gradient
   accumulation), 32x32x16 layer.
3. kgrad: the kernel gradient alone, per conv shape: the native C++ kernel
   (``shiftjax.kernels.cpu.native``, what the fast gradient uses on CPU), the XLA matmul loop
   it replaced (``native.disabled()``) and XLA's autodiff, with GFLOP/s.
4. step: a ResNet-20 train step (``shiftjax.models.resnet20``, BatchNorm, SGD) with
   ``fast_grad`` off and on.
5. fwd: the forward conv alone, per conv shape: the native C++ kernel (what the fast path
   runs on CPU), XLA's conv with its default libraries and with ``eigen_conv_options``.

Repetitions alternate between the variants of a row (``shiftjax.benchmarking.timing``) and
each number is a median, so the ratios hold on a machine shared with other jobs; the
absolute times do not. Both wall time and the process's CPU time (all threads) are
printed: on a loaded machine, CPU time is the steadier of the two.
"""

from __future__ import annotations

import functools

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

import shiftjax as sj
from shiftjax import models
from shiftjax.benchmarking import timing
from shiftjax.kernels.training import conv as sc
from shiftjax.kernels.cpu import native

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_integer("reps", 11, "Repetitions per variant.")
flags.DEFINE_list("parts", ["convs", "scan", "kgrad", "step", "fwd"], "A subset of the parts.")

DN = ("NHWC", "HWIO", "NHWC")

# name, input H(=W), Ci, Co, kernel, stride; padding SAME (3x3) or VALID (1x1), as in ResNet-20
SHAPES = [
    ("3x3 s1 32x32x16", 32, 16, 16, 3, 1),
    ("3x3 s1 16x16x32", 16, 32, 32, 3, 1),
    ("3x3 s1 8x8x64", 8, 64, 64, 3, 1),
    ("3x3 s2 32x32x16->32", 32, 16, 32, 3, 2),
    ("3x3 s2 16x16x32->64", 16, 32, 64, 3, 2),
    ("1x1 s2 32x32x16->32", 32, 16, 32, 1, 2),
    ("1x1 s2 16x16x32->64", 16, 32, 64, 1, 2),
    ("stem 3x3 32x32x3->16", 32, 3, 16, 3, 1),
]


def _interleaved(fns: dict, reps: int) -> dict:
  """{name: (fn, args)} -> {name: (median wall s, median cpu s)}, repetitions alternating
  (one untimed call of each first: compiles)."""
  calls = {name: functools.partial(fn, *args) for name, (fn, args) in fns.items()}
  t = timing.interleaved(calls, reps)
  return {name: (x.median, x.median_of("cpu")) for name, x in t.items()}


def _conv(stride, padding, fast):
  if fast is None:
    return lambda x, k: lax.conv_general_dilated(x, k, (stride, stride), padding,
                                                 dimension_numbers=DN)
  return lambda x, k: sc.conv2d(x, k, (stride, stride), padding, fast_grad=fast)


def _grad_fn(conv):
  return jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g))


def _data(batch, h, ci, co, k, stride, seed=0):
  rng = np.random.default_rng(seed)
  padding = "SAME" if k > 1 else "VALID"
  x = jnp.asarray(rng.standard_normal((batch, h, h, ci)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)) / np.sqrt(k * k * ci), jnp.float32)
  y = _conv(stride, padding, None)(x, kernel)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  return x, kernel, g, padding


def _check(got, want, what):
  for a, b in zip(got, want):
    err = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    if err > 1e-5:
      raise SystemExit(f"{what}: fast gradient differs from XLA's by {err:.1e} (relative)")


def bench_convs(batch, reps):
  print(f"\n1. single convs, batch {batch}: median ms wall (cpu); ratios of wall (cpu)")
  print(f"{'shape':22s} {'forward':>14s} {'XLA grad':>14s} {'fast grad':>14s} "
        f"{'XLA/fwd':>12s} {'fast/fwd':>12s} {'fast/XLA':>12s}")
  total = np.zeros((3, 2))
  for name, h, ci, co, k, s in SHAPES:
    x, kernel, g, padding = _data(batch, h, ci, co, k, s)
    xla, fast = _grad_fn(_conv(s, padding, None)), _grad_fn(_conv(s, padding, True))
    _check(fast(x, kernel, g), xla(x, kernel, g), name)
    t = _interleaved({"fwd": (jax.jit(_conv(s, padding, None)), (x, kernel)),
                      "xla": (xla, (x, kernel, g)), "fast": (fast, (x, kernel, g))}, reps)
    t = np.array([t["fwd"], t["xla"], t["fast"]]) * 1e3
    total += t
    _print_row(name, t)
  _print_row("sum", total)


def _print_row(name, t):
  ms = lambda r: f"{r[0]:6.1f} ({r[1]:5.1f})"
  ratio = lambda a, b: f"{a[0] / b[0]:5.2f} ({a[1] / b[1]:4.2f})"
  print(f"{name:22s} {ms(t[0]):>14s} {ms(t[1]):>14s} {ms(t[2]):>14s} "
        f"{ratio(t[1], t[0]):>12s} {ratio(t[2], t[0]):>12s} {ratio(t[2], t[1]):>12s}")


def _native_table(title: str, columns: tuple[str, str, str], ratio: str, variants,
                  batch: int, reps: int):
  """One row per ResNet-20 conv shape: three variants' median ms (GFLOP/s), the first
  (the native kernel) over the second, and the sums. ``variants(batch, h, ci, co, k, s)``
  gives ``{label: (fn, args)}`` for a shape, its results already checked."""
  print(f"\n{title}, batch {batch}: median ms wall (GFLOP/s)")
  if not native.available():
    print("native kernels not available (no C++ compiler, SHIFTJAX_NATIVE=0 or not CPU)")
    return
  print(f"{'shape':22s} " + " ".join(f"{c:>16s}" for c in columns) + f" {ratio:>12s}")
  total = np.zeros(3)
  for name, h, ci, co, k, s in SHAPES:
    fns = variants(batch, h, ci, co, k, s)
    t = np.array([v[0] for v in _interleaved(fns, reps).values()]) * 1e3
    total += t
    flops = 2 * batch * (-(-h // s)) ** 2 * k * k * ci * co
    cell = lambda ms: f"{ms:6.2f} ({flops / ms / 1e6:4.0f})"
    print(f"{name:22s} " + " ".join(f"{cell(ms):>16s}" for ms in t) + f" {t[0] / t[1]:12.2f}")
  print(f"{'sum':22s} " + " ".join(f"{ms:16.2f}" for ms in total)
        + f" {total[0] / total[1]:12.2f}")


def _kernel_grad_variants(batch, h, ci, co, k, s):
  x, kernel, g, padding = _data(batch, h, ci, co, k, s)
  pads = tuple(lax.padtype_to_pads((h, h), (k, k), (s, s), padding))
  # One function per variant: jit caches traces by function, and the choice between
  # the native kernel and the loop is made when tracing.
  kgrad = lambda: lambda x, g: sc._kernel_grad(x, g, (k, k), (s, s), pads)  # pylint: disable=protected-access
  autodiff = jax.jit(lambda x, k_, g: jax.vjp(
      lambda k_: _conv(s, padding, None)(x, k_), k_)[1](g)[0])
  fns = {"native": (jax.jit(kgrad()).lower(x, g).compile(), (x, g))}
  with native.disabled():  # traced (and compiled) here: the XLA loop
    fns["loop"] = (jax.jit(kgrad()).lower(x, g).compile(), (x, g))
  fns["autodiff"] = (autodiff, (x, kernel, g))
  want = autodiff(x, kernel, g)
  for label in ("native", "loop"):
    _check([fns[label][0](x, g)], [want], f"{h}x{h}x{ci}->{co} k{k} s{s} {label}")
  return fns


def _forward_variants(batch, h, ci, co, k, s):
  x, kernel, _, padding = _data(batch, h, ci, co, k, s)
  pads = tuple(lax.padtype_to_pads((h, h), (k, k), (s, s), padding))
  xla = _conv(s, padding, None)
  fns = {"native": (jax.jit(lambda x, k_: native.conv(x, k_, (s, s), pads)), (x, kernel)),
         "xla": (jax.jit(xla), (x, kernel)),
         "eigen": (jax.jit(xla, compiler_options=sc.eigen_conv_options()), (x, kernel))}
  _check([fns["native"][0](x, kernel)], [fns["xla"][0](x, kernel)],
         f"{h}x{h}x{ci}->{co} k{k} s{s} native")
  return fns


def bench_kernel_grad(batch, reps):
  _native_table("3. kernel gradient alone", ("native", "XLA loop", "XLA autodiff"),
                "native/loop", _kernel_grad_variants, batch, reps)


def bench_forward(batch, reps):
  _native_table("5. forward conv alone", ("native", "XLA", "XLA on Eigen"), "native/XLA",
                _forward_variants, batch, reps)


def bench_scan(batch, reps):
  print(f"\n2. gradient in lax.scan over 2 micro-batches of {batch // 2}, 3x3 s1 32x32x16: "
        "median ms wall (cpu)")
  x, kernel, g, padding = _data(batch, 32, 16, 16, 3, 1)
  fns = {}
  for label, fast in (("XLA", None), ("fast", True)):
    conv = _conv(1, padding, fast)

    def accumulate(x, k, g, conv=conv):
      def body(acc, xg):
        dx, dk = jax.vjp(conv, xg[0], k)[1](xg[1])
        return acc + dk, dx
      split = lambda a: a.reshape(2, a.shape[0] // 2, *a.shape[1:])
      return lax.scan(body, jnp.zeros_like(k), (split(x), split(g)))
    fns[label] = (jax.jit(accumulate), (x, kernel, g))
    fns[label + " no scan"] = (_grad_fn(conv), (x, kernel, g))
  t = _interleaved(fns, reps)
  for label, (wall, cpu) in t.items():
    print(f"  {label:14s} {wall * 1e3:8.1f} ({cpu * 1e3:7.1f})")
  print(f"  XLA in scan / no scan: {t['XLA'][0] / t['XLA no scan'][0]:.1f}x; "
        f"fast in scan / XLA in scan: {t['fast'][0] / t['XLA'][0]:.3f}")


def bench_step(batch, reps):
  print(f"\n4. ResNet-20 train step, batch {batch}, 32x32x3, SGD momentum: median ms wall (cpu)")
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  labels = jnp.arange(batch) % 10
  tx = optax.sgd(0.1, momentum=0.9)
  fns = {}
  for label, fast in (("fast_grad off", False), ("fast_grad on", True)):
    model = models.resnet20(fast_grad=fast)
    variables = model.init(jax.random.key(1), x[:2])
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def step(state, x, labels, model=model):
      params, batch_stats, opt = state

      def loss_fn(params):
        logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new["batch_stats"]
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), batch_stats, opt), loss
    fns[label] = (jax.jit(step), (state, x, labels))
  (s_off, l_off), (s_on, l_on) = (fn(*args) for fn, args in fns.values())
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s_off[0]),
                                                            jax.tree.leaves(s_on[0])))
  print(f"  one step from the same state: loss {float(l_off):.6f} vs {float(l_on):.6f}, "
        f"largest parameter difference {diff:.1e}")
  t = _interleaved(fns, reps)
  for label, (wall, cpu) in t.items():
    print(f"  {label:14s} {wall * 1e3:8.0f} ({cpu * 1e3:6.0f})  {batch / wall:6.1f} img/s")
  off, on = t["fast_grad off"], t["fast_grad on"]
  print(f"  on / off: {on[0] / off[0]:.2f} wall ({on[1] / off[1]:.2f} cpu)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = FLAGS
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"shiftjax {sj.__version__}")
  parts = args.parts
  if "convs" in parts:
    bench_convs(args.batch, args.reps)
  if "scan" in parts:
    bench_scan(args.batch, max(3, args.reps // 3))
  if "kgrad" in parts:
    bench_kernel_grad(args.batch, args.reps)
  if "step" in parts:
    bench_step(args.batch, args.reps)
  if "fwd" in parts:
    bench_forward(args.batch, args.reps)


if __name__ == "__main__":
  app.run(main)
