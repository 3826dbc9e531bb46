"""The native CPU conv kernels under data parallelism: with the batch sharded over 4 (virtual
CPU) devices, conv2d's forward and gradients run the native kernels on each device's shard
and equal the same computation on one device.

``--xla_force_host_platform_device_count`` is read when the CPU backend starts, so the
4-device run happens in a subprocess; the 1-device reference runs in this process.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shiftjax.kernels.cpu import native

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEVICES = 4

# name: strides, padding. x [8, 12, 12, 16] (2 images per device), kernel [3, 3, 16, 32]
CASES = {"s1_same": ((1, 1), "SAME"), "s2_pads": ((2, 2), ((0, 1), (2, 1)))}
X_SHAPE, K_SHAPE = (8, 12, 12, 16), (3, 3, 16, 32)

# Shared by both processes: the data and the computation (forward, input and kernel grads).
COMMON = r"""
import jax, jax.numpy as jnp, numpy as np
from shiftjax.kernels.training import conv as sc

def data(x_shape, k_shape, strides, padding, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  k = (rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:3]))).astype(np.float32)
  y_shape = jax.eval_shape(lambda x, k: sc.conv2d(x, k, strides, padding, fast_grad=False),
                           x, k).shape
  return x, k, rng.standard_normal(y_shape).astype(np.float32)

def step(strides, padding):
  def f(x, k, r):
    y, vjp = jax.vjp(lambda x, k: sc.conv2d(x, k, strides, padding, fast_grad=True), x, k)
    dx, dk = vjp(r)  # the gradients of sum(y * r)
    return y, dx, dk
  return jax.jit(f)
"""

# Runs in the 4-device subprocess: argv = output .npz path, then JSON of CASES and shapes.
SCRIPT = COMMON + r"""
import json, re, sys
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shiftjax.kernels.cpu import native

if not native.available():
  print("SKIP native kernels not available (no C++ compiler?)")
  sys.exit(0)
path, cases, x_shape, k_shape = sys.argv[1], *map(json.loads, sys.argv[2:])
assert jax.device_count() == 4
mesh = Mesh(np.array(jax.devices()), ("batch",))
on = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
out = {}
for name, (strides, padding) in cases.items():
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  x, k, r = data(x_shape, k_shape, tuple(strides), padding)
  f = step(tuple(strides), padding)
  args = on(x, "batch"), on(k), on(r, "batch")
  hlo = f.lower(*args).compile().as_text()
  # the native kernels run (not the XLA fallback), on shards: nothing gathers the batch
  for target in ("shiftjax_conv", "shiftjax_conv_kernel_grad"):
    assert re.search(rf'custom_call_target="{target}"', hlo), (name, target)
  assert not re.search(r"all-gather|all-to-all", hlo), name
  assert len(re.findall(r"all-reduce\(", hlo)) == 1, name  # the kernel gradient's psum
  # each device convolves its own 2 images
  assert re.search(r"f32\[2,\d+,\d+,32\]\{[\d,]+\} custom-call\(", hlo), name
  y, dx, dk = f(*args)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 4), (name, y.sharding)
  assert dx.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 4), name
  out.update({f"{name}/y": y, f"{name}/dx": dx, f"{name}/dk": dk})
  if name == "s1_same":
    # x sharded on its rows instead: the partitioner moves that sharding to the batch (no
    # call runs on all 8 images), same values
    rows = on(x, None, "batch"), args[1], args[2]
    hlo = f.lower(*rows).compile().as_text()
    assert not re.search(r"f32\[8,[\d,]+\]\{[\d,]+\} custom-call", hlo)
    out.update(zip(("rows/y", "rows/dx", "rows/dk"), f(*rows)))
    # In shard_map: the plain calls on each block, their results typed as varying there
    # (jax.vjp checks that). The kernel is made varying because conv2d's custom VJP returns
    # dk as typed by x and g (varying) for an invariant kernel: a mismatch jax rejects.
    def blocks(x, k, r, axes):
      y, dx, dk = f(x, jax.lax.pcast(k, axes, to="varying"), r)
      return y, dx, jax.lax.psum(dk, axes)
    g = jax.jit(jax.shard_map(lambda *a: blocks(*a, "batch"), mesh=mesh,
                              in_specs=(P("batch"), P(), P("batch")),
                              out_specs=(P("batch"), P("batch"), P())))
    assert "shiftjax_conv_kernel_grad" in g.lower(*args).compile().as_text()
    out.update(zip(("smap/y", "smap/dx", "smap/dk"), g(*args)))
    # Partly manual, under the (deprecated) `with mesh:`: the partitioner's callback would
    # see blocks sharded over the manual axis and ask for that (XLA aborted): plain calls.
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    both = lambda a: jax.device_put(a, NamedSharding(mesh2, P(("model", "data"))))
    with mesh2:
      g = jax.jit(jax.shard_map(lambda *a: blocks(*a, "model"), mesh=mesh2, axis_names={"model"},
                                in_specs=(P("model"), P(), P("model")),
                                out_specs=(P("model"), P("model"), P())))
      out.update(zip(("partly/y", "partly/dx", "partly/dk"), g(both(x), k, both(r))))
    # vmap over sharded batches: a loop of sharded calls (custom_partitioning alone has no
    # batching rule)
    g = jax.jit(jax.vmap(lambda x, r: native.conv_kernel_grad(x, r, (3, 3), strides,
                                                               ((1, 1), (1, 1)))))
    vx, vr = on(np.stack([x, -2 * x]), None, "batch"), on(np.stack([r, r]), None, "batch")
    hlo = g.lower(vx, vr).compile().as_text()
    assert "shiftjax_conv_kernel_grad" in hlo and "all-gather" not in hlo
    out["vmap/dk"] = g(vx, vr)
