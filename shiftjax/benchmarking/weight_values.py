"""How often each weight magnitude occurs in a model's quantized layers
(``benchmarks/weight_values.py`` prints it for trained runs)."""

import collections

import numpy as np

from shiftjax import policy as policy_lib
from shiftjax import train


def magnitude_fractions(params, quantizers) -> dict[float, float]:
  """{|w|: fraction of all quantized weights} over every quantized kernel of ``params``;
  ``quantizers`` is one spec or ``{layer path: spec}``."""
  counts, total = collections.Counter(), 0
  for path, latents in train.quantized_kernels(params).items():
    weight = np.abs(np.asarray(policy_lib.spec_of(quantizers, path).weight(latents)))
    values, n = np.unique(weight, return_counts=True)
    counts.update(dict(zip(values.tolist(), n.tolist())))
    total += weight.size
  return {value: counts[value] / total for value in sorted(counts)}
