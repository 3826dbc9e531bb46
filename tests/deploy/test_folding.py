"""BatchNorm folding (``shiftjax.deploy.folding``)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from shiftjax import deploy


def test_batch_norm_folding_is_exact():
  """y * scale + bias == flax's BatchNorm in eval mode, to float32 rounding."""
  rng = np.random.default_rng(0)
  c = 16
  stats = {"mean": rng.normal(0, 2, c), "var": rng.uniform(0.01, 5, c)}
  affine = {"scale": rng.normal(1, 0.5, c), "bias": rng.normal(0, 1, c)}
  x = rng.normal(0, 3, (64, c)).astype(np.float32)
  bn = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=deploy.BN_EPSILON)
  variables = {"params": {k: jnp.asarray(v, jnp.float32) for k, v in affine.items()},
               "batch_stats": {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}
  expected = np.asarray(bn.apply(variables, x), np.float64)
  scale, bias = deploy.fold_batch_norm(affine["scale"].astype(np.float32),
                                   affine["bias"].astype(np.float32),
                                   stats["mean"].astype(np.float32),
                                   stats["var"].astype(np.float32))
  folded = x.astype(np.float64) * scale + bias
  np.testing.assert_allclose(folded, expected, rtol=0, atol=4e-6 * np.max(np.abs(expected)))