np.savez(path, **{k: np.asarray(v) for k, v in out.items()})
print("ok")
"""


def _run_sharded(script, path, *args):
  """Runs ``script`` on 4 CPU devices with argv ``path, *args`` -> the .npz it saved there."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES}"])
  proc = subprocess.run([sys.executable, "-c", script, str(path), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  if proc.stdout.startswith("SKIP"):
    pytest.skip(proc.stdout.strip())
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
  return dict(np.load(path))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  return _run_sharded(SCRIPT, tmp_path_factory.mktemp("sharded") / "out.npz",
                      json.dumps(CASES), json.dumps(X_SHAPE), json.dumps(K_SHAPE))


needs_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                               reason="the native kernels are CPU kernels")


@functools.cache
def _one_device(name):
  """The case's data and (y, dx, dk) on one device, by the code the subprocess ran."""
  common = {}
  exec(COMMON, common)  # pylint: disable=exec-used
  strides, padding = CASES[name]
  x, k, r = common["data"](X_SHAPE, K_SHAPE, strides, padding)
  with jax.default_device(jax.devices()[0]):
    f = common["step"](strides, padding)
    assert "shiftjax_conv_kernel_grad" in f.lower(x, k, r).compile().as_text()
    return (x, k, r), dict(zip(("y", "dx", "dk"), f(x, k, r)))


def _close(got, want):
  # Per-device partial sums change the order of the kernel gradient's float sums.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_cpu
@pytest.mark.parametrize("name", list(CASES))
def test_batch_sharded_equals_one_device(sharded, name):
  for key, want in _one_device(name)[1].items():
    _close(sharded[f"{name}/{key}"], want)  # dk: a quarter of it without the psum


@needs_cpu
@pytest.mark.parametrize("run", ["rows", "smap", "partly"])
def test_resharded_and_shard_map_equal_one_device(sharded, run):
  for key, want in _one_device("s1_same")[1].items():
    _close(sharded[f"{run}/{key}"], want)


@needs_cpu
def test_vmap_over_sharded_batches(sharded):
  (x, _, r), _ = _one_device("s1_same")
  one = lambda x: native.conv_kernel_grad(jnp.asarray(x), jnp.asarray(r), (3, 3), (1, 1),
                                          ((1, 1), (1, 1)))
  _close(sharded["vmap/dk"], np.stack([one(x), one(-2 * x)]))


# A training step of a shift network, data parallel: ResNet-8 (16/32/64 channels, so every
# conv can take the native kernels; fast_grad=None is on for the CPU) with 3-bit DenseShift
# weights, the gradient of the cross-entropy of a batch of 8 images. BatchNorm trains on the
# batch statistics; in a global-view jit those are over the whole batch on any mesh, so the
# sharded step computes the 1-device step, only with other orders of summation.
MODEL_COMMON = r"""
import jax, jax.numpy as jnp, numpy as np
import shiftjax

def model_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((8, 16, 16, 3)).astype(np.float32)
  return x, np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)

def model_step():  # (init, value_and_grad of the loss in the params), both jitted
  model = shiftjax.models.resnet8(num_classes=10, quantizer=shiftjax.DenseShift(bits=3))
  init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))
  def loss(params, batch_stats, x, labels):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
  return init, jax.jit(jax.value_and_grad(loss))

def flat(loss, grads):  # {"loss": loss, "<path of each gradient leaf>": leaf}, numpy
  leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
  return {"loss": np.asarray(loss),
          **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}}
"""

# Runs in the 4-device subprocess: argv = output .npz path.
MODEL_SCRIPT = MODEL_COMMON + r"""
import re, sys
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shiftjax.kernels.cpu import native

if not native.available():
  print("SKIP native kernels not available (no C++ compiler?)")
  sys.exit(0)
assert jax.device_count() == 4
mesh = Mesh(np.array(jax.devices()), ("batch",))
on = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
x, labels = model_data()
init, step = model_step()
variables = init(x)
args = on(variables["params"]), on(variables["batch_stats"]), on(x, "batch"), on(labels, "batch")
hlo = step.lower(*args).compile().as_text()
calls = re.findall(r'f32\[(\d+),[\d,]+\]\{[\d,]+\} custom-call\([^)]*\), '
                   r'custom_call_target="(shiftjax_conv(?:_kernel_grad)?)"', hlo)
# every conv's kernel gradient on the native kernel (9 convs: stem, 3 blocks x 2, 2 shortcuts)
assert sum(t == "shiftjax_conv_kernel_grad" for _, t in calls) == 9, calls
# the forward convs and input gradients natively, each on its device's 2 images; nothing
# gathers an activation (or anything else) across devices
convs = [n for n, t in calls if t == "shiftjax_conv"]
assert len(convs) >= 9 and set(convs) == {"2"}, convs
assert not re.search(r"all-gather|all-to-all", hlo)
loss, grads = step(*args)
np.savez(sys.argv[1], **flat(loss, grads))
print("ok")
"""


@needs_cpu
def test_resnet_training_gradient_data_parallel_equals_one_device(tmp_path):
  sharded = _run_sharded(MODEL_SCRIPT, tmp_path / "resnet.npz")
  common = {}
  exec(MODEL_COMMON, common)  # pylint: disable=exec-used
  x, labels = common["model_data"]()
  with jax.default_device(jax.devices()[0]):
    init, step = common["model_step"]()
    variables = init(x)
    args = variables["params"], variables["batch_stats"], x, labels
    assert "shiftjax_conv_kernel_grad" in step.lower(*args).compile().as_text()
    want = common["flat"](*step(*args))
  assert sharded.keys() == want.keys()
  np.testing.assert_allclose(sharded.pop("loss"), want.pop("loss"), rtol=1e-5)
  # Per-device partial sums (kernel gradients, BatchNorm statistics, the batch mean of the
  # loss) reorder float sums: seen up to ~1.5e-6 * max|leaf|. A missing psum of the kernel
  # gradient (one device's share, about a quarter of it) is off by O(max|leaf|).
  for key, w in want.items():
    np.testing.assert_allclose(sharded[key], w, rtol=1e-4, atol=1e-5 * np.abs(w).max(),
                               err_msg=key)
